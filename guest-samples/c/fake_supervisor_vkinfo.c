/*
 * fake_supervisor_vkinfo.c - run vkinfo.c's main against a fake vk_info.
 *
 * Until the end-to-end test runs vkinfo.c under vkrun, this checks its
 * success path: it creates a RAM memfd of argv[1] bytes at descriptor
 * FAKE_RAM_FD, sealed against growing and shrinking unless argv[2] is
 * "unsealed", traps hypercalls with seccomp(2) (SECCOMP_RET_TRAP) and
 * answers vk_info from a SIGSYS handler the way ABI section 1 says vkrun
 * does (min(size, sizeof) bytes; every other hypercall -ENOSYS), then calls
 * vkinfo.c's main. guest-samples/abi/tests/c_header.rs checks the output.
 *
 * Exits 77 if memfd_create or seccomp is not available, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <ucontext.h>
#include <unistd.h>

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

/* vkinfo.c's main becomes vkinfo_main. */
#define main vkinfo_main
#include "vkinfo.c"
#undef main

#define FAKE_RAM_FD 100
#define EXIT_UNSUPPORTED 77

static struct vk_info fake_info;

static void on_sigsys(int sig, siginfo_t *si, void *ucv)
{
    ucontext_t *uc = ucv;
    greg_t *r = uc->uc_mcontext.gregs;
    size_t size = (size_t)r[REG_RSI];

    (void)sig;
    if ((uint64_t)(uint32_t)si->si_syscall != VK_SYS_vk_info) {
        r[REG_RAX] = -ENOSYS;
        return;
    }
    /* The real supervisor answers EFAULT for a bad pointer; this fake
     * trusts its one caller. */
    memcpy((void *)(uintptr_t)r[REG_RDI], &fake_info,
           size < sizeof fake_info ? size : sizeof fake_info);
    r[REG_RAX] = 0;
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

int main(int argc, char **argv)
{
    unsigned long long ram_size;
    char *end;
    int fd;

    if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "unsealed") != 0)) {
        fprintf(stderr, "usage: %s RAM_SIZE [unsealed]\n", argv[0]);
        return 2;
    }
    errno = 0;
    ram_size = strtoull(argv[1], &end, 0);
    if (errno != 0 || *end != '\0') {
        fprintf(stderr, "%s: bad RAM size %s\n", argv[0], argv[1]);
        return 2;
    }

    /* Guest RAM as vkrun makes it (ABI section 2). */
    fd = memfd_create("fake-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        fprintf(stderr, "SKIP: memfd_create: %s\n", strerror(errno));
        return EXIT_UNSUPPORTED;
    }
    if (ftruncate(fd, (off_t)ram_size) != 0 ||
        (argc == 2 && fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0) ||
        dup2(fd, FAKE_RAM_FD) != FAKE_RAM_FD) {
        fprintf(stderr, "fake RAM: %s\n", strerror(errno));
        return 1;
    }
    close(fd);

    fake_info.abi_version = VK_ABI_VERSION;
    fake_info.page_size = (uint32_t)PAGE_SIZE;
    fake_info.ram_fd = FAKE_RAM_FD;
    fake_info.vpte_levels = VPTE_LEVELS;
    fake_info.ram_size = ram_size;
    fake_info.user_max = VM_MAX_USER_ADDRESS;

    if (trap_hypercalls() != 0) {
        fprintf(stderr, "SKIP: cannot install a seccomp filter: %s\n", strerror(errno));
        return EXIT_UNSUPPORTED;
    }
    return vkinfo_main();
}
