/* A guest for the gdb tests: it asks vkrun for vk_info (so it is a
 * supervised guest, not just a program), counts in a function gdb breaks
 * at, and exits with a status gdb must report. "threads" starts workers
 * that spin until main has seen them all; "segv" takes SIGSEGVs by design
 * (a handler that maps the page and returns), as a vkernel does. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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
    } else if (strcmp(mode, "spin") == 0) {
        for (;;)
            bump(0);
    }
    for (int i = 1; i <= 3; i++)
        bump(i);
    printf("counter %ld ram %llu\n", counter, (unsigned long long)info.ram_size);
    return 7;
}
