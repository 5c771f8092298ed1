/* Asynchronous signals: a timer interrupting user code that runs in its
 * vmspace, EINTR of nanosleep, stop and continue of a child, kill of the
 * process group, a core-dumping default action. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <time.h>
#include <sys/wait.h>
#include <sys/time.h>

static volatile sig_atomic_t ticks;
static void tick(int sig) { (void)sig; ticks++; }

int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    setpgid(0, 0); /* its own group, for kill(0, ...) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = tick;
    sigaction(SIGALRM, &sa, 0);
    /* 1: a busy loop in user code is interrupted by a timer */
    struct itimerval it = {{0, 10000}, {0, 10000}};
    setitimer(ITIMER_REAL, &it, 0);
    while (ticks < 5) {}
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    printf("1 busy loop saw %d ticks\n", ticks >= 5);
    /* 2: nanosleep interrupted by a handler answers EINTR */
    alarm(1);
    struct timespec ts = {5, 0}, rem = {0, 0};
    int r = nanosleep(&ts, &rem);
    printf("2 nanosleep %d errno %d\n", r, errno);
    /* 3: a stopped and continued child */
    pid_t pid = fork();
    if (pid == 0) { raise(SIGSTOP); _exit(5); }
    int st;
    waitpid(pid, &st, WUNTRACED);
    printf("3 stopped %d sig %d\n", WIFSTOPPED(st), WSTOPSIG(st));
    kill(pid, SIGCONT);
    waitpid(pid, &st, 0);
    printf("3 exited %d code %d\n", WIFEXITED(st), WEXITSTATUS(st));
    /* 4: a signal to the process group reaches the child and the caller */
    signal(SIGUSR1, tick);
    ticks = 0;
    pid = fork();
    if (pid == 0) {
        sigset_t none; sigemptyset(&none);
        while (!ticks) sigsuspend(&none);
        _exit(6);
    }
    usleep(100000);
    kill(0, SIGUSR1);
    waitpid(pid, &st, 0);
    printf("4 group: child %d self %d\n", WEXITSTATUS(st), ticks);
    /* 5: default terminate of the process itself, core signal */
    pid = fork();
    if (pid == 0) { abort(); }
    waitpid(pid, &st, 0);
    printf("5 abort signaled %d sig %d\n", WIFSIGNALED(st), WTERMSIG(st));
    return 0;
}
