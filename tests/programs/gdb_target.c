/* A guest for the gdb tests: it asks vkrun for vk_info (so it is a
 * supervised guest, not just a program), counts in a function gdb breaks
 * at, and exits with a status gdb must report. "threads" starts workers
 * that spin until main has seen them all; "segv" takes SIGSEGVs by design
 * (a handler that maps the page and returns), as a vkernel does; "run"
 * has a thread RUN user code in a vmspace, back to back, while main
 * reaches bump. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>
#include "vkernel.h"

volatile long counter;
volatile int started;
static char *page;
static int faults;

int bump(int n) {
    int twice = n * 2;
    counter += twice;
    return twice;
}

static void *worker(void *arg) {
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) > 0)
        usleep(1000);
    return arg;
}

static char vmspace_token;
static volatile int runs, run_done;

/* RUN user code that spins for a while and makes a system call, again and
 * again until main is done; returns 1 if every RUN came back as the user
 * code left it. */
static void *runner(void *arg) {
    struct vk_info *info = arg;
    static const unsigned char code[] = {
        0x48, 0xff, 0xc9, /* 1: dec %rcx */
        0x75, 0xfb,       /*    jnz 1b */
        0x0f, 0x05,       /*    syscall */
    };
    uint8_t *ram = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, info->ram_fd, 0);
    if (ram == MAP_FAILED)
        return NULL;
    memcpy(ram, code, sizeof code);
    if (vmspace_create(&vmspace_token, 0, NULL) != 0) {
        perror("vmspace_create");
        return NULL;
    }
    void *p = vmspace_mmap(&vmspace_token, (void *)0x400000, 4096, PROT_READ | PROT_EXEC,
                           MAP_SHARED | MAP_FIXED, info->ram_fd, 0);
    if (p == MAP_FAILED) {
        perror("vmspace_mmap");
        return NULL;
    }
    void *ok = (void *)1;
    for (uint64_t i = 0; !__atomic_load_n(&run_done, __ATOMIC_SEQ_CST); i++) {
        struct trapframe tf;
        struct vextframe vf;
        memset(&tf, 0, sizeof tf);
        memset(&vf, 0, sizeof vf);
        tf.tf_rip = 0x400000;
        tf.tf_rflags = RFLAGS_USER_SET;
        tf.tf_rcx = 20000000;
        tf.tf_rax = 1000 + i;
        if (vmspace_ctl(&vmspace_token, VMSPACE_CTL_RUN, &tf, &vf) != 0) {
            perror("vmspace_ctl(RUN)");
            return NULL;
        }
        if (tf.tf_trapno != T_FAST_SYSCALL || tf.tf_rax != 1000 + i || tf.tf_rip != 0x400007) {
            fprintf(stderr, "RUN %llu returned trap %llu rax %llu rip %#llx\n",
                    (unsigned long long)i, (unsigned long long)tf.tf_trapno,
                    (unsigned long long)tf.tf_rax, (unsigned long long)tf.tf_rip);
            ok = NULL;
        }
        __atomic_add_fetch(&runs, 1, __ATOMIC_SEQ_CST);
    }
    vmspace_destroy(&vmspace_token);
    return ok;
}

/* A hypercall vkrun serves at a tracer stop (vmspace_destroy of a vmspace
 * that does not exist: ENOENT), for single-stepping over. */
int probe(void) {
    return vmspace_destroy(&vmspace_token);
}

static void on_segv(int sig, siginfo_t *info, void *uc) {
    (void)sig; (void)uc;
    faults++;
    mprotect((void *)((unsigned long)info->si_addr & ~4095UL), 4096, PROT_READ | PROT_WRITE);
}

int main(int argc, char **argv) {
    struct vk_info info;
    memset(&info, 0, sizeof info);
    if (vk_info(&info, sizeof info) != 0) {
        perror("vk_info");
        return 1;
    }
    const char *mode = argc > 1 ? argv[1] : "plain";
    if (strcmp(mode, "threads") == 0) {
        pthread_t t[3];
        for (long i = 0; i < 3; i++)
            pthread_create(&t[i], NULL, worker, (void *)i);
        while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 3)
            usleep(1000);
        bump(1); /* gdb looks at the threads here */
        __atomic_store_n(&started, -1, __ATOMIC_SEQ_CST);
        for (int i = 0; i < 3; i++)
            pthread_join(t[i], NULL);
    } else if (strcmp(mode, "segv") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
        page = mmap(NULL, 4096 * 8, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (int i = 0; i < 8; i++)
            page[i * 4096] = (char)i;
        printf("faults %d\n", faults);
        /* "segv N": N more faults, timed (the gdb bench). */
        long n = argc > 2 ? atol(argv[2]) : 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < n; i++) {
            mprotect(page, 4096, PROT_NONE);
            page[0] = (char)i;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (n > 0)
            printf("segv_ns_per_fault %.0f\n",
                   ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n);
    } else if (strcmp(mode, "run") == 0) {
        pthread_t t;
        void *ok;
        pthread_create(&t, NULL, runner, &info);
        while (__atomic_load_n(&runs, __ATOMIC_SEQ_CST) < 2)
            usleep(1000);
        bump(1); /* gdb stops everything here, the runner inside RUN */
        __atomic_store_n(&run_done, 1, __ATOMIC_SEQ_CST);
        pthread_join(t, &ok);
        if (!ok)
            return 3;
        printf("runs ok\n");
    } else if (strcmp(mode, "probe") == 0) {
        if (probe() == 0 || errno != ENOENT)
            return 4;
    } else if (strcmp(mode, "fork") == 0) {
        pid_t child = fork();
        if (child == 0) {
            bump(100); /* the child's copy of the breakpoint is gone */
            _exit(counter == 200 ? 0 : 1);
        }
        int status;
        waitpid(child, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 5;
        printf("child ok\n");
    } else if (strcmp(mode, "crash") == 0) {
        *(volatile int *)page = 1; /* page is NULL: SIGSEGV, no handler */
    } else if (strcmp(mode, "spin") == 0) {
        for (;;)
            bump(0);
    }
    for (int i = 1; i <= 3; i++)
        bump(i);
    printf("counter %ld ram %llu\n", counter, (unsigned long long)info.ram_size);
    return 7;
}
