/* sigwaitinfo/sigtimedwait: a queued signal of its own, a SIGCHLD with
 * its si_status, a timeout. */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>
#include <time.h>
int main(void) {
    sigset_t s; sigemptyset(&s); sigaddset(&s, SIGUSR1); sigaddset(&s, SIGCHLD);
    sigprocmask(SIG_BLOCK, &s, 0);
    raise(SIGUSR1);
    siginfo_t si; int sig = sigwaitinfo(&s, &si);
    printf("own %d code %d\n", sig, si.si_code);
    pid_t pid = fork();
    if (pid == 0) _exit(9);
    sig = sigwaitinfo(&s, &si);
    printf("chld %d status %d code %d\n", sig, si.si_status, si.si_code);
    struct timespec ts = {0, 10000000};
    sig = sigtimedwait(&s, &si, &ts);
    printf("timeout %d\n", sig);
    waitpid(pid, 0, 0);
    return 0;
}
