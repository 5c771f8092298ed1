/*
 * abi_dump.c - print every number, size, offset and type vkernel.h defines,
 * one `name value` line each, for guest-samples/abi/tests/c_header.rs to
 * compare with the Rust crate vkabi.
 *
 * Line grammar (values in decimal, constants as unsigned 64-bit):
 *   NAME <value>                   a constant
 *   typeof(NAME) <type>            its C type
 *   sizeof(S) / alignof(S) <n>     a struct or typedef
 *   offsetof(S.f) <n>              a field
 *   typeof(S.f) <type>             a field's type: i32 u32 i64 u64,
 *                                  "struct tls_info", T[n] for arrays
 *   vk_vmspace_mmap_prot_flags(prot,flags) <value>
 *
 * Every macro the header defines must appear here, and the test fails on a
 * name missing on either side. Build with -std=c11 (needs _Generic, _Alignof).
 */
#include <errno.h>
#include <stdio.h>

#include "vkernel.h"

/* The type names of c_header.rs (long and long long are both 64 bits). */
#define TYPE_NAME(x)                                                                   \
    _Generic((x), int: "i32", unsigned int: "u32", long: "i64", unsigned long: "u64", \
             long long: "i64", unsigned long long: "u64", struct tls_info: "struct tls_info", \
             default: "unknown")

#define CONST(name)                                                           \
    do {                                                                      \
        printf("%s %llu\n", #name, (unsigned long long)(name));               \
        printf("typeof(%s) %s\n", #name, TYPE_NAME(name));                    \
    } while (0)

#define STRUCT(s)                                                             \
    do {                                                                      \
        printf("sizeof(%s) %zu\n", #s, sizeof(struct s));                     \
        printf("alignof(%s) %zu\n", #s, _Alignof(struct s));                  \
    } while (0)

#define FIELD(s, f)                                                           \
    do {                                                                      \
        printf("offsetof(%s.%s) %zu\n", #s, #f, offsetof(struct s, f));       \
        printf("typeof(%s.%s) %s\n", #s, #f, TYPE_NAME(((struct s *)0)->f));  \
    } while (0)

#define ARRAY_FIELD(s, f)                                                     \
    do {                                                                      \
        printf("offsetof(%s.%s) %zu\n", #s, #f, offsetof(struct s, f));       \
        printf("typeof(%s.%s) %s[%zu]\n", #s, #f, TYPE_NAME(((struct s *)0)->f[0]), \
               sizeof(((struct s *)0)->f) / sizeof(((struct s *)0)->f[0])); \
    } while (0)

#define PACK(prot, flags)                                                     \
    printf("vk_vmspace_mmap_prot_flags(%d,%d) %llu\n", (prot), (flags),       \
           (unsigned long long)vk_vmspace_mmap_prot_flags((prot), (flags)))

int main(void)
{
    /* Version and hypercall numbers. */
    CONST(VK_ABI_VERSION);
    CONST(VK_SYS_BASE);
    CONST(VK_SYS_COUNT);
    CONST(VK_SYS_vk_info);
    CONST(VK_SYS_vk_mmap);
    CONST(VK_SYS_mcontrol);
    CONST(VK_SYS_vmspace_create);
    CONST(VK_SYS_vmspace_destroy);
    CONST(VK_SYS_vmspace_ctl);
    CONST(VK_SYS_vmspace_mmap);
    CONST(VK_SYS_vmspace_munmap);
    CONST(VK_SYS_vmspace_mcontrol);
    CONST(VK_SYS_vmspace_pread);
    CONST(VK_SYS_vmspace_pwrite);

    /* Address space. */
    CONST(PAGE_SIZE);
    CONST(PAGE_SHIFT);
    CONST(VM_MAX_USER_ADDRESS);
    CONST(VPTE_LEVELS);
    CONST(RAM_SIZE_MAX);

    /* mmap, mcontrol, vmspace_ctl. */
    CONST(MAP_VPAGETABLE);
    CONST(PROT_READ);
    CONST(PROT_WRITE);
    CONST(PROT_EXEC);
    CONST(MAP_SHARED);
    CONST(MAP_PRIVATE);
    CONST(MAP_FIXED);
    CONST(MAP_ANONYMOUS);
    CONST(MAP_STACK);
    CONST(MADV_INVAL);
    CONST(MADV_SETMAP);
    CONST(VMSPACE_CTL_RUN);

    /* VPTE bits. */
    CONST(VPTE_V);
    CONST(VPTE_RW);
    CONST(VPTE_U);
    CONST(VPTE_A);
    CONST(VPTE_M);
    CONST(VPTE_PS);
    CONST(VPTE_G);
    CONST(VPTE_WIRED);
    CONST(VPTE_MANAGED);
    CONST(VPTE_NX);
    CONST(VPTE_FRAME);
    CONST(VPTE_ENTRIES);
    CONST(VPTE_TOP_SHIFT);

    /* Page-fault error bits. */
    CONST(PGEX_P);
    CONST(PGEX_W);
    CONST(PGEX_U);
    CONST(PGEX_I);

    /* Trap numbers. */
    CONST(T_SIGNAL);
    CONST(T_PRIVINFLT);
    CONST(T_BPTFLT);
    CONST(T_ARITHTRAP);
    CONST(T_ASTFLT);
    CONST(T_PROTFLT);
    CONST(T_TRCTRAP);
    CONST(T_PAGEFLT);
    CONST(T_ALIGNFLT);
    CONST(T_DIVIDE);
    CONST(T_NMI);
    CONST(T_OFLOW);
    CONST(T_BOUND);
    CONST(T_DNA);
    CONST(T_DOUBLEFLT);
    CONST(T_FPOPFLT);
    CONST(T_TSSFLT);
    CONST(T_SEGNPFLT);
    CONST(T_STKFLT);
    CONST(T_MCHK);
    CONST(T_XMMFLT);
    CONST(T_RESERVED);
    CONST(T_SYSCALL80);
    CONST(T_FAST_SYSCALL);

    /* rflags. */
    CONST(RFLAGS_USER_MASK);
    CONST(RFLAGS_USER_SET);
    CONST(VMSPACE_CTL_FASTINFO);
    CONST(VK_FAST_OPEN_MAGIC);
    CONST(VK_FAST_CX_STATE);
    CONST(VK_FAST_CX_SEQ);
    CONST(VK_FAST_CX_KICK);
    CONST(VK_FAST_CX_SIG);
    CONST(VK_FAST_CX_CODE);
    CONST(VK_FAST_CX_ADDR);
    CONST(VK_FAST_CX_SYSCALL);
    CONST(VK_FAST_CX_FS_OUT);
    CONST(VK_FAST_CX_GS_OUT);
    CONST(VK_FAST_CX_FS_IN);
    CONST(VK_FAST_CX_GS_IN);
    CONST(VK_FAST_CX_OPEN);
    CONST(VK_FAST_CX_BUSY);
    CONST(VK_FAST_CX_MASK_HELD);
    CONST(VK_FAST_CX_FAULT);
    CONST(VK_FAST_CX_SAVED_MASK);
    CONST(VK_FAST_CX_FAULT_ADDR);
    CONST(VK_FAST_CX_FAULT_ERR);
    CONST(VK_FAST_CX_STUB_PID);
    CONST(VK_FAST_CX_CTX_TID);
    CONST(VK_FAST_CX_KICK_AT);
    CONST(VK_FAST_CX_N_RUNS);
    CONST(VK_FAST_CX_N_SYSCALL);
    CONST(VK_FAST_CX_N_PAGEFAULT);
    CONST(VK_FAST_CX_N_TRAP);
    CONST(VK_FAST_CX_N_SIGNAL);
    CONST(VK_FAST_CX_NOTIF);
    CONST(VK_FAST_CX_LISTENER);
    CONST(VK_FAST_CX_NOTIF_ID);
    CONST(VK_FAST_CX_RECV_LOCK);
    CONST(VK_FAST_NR_REPORT);
    CONST(VK_FAST_FASTINFO_LISTENER);
    CONST(VK_FAST_CX_IN);
    CONST(VK_FAST_CX_OUT);
    CONST(VK_FAST_GREGS_IN);
    CONST(VK_FAST_GREGS);
    CONST(VK_FAST_STATE_WAIT);
    CONST(VK_FAST_STATE_GO);
    CONST(VK_FAST_STATE_RUNNING);
    CONST(VK_FAST_STATE_EXIT);
    CONST(VK_FAST_KICK_SIGNAL);

    /* The errno values the ABI names (from <errno.h>). */
    CONST(EPERM);
    CONST(ENOENT);
    CONST(EINTR);
    CONST(EIO);
    CONST(EBADF);
    CONST(ENOMEM);
    CONST(EFAULT);
    CONST(EBUSY);
    CONST(EEXIST);
    CONST(EINVAL);
    CONST(ENOSYS);
    CONST(EOPNOTSUPP);

    /* Types. */
    printf("sizeof(vpte_t) %zu\n", sizeof(vpte_t));
    printf("alignof(vpte_t) %zu\n", _Alignof(vpte_t));
    printf("typeof(vpte_t) %s\n", TYPE_NAME((vpte_t)0));

    STRUCT(vk_info);
    FIELD(vk_info, abi_version);
    FIELD(vk_info, page_size);
    FIELD(vk_info, ram_fd);
    FIELD(vk_info, vpte_levels);
    FIELD(vk_info, ram_size);
    FIELD(vk_info, user_max);
    ARRAY_FIELD(vk_info, reserved);

    STRUCT(trapframe);
    FIELD(trapframe, tf_rdi);
    FIELD(trapframe, tf_rsi);
    FIELD(trapframe, tf_rdx);
    FIELD(trapframe, tf_rcx);
    FIELD(trapframe, tf_r8);
    FIELD(trapframe, tf_r9);
    FIELD(trapframe, tf_rax);
    FIELD(trapframe, tf_rbx);
    FIELD(trapframe, tf_rbp);
    FIELD(trapframe, tf_r10);
    FIELD(trapframe, tf_r11);
    FIELD(trapframe, tf_r12);
    FIELD(trapframe, tf_r13);
    FIELD(trapframe, tf_r14);
    FIELD(trapframe, tf_r15);
    FIELD(trapframe, tf_xflags);
    FIELD(trapframe, tf_trapno);
    FIELD(trapframe, tf_addr);
    FIELD(trapframe, tf_flags);
    FIELD(trapframe, tf_err);
    FIELD(trapframe, tf_rip);
    FIELD(trapframe, tf_cs);
    FIELD(trapframe, tf_rflags);
    FIELD(trapframe, tf_rsp);
    FIELD(trapframe, tf_ss);

    STRUCT(tls_info);
    FIELD(tls_info, base);
    FIELD(tls_info, size);

    STRUCT(vextframe);
    ARRAY_FIELD(vextframe, vx_tls);

    /* vmspace_mmap's fourth register. */
    PACK(PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE);
    PACK(PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED);
    PACK(-1, 0);
    PACK(0, -1);
    PACK(INT32_MIN, INT32_MAX);

    return fflush(stdout) == 0 ? 0 : 1;
}
