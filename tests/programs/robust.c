/* Robust mutexes: a thread that dies holding one (and one that dies while
 * another thread waits for it) hands EOWNERDEAD to the next locker, which
 * makes the mutex consistent; the thread's robust list is its own
 * (get_robust_list); sched_getaffinity answers a non-empty set; a thread
 * that exits while main waits in pthread_join is joined. Prints what
 * happened; the run inside must print the same. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_mutex_t m;
static volatile int locked;

static void *die_holding(void *arg) {
    (void)arg;
    pthread_mutex_lock(&m);
    locked = 1;
    if (arg)
        usleep(50000); /* main blocks in lock meanwhile */
    return 0;          /* exits without unlocking */
}

static void round_trip(const char *what, int wait_first) {
    pthread_t t;
    locked = 0;
    pthread_create(&t, 0, die_holding, wait_first ? (void *)1 : 0);
    if (wait_first) {
        while (!locked)
            sched_yield();
    } else {
        pthread_join(t, 0);
    }
    int r = pthread_mutex_lock(&m);
    printf("%s: lock after owner died: %s\n", what, r == EOWNERDEAD ? "EOWNERDEAD" : strerror(r));
    if (r == EOWNERDEAD)
        printf("%s: consistent: %d\n", what, pthread_mutex_consistent(&m));
    printf("%s: unlock: %d\n", what, pthread_mutex_unlock(&m));
    printf("%s: lock again: %d\n", what, pthread_mutex_lock(&m));
    pthread_mutex_unlock(&m);
    if (wait_first)
        pthread_join(t, 0);
}

int main(void) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&m, &a);

    round_trip("joined first", 0);
    round_trip("waiting meanwhile", 1);

    void *head = 0;
    size_t len = 0;
    long r = syscall(SYS_get_robust_list, 0, &head, &len);
    printf("get_robust_list: %ld, len %zu, head %s\n", r, len, head ? "set" : "none");
    r = syscall(SYS_set_robust_list, head, len + 1);
    printf("set_robust_list with a bad length: %s\n", r == -1 && errno == EINVAL ? "EINVAL" : "accepted");

    cpu_set_t set;
    CPU_ZERO(&set);
    r = sched_getaffinity(0, sizeof set, &set);
    printf("sched_getaffinity: %ld, some CPU: %s\n", r, CPU_COUNT(&set) > 0 ? "yes" : "no");
    return 0;
}
