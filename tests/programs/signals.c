/* Signal delivery as Linux does it, one numbered line per feature: run
 * natively and under the minikernel, the outputs must match. Ends killed
 * by an uncaught SIGUSR2 (status 140). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <setjmp.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <pthread.h>

static volatile sig_atomic_t got, order[8], norder, depth, maxdepth;
static volatile int code, status, from_self;
static void *volatile fault_addr;
static sigjmp_buf env;
static char *page;
static char altstack[65536];
static volatile int on_alt;
static int pfd[2];

static void info_handler(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    got = sig;
    code = si->si_code;
    from_self = si->si_pid == getpid();
}
static void rec(int sig) { order[norder++] = sig; if (sig == SIGUSR1) raise(SIGUSR2); order[norder++] = -sig; }
static void nodefer(int sig) { depth++; if (depth > maxdepth) maxdepth = depth; if (depth < 3) raise(sig); depth--; }
static void segv(int sig, siginfo_t *si, void *uc) {
    ucontext_t *u = uc;
    (void)sig;
    fault_addr = si->si_addr;
    code = si->si_code;
    status = u->uc_mcontext.gregs[REG_TRAPNO] == 14 && (u->uc_mcontext.gregs[REG_ERR] & 2);
    mprotect(page, 4096, PROT_READ | PROT_WRITE);
}
static void jump(int sig, siginfo_t *si, void *uc) { (void)uc; code = si->si_code; siglongjmp(env, sig); }
static void trap(int sig) { got = sig; }
static void chld(int sig, siginfo_t *si, void *uc) { (void)sig; (void)uc; status = si->si_status; code = si->si_code; got = SIGCHLD; }
static void alt(int sig) { char c; (void)sig; on_alt = &c >= altstack && &c < altstack + sizeof altstack; }
static void alrm_write(int sig) { (void)sig; got++; if (write(pfd[1], "x", 1) != 1) _exit(9); }
static void alrm(int sig) { (void)sig; got++; }
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int once_count;
static void once_fn(void) { once_count++; }

static void set(int sig, void (*h)(int), int flags, int masksig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = h;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (masksig) sigaddset(&sa.sa_mask, masksig);
    sigaction(sig, &sa, 0);
}
static void seti(int sig, void (*h)(int, siginfo_t *, void *), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = flags | SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, 0);
}

int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    /* 1: SA_SIGINFO from kill(self) */
    seti(SIGUSR1, info_handler, 0);
    kill(getpid(), SIGUSR1);
    printf("1 got %d code %d self %d\n", got, code, from_self);
    got = 0; raise(SIGUSR1);
    printf("1b got %d code %d\n", got, code);
    /* 2: sa_mask defers USR2 until USR1's handler returns */
    set(SIGUSR1, rec, 0, SIGUSR2);
    set(SIGUSR2, rec, 0, 0);
    raise(SIGUSR1);
    printf("2 order");
    for (int i = 0; i < norder; i++) printf(" %d", order[i]);
    printf("\n");
    /* 3: SA_NODEFER recursion, SA_RESETHAND */
    set(SIGUSR1, nodefer, SA_NODEFER, 0);
    raise(SIGUSR1);
    printf("3 maxdepth %d\n", maxdepth);
    set(SIGUSR2, trap, SA_RESETHAND, 0);
    raise(SIGUSR2);
    struct sigaction q;
    sigaction(SIGUSR2, 0, &q);
    printf("3b got %d now default %d\n", got, q.sa_handler == SIG_DFL);
    /* 4: blocked, pending, unblocked */
    seti(SIGUSR1, info_handler, 0);
    sigset_t s, old, pend;
    sigemptyset(&s); sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, &old);
    got = 0; raise(SIGUSR1);
    sigpending(&pend);
    printf("4 blocked got %d pending %d\n", got, sigismember(&pend, SIGUSR1));
    sigprocmask(SIG_SETMASK, &old, 0);
    printf("4 unblocked got %d\n", got);
    /* 5: alarm + pause */
    set(SIGALRM, alrm, 0, 0);
    got = 0; alarm(1);
    pause();
    printf("5 pause got %d\n", got);
    /* 6: setitimer + sigsuspend with SIGALRM blocked outside */
    sigemptyset(&s); sigaddset(&s, SIGALRM);
    sigprocmask(SIG_BLOCK, &s, &old);
    struct itimerval it = {{0, 0}, {0, 20000}}, cur;
    setitimer(ITIMER_REAL, &it, 0);
    getitimer(ITIMER_REAL, &cur);
    printf("6 armed %d\n", cur.it_value.tv_usec > 0 || cur.it_value.tv_sec > 0);
    got = 0;
    sigset_t waitmask; sigemptyset(&waitmask);
    int r = sigsuspend(&waitmask);
    sigset_t now; sigprocmask(SIG_SETMASK, 0, &now);
    printf("6 sigsuspend %d errno %d got %d still blocked %d\n", r, errno, got, sigismember(&now, SIGALRM));
    sigprocmask(SIG_SETMASK, &old, 0);
    /* 7: read interrupted: EINTR without SA_RESTART, restarted with it */
    if (pipe(pfd)) return 1;
    set(SIGALRM, alrm, 0, 0);
    got = 0;
    it.it_value.tv_usec = 20000; setitimer(ITIMER_REAL, &it, 0);
    char c;
    r = read(pfd[0], &c, 1);
    printf("7 read %d errno %d got %d\n", r, errno, got);
    set(SIGALRM, alrm_write, SA_RESTART, 0);
    got = 0;
    setitimer(ITIMER_REAL, &it, 0);
    r = read(pfd[0], &c, 1);
    printf("7b read %d '%c' got %d\n", r, c, got);
    /* 8: SIGSEGV handler fixes the protection and returns */
    page = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    seti(SIGSEGV, segv, 0);
    page[100] = 42;
    printf("8 segv in page %ld code %d write-fault %d value %d\n", (long)((char *)fault_addr - page) / 4096, code, status, page[100]);
    /* 9: SIGFPE, SIGILL through siglongjmp, SIGTRAP returns */
    seti(SIGFPE, jump, 0);
    seti(SIGILL, jump, 0);
    volatile int zero = 0;
    int v = sigsetjmp(env, 1);
    if (v == 0) { v = 100 / zero; printf("no fpe %d\n", v); }
    else printf("9 fpe sig %d code %d\n", v, code);
    v = sigsetjmp(env, 1);
    if (v == 0) { __asm__ volatile("ud2"); }
    else printf("9 ill sig %d code %d\n", v, code);
    set(SIGTRAP, trap, 0, 0);
    got = 0;
    __asm__ volatile("int3");
    printf("9 trap got %d\n", got);
    /* 10: SIGCHLD with si_status */
    sigemptyset(&s); sigaddset(&s, SIGCHLD);
    sigprocmask(SIG_BLOCK, &s, &old);
    seti(SIGCHLD, chld, 0);
    got = 0;
    pid_t pid = fork();
    if (pid == 0) _exit(7);
    sigset_t empty; sigemptyset(&empty);
    while (got != SIGCHLD) sigsuspend(&empty);
    sigprocmask(SIG_SETMASK, &old, 0);
    int st;
    waitpid(pid, &st, 0);
    printf("10 chld status %d code %d exit %d\n", status, code, WEXITSTATUS(st));
    /* 11: sigaltstack + SA_ONSTACK */
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, 0);
    set(SIGUSR2, alt, SA_ONSTACK, 0);
    raise(SIGUSR2);
    printf("11 on alt %d\n", on_alt);
    /* 12: signals to a child, a child killed by default action */
    set(SIGUSR1, alrm, 0, 0);
    got = 0;
    sigemptyset(&s); sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, &old);
    pid = fork();
    if (pid == 0) {
        sigsuspend(&empty);
        _exit(got == 1 ? 3 : 4);
    }
    sigprocmask(SIG_SETMASK, &old, 0);
    kill(pid, SIGUSR1);
    waitpid(pid, &st, 0);
    printf("12 child exit %d\n", WEXITSTATUS(st));
    pid = fork();
    if (pid == 0) { signal(SIGTERM, SIG_DFL); pause(); _exit(1); }
    usleep(50000);
    kill(pid, SIGTERM);
    waitpid(pid, &st, 0);
    printf("12b child signaled %d sig %d\n", WIFSIGNALED(st), WTERMSIG(st));
    pid = fork();
    if (pid == 0) { raise(SIGHUP); _exit(1); }
    waitpid(pid, &st, 0);
    printf("12c child signaled %d sig %d\n", WIFSIGNALED(st), WTERMSIG(st));
    /* 13: ignored signals, pthread_once */
    signal(SIGUSR1, SIG_IGN);
    raise(SIGUSR1);
    pthread_once(&once, once_fn);
    pthread_once(&once, once_fn);
    printf("13 ignored ok, once %d\n", once_count);
    /* 14: uncaught SIGUSR2 ends the process */
    signal(SIGSEGV, SIG_DFL);
    signal(SIGUSR2, SIG_DFL);
    raise(SIGUSR2);
    printf("not reached\n");
    return 0;
}
