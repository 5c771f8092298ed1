/*
 * The floor of a RUN round trip on this machine: the smallest program that
 * does what vkrun's RUN must do, with none of vkrun's bookkeeping.
 *
 *   G (the "vkernel") loops on a hypercall that reaches S by
 *   SECCOMP_RET_USER_NOTIF (with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
 *   S copies the 200-byte frame and a 16-byte vextframe in with one
 *   process_vm_readv, posts registers to a shared block and wakes C by
 *   futex, then sleeps on the block's report counter;
 *   C (the "context", another process) runs user code whose system call a
 *   seccomp filter turns into SIGSYS; its handler writes the registers to
 *   the block, wakes S and sleeps until the next post;
 *   S copies the frame out with one process_vm_writev and answers G.
 *
 * Four hand-offs, one signal delivery and return, two cross-process copies.
 * `run_floor nocopy` leaves the copies out. The vmspace bench builds and runs
 * it beside vkrun's RUN; CPU placement is inherited from the caller.
 *
 * Prints `run_floor_ns <nanoseconds per round trip>`.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

#define NR_RUN 1000 /* G's hypercall number */
#define CALLS 20000
#define GO 1
#define LISTENER_FD 100 /* where G keeps its listener for S to take */

struct block {
    volatile uint32_t state; /* GO: registers posted */
    volatile uint32_t seq;   /* reports so far */
    uint64_t regs_in[8];     /* r8..r15 for the user code */
    uint64_t regs_out[23];   /* gregs at the trap */
};

static struct block *blk;
static int go_pipe[2];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void futex_wait(volatile uint32_t *word, uint32_t value) {
    syscall(SYS_futex, word, FUTEX_WAIT, value, NULL, NULL, 0);
}

static void futex_wake(volatile uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void install_filter(struct sock_filter *insns, unsigned short n, unsigned flags, int *fd) {
    struct sock_fprog prog = {n, insns};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        die("no_new_privs");
    long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    if (r < 0)
        die("seccomp");
    if (fd)
        *fd = (int)r;
}

/* C: report the trap, sleep until the next post, resume with its registers. */
static void on_sigsys(int sig, siginfo_t *si, void *ucv) {
    (void)sig;
    (void)si;
    ucontext_t *uc = ucv;
    memcpy(blk->regs_out, uc->uc_mcontext.gregs, sizeof blk->regs_out);
    blk->state = 0;
    blk->seq++;
    futex_wake(&blk->seq);
    while (blk->state != GO)
        futex_wait(&blk->state, 0);
    memcpy(uc->uc_mcontext.gregs, blk->regs_in, sizeof blk->regs_in);
}

static void context(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    sigaction(SIGSYS, &sa, NULL);
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getpid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    install_filter(f, 4, 0, NULL);
    for (;;) /* the user code: a system call, again and again */
        __asm__ volatile("syscall" : : "a"(SYS_getpid) : "rcx", "r11", "memory");
}

static void vkernel(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NR_RUN, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    int fd;
    install_filter(f, 4, SECCOMP_FILTER_FLAG_NEW_LISTENER, &fd);
    if (dup2(fd, LISTENER_FD) != LISTENER_FD)
        die("dup2");
    char c;
    if (read(go_pipe[0], &c, 1) != 1)
        die("read");
    uint64_t tf[25], vf[2];
    memset(tf, 0, sizeof tf);
    memset(vf, 0, sizeof vf);
    syscall(NR_RUN, tf, vf);
    double t0 = now_ns();
    for (int i = 0; i < CALLS; i++)
        syscall(NR_RUN, tf, vf);
    printf("run_floor_ns %.1f\n", (now_ns() - t0) / CALLS);
    exit(0);
}

int main(int argc, char **argv) {
    int copies = !(argc > 1 && !strcmp(argv[1], "nocopy"));
    blk = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (blk == MAP_FAILED || pipe(go_pipe))
        die("setup");
    pid_t c = fork();
    if (c == 0)
        context();
    while (blk->seq == 0) /* its first trap: ready */
        futex_wait(&blk->seq, 0);
    pid_t g = fork();
    if (g == 0)
        vkernel();
    int pidfd = syscall(SYS_pidfd_open, g, 0);
    int nfd = -1;
    for (int tries = 0; nfd < 0 && tries < 1000; tries++) { /* until G has its listener */
        nfd = syscall(SYS_pidfd_getfd, pidfd, LISTENER_FD, 0);
        if (nfd < 0)
            usleep(1000);
    }
    if (nfd < 0)
        die("pidfd_getfd");
    ioctl(nfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0);
    if (write(go_pipe[1], "x", 1) != 1)
        die("write");

    uint64_t tf[25], vf[2];
    for (;;) {
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(nfd, SECCOMP_IOCTL_NOTIF_RECV, &req))
            break; /* G exited */
        struct iovec local[2] = {{tf, 200}, {vf, 16}};
        struct iovec remote[2] = {{(void *)req.data.args[0], 200}, {(void *)req.data.args[1], 16}};
        if (copies && process_vm_readv(req.pid, local, 2, remote, 2, 0) != 216)
            die("process_vm_readv");
        memcpy(blk->regs_in, tf, sizeof blk->regs_in);
        uint32_t seq = blk->seq;
        blk->state = GO;
        futex_wake(&blk->state);
        while (blk->seq == seq)
            futex_wait(&blk->seq, seq);
        memcpy(tf, blk->regs_out, sizeof blk->regs_out);
        if (copies && process_vm_writev(req.pid, local, 2, remote, 2, 0) != 216)
            die("process_vm_writev");
        struct seccomp_notif_resp resp = {.id = req.id};
        if (ioctl(nfd, SECCOMP_IOCTL_NOTIF_SEND, &resp))
            break;
    }
    int status;
    waitpid(g, &status, 0);
    kill(c, SIGKILL);
    waitpid(c, &status, 0);
    return WIFEXITED(status) || WIFSIGNALED(status) ? 0 : 1;
}
