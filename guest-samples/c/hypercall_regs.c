/*
 * hypercall_regs.c - a fake supervisor for testing vkernel.h's wrappers.
 *
 * Installs a seccomp filter that turns every hypercall number into SIGSYS
 * (SECCOMP_RET_TRAP, seccomp(2)); the handler records the number and the six
 * argument registers and answers with the raw value given as argv[1] (a
 * decimal, -errno for a failure) by writing it to rax. Then it calls every
 * wrapper once or twice with the fixed arguments below and prints, per call:
 *
 *   call <name> nr=<hex> args=<hex>,<hex>,<hex>,<hex>,<hex>,<hex> ret=<dec> errno=<dec> traps=<n>
 *
 * where ret is the wrapper's result as a long (MAP_FAILED prints -1) and
 * errno is 0 unless the wrapper set it. guest-samples/abi/tests/c_header.rs
 * holds the same argument list and checks every line against the Rust crate:
 * change both together. The pointers are never dereferenced (the hypercall
 * never reaches the kernel), so they are made-up addresses.
 *
 * Exits 77 if seccomp is not available, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <ucontext.h>

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "vkernel.h"

#define EXIT_NO_SECCOMP 77

static volatile long fake_ret;
static volatile sig_atomic_t traps;
static volatile uint64_t seen_nr, seen_args[6];

static void on_sigsys(int sig, siginfo_t *si, void *ucv)
{
    ucontext_t *uc = ucv;
    greg_t *r = uc->uc_mcontext.gregs;

    (void)sig;
    if ((uint64_t)(uint32_t)si->si_syscall == VK_SYS_vmspace_ctl &&
        r[REG_RSI] == VMSPACE_CTL_FASTINFO) {
        /* vmspace_ctl()'s own question whether the fast RUN is offered:
         * not by this fake, so RUN takes the hypercall, which is checked. */
        r[REG_RAX] = -EOPNOTSUPP;
        return;
    }
    traps++;
    seen_nr = (uint64_t)(uint32_t)si->si_syscall;
    seen_args[0] = (uint64_t)r[REG_RDI];
    seen_args[1] = (uint64_t)r[REG_RSI];
    seen_args[2] = (uint64_t)r[REG_RDX];
    seen_args[3] = (uint64_t)r[REG_R10];
    seen_args[4] = (uint64_t)r[REG_R8];
    seen_args[5] = (uint64_t)r[REG_R9];
    r[REG_RAX] = (greg_t)fake_ret; /* the "hypercall" result */
}

static int trap_hypercalls(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)VK_SYS_BASE, 0, 2),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)(VK_SYS_BASE + VK_SYS_COUNT), 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {
        .len = (unsigned short)(sizeof filter / sizeof filter[0]),
        .filter = filter,
    };
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGSYS, &sa, NULL) != 0)
        return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

static void before(void)
{
    traps = 0;
    seen_nr = 0;
    memset((void *)seen_args, 0, sizeof seen_args);
    errno = 0;
}

static void report(const char *name, long ret)
{
    int err = errno;

    printf("call %s nr=0x%llx args=0x%llx,0x%llx,0x%llx,0x%llx,0x%llx,0x%llx ret=%ld errno=%d "
           "traps=%d\n",
           name, (unsigned long long)seen_nr, (unsigned long long)seen_args[0],
           (unsigned long long)seen_args[1], (unsigned long long)seen_args[2],
           (unsigned long long)seen_args[3], (unsigned long long)seen_args[4],
           (unsigned long long)seen_args[5], ret, err, (int)traps);
}

#define ADDR(a) ((void *)(uintptr_t)(a))
#define PTR_RET(p) ((long)(intptr_t)(p))

int main(int argc, char **argv)
{
    void *id = ADDR(0x1d00);
    char *end;

    if (argc != 2) {
        fprintf(stderr, "usage: %s RAW_RETURN_VALUE\n", argv[0]);
        return 2;
    }
    errno = 0;
    fake_ret = strtol(argv[1], &end, 0);
    if (errno != 0 || *end != '\0') {
        fprintf(stderr, "%s: bad return value %s\n", argv[0], argv[1]);
        return 2;
    }
    if (trap_hypercalls() != 0) {
        fprintf(stderr, "SKIP: cannot install a seccomp filter: %s\n", strerror(errno));
        return EXIT_NO_SECCOMP;
    }

    before();
    report("vk_info", vk_info(ADDR(0x1000), sizeof(struct vk_info)));

    before();
    report("vk_mmap", PTR_RET(vk_mmap(ADDR(0x200000), 0x3000, PROT_READ | PROT_WRITE,
                                      MAP_SHARED | MAP_VPAGETABLE, 7, (off_t)0x8000000000)));
    before();
    report("vk_mmap", PTR_RET(vk_mmap(NULL, 0x1000, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)));

    before();
    report("mcontrol", mcontrol(ADDR(0x7000), 0x2000, MADV_SETMAP, 0x123007));

    before();
    report("vmspace_create", vmspace_create(id, -2, ADDR(0xda7a)));

    before();
    report("vmspace_destroy", vmspace_destroy(id));

    before();
    report("vmspace_ctl", vmspace_ctl(id, VMSPACE_CTL_RUN, ADDR(0x7f00), ADDR(0x7e00)));

    before();
    report("vmspace_mmap",
           PTR_RET(vmspace_mmap(id, ADDR(0x400000), 0x5000, PROT_READ | PROT_WRITE,
                                MAP_SHARED | MAP_VPAGETABLE, 7, (off_t)0x8000000000)));
    before();
    report("vmspace_mmap",
           PTR_RET(vmspace_mmap(id, NULL, 0x1000, PROT_READ | PROT_EXEC,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)));

    before();
    report("vmspace_munmap", vmspace_munmap(id, ADDR(0x400000), 0x5000));

    before();
    report("vmspace_mcontrol", vmspace_mcontrol(id, ADDR(0x400000), 0x5000, MADV_INVAL, 0));

    before();
    report("vmspace_pread", (long)vmspace_pread(id, ADDR(0xb000), 100, 0, 0x400123));

    before();
    report("vmspace_pwrite", (long)vmspace_pwrite(id, ADDR(0xc000), 200, 0, 0x401234));

    return fflush(stdout) == 0 ? 0 : 1;
}
