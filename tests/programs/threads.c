/* pthreads: create/join, mutex, condvar ping-pong, barrier, once, TLS,
 * gettid, a process signal taken by the one thread that does not block it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <signal.h>
#include <sys/syscall.h>
#include <errno.h>
#include <string.h>

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t bar;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static __thread int tls = 7;
static long counter;
static int turn, onces;
static void once_fn(void) { onces++; }

static void *worker(void *arg) {
    long id = (long)arg;
    pthread_once(&once, once_fn);
    tls += id;
    for (int i = 0; i < 10000; i++) {
        pthread_mutex_lock(&m);
        counter++;
        pthread_mutex_unlock(&m);
    }
    pthread_barrier_wait(&bar);
    return (void *)(long)(tls * 10 + (syscall(SYS_gettid) != getpid()));
}

static void *pong(void *arg) {
    (void)arg;
    for (int i = 0; i < 1000; i++) {
        pthread_mutex_lock(&m);
        while (turn != 1) pthread_cond_wait(&c, &m);
        turn = 0;
        pthread_cond_signal(&c);
        pthread_mutex_unlock(&m);
    }
    return 0;
}

static volatile sig_atomic_t usr1;
static void h(int s) { (void)s; usr1++; }
static void *sleeper(void *arg) {
    (void)arg;
    sigset_t none; sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, 0);
    while (!usr1) pause();
    return (void *)1L;
}

/* Thread-directed signals: to a thread running user code, to one blocked
 * in read(2) (EINTR: the handler has no SA_RESTART). */
static __thread volatile sig_atomic_t mine;
static int pfd[2];
static void th(int s) { (void)s; mine = 1; }
static void *spinner(void *a) { (void)a; while (!mine) {} return (void *)2L; }
static void *reader(void *a) {
    char ch;
    (void)a;
    int r = read(pfd[0], &ch, 1);
    return (void *)(long)(r < 0 && errno == EINTR ? 3 : 4);
}

int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    pthread_t t[4];
    pthread_barrier_init(&bar, 0, 4);
    for (long i = 0; i < 4; i++) pthread_create(&t[i], 0, worker, (void *)i);
    for (int i = 0; i < 4; i++) { void *r; pthread_join(t[i], &r); printf("join %d -> %ld\n", i, (long)r); }
    printf("counter %ld onces %d main tls %d\n", counter, onces, tls);
    pthread_t p;
    pthread_create(&p, 0, pong, 0);
    for (int i = 0; i < 1000; i++) {
        pthread_mutex_lock(&m);
        while (turn != 0) pthread_cond_wait(&c, &m);
        turn = 1;
        pthread_cond_signal(&c);
        pthread_mutex_unlock(&m);
    }
    pthread_join(p, 0);
    printf("ping-pong done\n");
    signal(SIGUSR1, h);
    sigset_t s; sigemptyset(&s); sigaddset(&s, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &s, 0);
    pthread_t sl;
    pthread_create(&sl, 0, sleeper, 0);
    usleep(50000);
    kill(getpid(), SIGUSR1);
    void *r;
    pthread_join(sl, &r);
    printf("thread got the process signal %ld usr1 %d\n", (long)r, usr1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = th;
    sigaction(SIGUSR2, &sa, 0);
    if (pipe(pfd)) return 1;
    pthread_t sp, rd;
    pthread_create(&sp, 0, spinner, 0);
    pthread_create(&rd, 0, reader, 0);
    usleep(50000);
    pthread_kill(sp, SIGUSR2);
    pthread_join(sp, &r);
    printf("spinner %ld\n", (long)r);
    pthread_kill(rd, SIGUSR2);
    pthread_join(rd, &r);
    printf("reader %ld main untouched %d\n", (long)r, mine);
    return 0;
}
