/*
 * vkernel.h - the vkrun guest ABI for C guests (docs/ABI.md, version 1).
 *
 * This header mirrors the Rust crate `vkabi` (guest-samples/abi/src), which is
 * the single definition of the ABI. guest-samples/abi/tests/c_header.rs
 * compiles guest-samples/c/abi_dump.c against this header and checks every
 * number, flag, size, offset and type below against the Rust crate, and runs
 * the wrappers under a seccomp trap to check the registers they load. Change
 * the Rust crate first, then this file.
 *
 * Naming:
 *   - constants have the Rust crate's names (VK_ABI_VERSION, VK_SYS_BASE,
 *     PAGE_SIZE, VPTE_V, PGEX_W, T_PAGEFLT, MADV_SETMAP, ...), which are
 *     DragonFly's where DragonFly has one; the Rust USER_MAX is spelt
 *     VM_MAX_USER_ADDRESS, DragonFly's name;
 *   - hypercall numbers are VK_SYS_<name>, with DragonFly's lower-case
 *     syscall name: VK_SYS_vk_info, VK_SYS_vk_mmap, VK_SYS_mcontrol,
 *     VK_SYS_vmspace_create, ... (like Linux's SYS_mmap);
 *   - each constant has the C type of its Rust type (u32 -> unsigned int,
 *     i32 -> int, u64 -> uint64_t);
 *   - wrappers have DragonFly's prototypes and libc's error convention
 *     (-1 or MAP_FAILED, with errno set);
 *   - names starting with vk__ / VK__ are internal.
 *
 * Linux's PROT_* and MAP_* come from <sys/mman.h>; this header only adds
 * MAP_ANONYMOUS and MAP_STACK when a strict -std=c11 build hides them.
 *
 * Self-contained: needs only the C library's headers. C99 or later, gcc or
 * clang, x86-64 Linux (glibc or musl). Usable from C++.
 */
#ifndef VKERNEL_H
#define VKERNEL_H

#if !defined(__x86_64__)
#error "vkernel.h: the vkrun guest ABI is x86-64 only"
#endif

#include <errno.h>
#include <limits.h> /* musl may define PAGE_SIZE here; include it before testing */
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Version and hypercall numbers (ABI section 1) ---------------------- */

/* ABI version reported by vk_info. */
#define VK_ABI_VERSION 1u
/* First hypercall number; bit 30 (x32) is clear, so Linux answers -ENOSYS. */
#define VK_SYS_BASE UINT64_C(0x0DF00000)
/* Numbers [VK_SYS_BASE, VK_SYS_BASE + VK_SYS_COUNT) all reach the supervisor. */
#define VK_SYS_COUNT UINT64_C(0x1000)

/* Hypercall numbers: VK_SYS_BASE + DragonFly's syscall number. */
#define VK_SYS_vk_info (VK_SYS_BASE + 0)
#define VK_SYS_vk_mmap (VK_SYS_BASE + 197)
#define VK_SYS_mcontrol (VK_SYS_BASE + 485)
#define VK_SYS_vmspace_create (VK_SYS_BASE + 486)
#define VK_SYS_vmspace_destroy (VK_SYS_BASE + 487)
#define VK_SYS_vmspace_ctl (VK_SYS_BASE + 488)
#define VK_SYS_vmspace_mmap (VK_SYS_BASE + 489)
#define VK_SYS_vmspace_munmap (VK_SYS_BASE + 490)
#define VK_SYS_vmspace_mcontrol (VK_SYS_BASE + 491)
#define VK_SYS_vmspace_pread (VK_SYS_BASE + 492)
#define VK_SYS_vmspace_pwrite (VK_SYS_BASE + 493)

/* ---- Address space ------------------------------------------------------ */

/*
 * Guest page size. Defined only if the C library has not (glibc's
 * <sys/user.h> and musl's <limits.h> define the same values).
 */
#ifndef PAGE_SHIFT
#define PAGE_SHIFT 12u
#endif
#ifndef PAGE_SIZE
#define PAGE_SIZE UINT64_C(4096)
#endif
/* Guest addresses lie in [0, VM_MAX_USER_ADDRESS) (vk_info.user_max). */
#define VM_MAX_USER_ADDRESS UINT64_C(0x00007FFFFFE00000)
/* Levels of page tables below the master PDE (vk_info.vpte_levels). */
#define VPTE_LEVELS 4u
/* Largest RAM size: the VPTE frame field addresses 2^48 bytes. */
#define RAM_SIZE_MAX (UINT64_C(1) << 48)

/* ---- mmap flags and mcontrol behaviours (ABI sections 4, 5, 7) ----------- */

/*
 * Meaningful only in vk_mmap and vmspace_mmap. Never pass it to Linux's
 * mmap(2): there the same bit is MAP_LOCKED.
 */
#define MAP_VPAGETABLE 0x2000

/* Hidden by glibc in strict ISO modes; the ABI uses them. Linux's values. */
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS 0x20
#endif
#ifndef MAP_STACK
#define MAP_STACK 0x20000
#endif

/*
 * mcontrol/vmspace_mcontrol behaviours. Never pass them to Linux's
 * madvise(2): there 10 and 11 are MADV_DONTFORK and MADV_DOFORK.
 */
#define MADV_INVAL 10  /* drop host translations in the range */
#define MADV_SETMAP 11 /* set the master PDE of VPAGETABLE mappings */

/* vmspace_ctl command: run guest user code until it traps. */
#define VMSPACE_CTL_RUN 1

/* ---- Virtual page table entries (ABI section 3) ------------------------- */

typedef uint64_t vpte_t;

#define VPTE_V UINT64_C(0x001)       /* valid; checked at every level */
#define VPTE_RW UINT64_C(0x002)      /* writable; checked for writes */
#define VPTE_U UINT64_C(0x004)       /* user; ignored by the host */
#define VPTE_A UINT64_C(0x020)       /* accessed; set by the host */
#define VPTE_M UINT64_C(0x040)       /* modified; set by the host on a write */
#define VPTE_PS UINT64_C(0x080)      /* stop the walk here (superpage) */
#define VPTE_G UINT64_C(0x100)       /* global; ignored by the host */
#define VPTE_WIRED UINT64_C(0x200)   /* ignored by the host */
#define VPTE_MANAGED UINT64_C(0x400) /* ignored by the host */
#define VPTE_NX (UINT64_C(1) << 63)  /* no-execute; checked for fetches */
#define VPTE_FRAME UINT64_C(0x000FFFFFFFFFF000)
/* Entries per table page. */
#define VPTE_ENTRIES ((size_t)512)
/* Shift of the page index for the first table below the master PDE. */
#define VPTE_TOP_SHIFT 36u

/* ---- Page-fault error bits (ABI section 6) ------------------------------ */

#define PGEX_P UINT64_C(0x01) /* protection (as opposed to not present) */
#define PGEX_W UINT64_C(0x02) /* write */
#define PGEX_U UINT64_C(0x04) /* user mode */
#define PGEX_I UINT64_C(0x10) /* instruction fetch */

/* ---- DragonFly trap numbers (machine/trap.h), in tf_trapno --------------- */

#define T_SIGNAL UINT64_C(0) /* a signal arrived (vkrun's value) */
#define T_PRIVINFLT UINT64_C(1)
#define T_BPTFLT UINT64_C(3)
#define T_ARITHTRAP UINT64_C(6)
#define T_ASTFLT UINT64_C(7)
#define T_PROTFLT UINT64_C(9)
#define T_TRCTRAP UINT64_C(10)
#define T_PAGEFLT UINT64_C(12)
#define T_ALIGNFLT UINT64_C(14)
#define T_DIVIDE UINT64_C(18)
#define T_NMI UINT64_C(19)
#define T_OFLOW UINT64_C(20)
#define T_BOUND UINT64_C(21)
#define T_DNA UINT64_C(22)
#define T_DOUBLEFLT UINT64_C(23)
#define T_FPOPFLT UINT64_C(24)
#define T_TSSFLT UINT64_C(25)
#define T_SEGNPFLT UINT64_C(26)
#define T_STKFLT UINT64_C(27)
#define T_MCHK UINT64_C(28)
#define T_XMMFLT UINT64_C(29)
#define T_RESERVED UINT64_C(30)
#define T_SYSCALL80 UINT64_C(0x80)
#define T_FAST_SYSCALL UINT64_C(0x81)

/* rflags bits a frame may carry into VMSPACE_CTL_RUN, and bits RUN sets. */
#define RFLAGS_USER_MASK UINT64_C(0x274DD5)
#define RFLAGS_USER_SET UINT64_C(0x202)

/* ---- Structures --------------------------------------------------------- */

/* Filled by vk_info (48 bytes). */
struct vk_info {
    uint32_t abi_version; /* VK_ABI_VERSION */
    uint32_t page_size;   /* PAGE_SIZE */
    int32_t ram_fd;       /* guest RAM memfd, as numbered in this process */
    uint32_t vpte_levels; /* VPTE_LEVELS */
    uint64_t ram_size;    /* bytes (the -m value) */
    uint64_t user_max;    /* VM_MAX_USER_ADDRESS */
    uint64_t reserved[2]; /* zero */
};

/* The guest user context's registers (200 bytes). */
struct trapframe {
    uint64_t tf_rdi;
    uint64_t tf_rsi;
    uint64_t tf_rdx;
    uint64_t tf_rcx;
    uint64_t tf_r8;
    uint64_t tf_r9;
    uint64_t tf_rax;
    uint64_t tf_rbx;
    uint64_t tf_rbp;
    uint64_t tf_r10;
    uint64_t tf_r11;
    uint64_t tf_r12;
    uint64_t tf_r13;
    uint64_t tf_r14;
    uint64_t tf_r15;
    uint64_t tf_xflags;
    uint64_t tf_trapno; /* T_* */
    uint64_t tf_addr;   /* fault address for T_PAGEFLT */
    uint64_t tf_flags;
    uint64_t tf_err; /* PGEX_* for T_PAGEFLT */
    uint64_t tf_rip;
    uint64_t tf_cs;
    uint64_t tf_rflags;
    uint64_t tf_rsp;
    uint64_t tf_ss;
};

/* One TLS segment base. */
struct tls_info {
    uint64_t base;
    int64_t size;
};

/* vx_tls[0] is the FS base, vx_tls[1] the GS base (32 bytes). */
struct vextframe {
    struct tls_info vx_tls[2];
};

#if defined(__cplusplus)
#define VK__STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define VK__STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#else /* C99: a negative array size fails the build */
#define VK__STATIC_ASSERT_NAME2(line) vk__static_assert_##line
#define VK__STATIC_ASSERT_NAME(line) VK__STATIC_ASSERT_NAME2(line)
#define VK__STATIC_ASSERT(cond, msg) \
    typedef char VK__STATIC_ASSERT_NAME(__LINE__)[(cond) ? 1 : -1]
#endif

VK__STATIC_ASSERT(sizeof(vpte_t) == 8, "vpte_t is 64 bits");
VK__STATIC_ASSERT(sizeof(struct vk_info) == 48, "struct vk_info is 48 bytes");
VK__STATIC_ASSERT(offsetof(struct vk_info, page_size) == 4, "vk_info.page_size");
VK__STATIC_ASSERT(offsetof(struct vk_info, ram_fd) == 8, "vk_info.ram_fd");
VK__STATIC_ASSERT(offsetof(struct vk_info, vpte_levels) == 12, "vk_info.vpte_levels");
VK__STATIC_ASSERT(offsetof(struct vk_info, ram_size) == 16, "vk_info.ram_size");
VK__STATIC_ASSERT(offsetof(struct vk_info, user_max) == 24, "vk_info.user_max");
VK__STATIC_ASSERT(offsetof(struct vk_info, reserved) == 32, "vk_info.reserved");
VK__STATIC_ASSERT(sizeof(struct trapframe) == 200, "struct trapframe is 200 bytes");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_rax) == 48, "trapframe.tf_rax");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_r10) == 72, "trapframe.tf_r10");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_r12) == 88, "trapframe.tf_r12");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_xflags) == 120, "trapframe.tf_xflags");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_trapno) == 128, "trapframe.tf_trapno");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_addr) == 136, "trapframe.tf_addr");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_err) == 152, "trapframe.tf_err");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_rip) == 160, "trapframe.tf_rip");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_rflags) == 176, "trapframe.tf_rflags");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_rsp) == 184, "trapframe.tf_rsp");
VK__STATIC_ASSERT(offsetof(struct trapframe, tf_ss) == 192, "trapframe.tf_ss");
VK__STATIC_ASSERT(sizeof(struct tls_info) == 16, "struct tls_info is 16 bytes");
VK__STATIC_ASSERT(offsetof(struct tls_info, size) == 8, "tls_info.size");
VK__STATIC_ASSERT(sizeof(struct vextframe) == 32, "struct vextframe is 32 bytes");
VK__STATIC_ASSERT((VK_SYS_BASE & (UINT64_C(1) << 30)) == 0, "VK_SYS_BASE has the x32 bit clear");

/* ---- Raw hypercalls ----------------------------------------------------- */

/*
 * The `syscall` instruction with number nr and six arguments in Linux's
 * registers (rdi, rsi, rdx, r10, r8, r9). Returns the raw result: a value in
 * [-4095, -1] is -errno. Clobbers rcx and r11; "memory" because the call may
 * read or write through its pointer arguments.
 */
static inline long vk_syscall6(long nr, long a0, long a1, long a2, long a3, long a4, long a5)
{
    register long r10 __asm__("r10") = a3;
    register long r8 __asm__("r8") = a4;
    register long r9 __asm__("r9") = a5;
    long ret;

    __asm__ __volatile__("syscall"
                         : "=a"(ret)
                         : "a"(nr), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8), "r"(r9)
                         : "rcx", "r11", "memory");
    return ret;
}

/*
 * Hypercall nr (a VK_SYS_* number) with six 64-bit arguments; returns the
 * raw result, -errno on failure (-ENOSYS without vkrun). The wrappers below
 * go through it; tests use it to see the errno without libc's convention.
 */
static inline long vk_raw_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2,
                                    uint64_t a3, uint64_t a4, uint64_t a5)
{
    return vk_syscall6((long)nr, (long)a0, (long)a1, (long)a2, (long)a3, (long)a4, (long)a5);
}

/* True if a raw result is -errno (Linux's convention: [-4095, -1]). */
static inline int vk_is_error(long ret)
{
    return (unsigned long)ret > (unsigned long)-4096L;
}

/* libc's convention: -1 with errno set on failure, else the raw result. */
static inline long vk__ret(long ret)
{
    if (vk_is_error(ret)) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

/* Argument conversions; ints are sign-extended as the Rust crate does. */
#define VK__PTR(p) ((uint64_t)(uintptr_t)(p))
#define VK__INT(i) ((uint64_t)(int64_t)(i))
#define VK__OFF(o) ((uint64_t)(int64_t)(o))

/* vmspace_mmap's fourth register: flags in the high half, prot in the low. */
static inline uint64_t vk_vmspace_mmap_prot_flags(int prot, int flags)
{
    return ((uint64_t)(uint32_t)flags << 32) | (uint64_t)(uint32_t)prot;
}

/* ---- Wrappers, with DragonFly's prototypes ------------------------------ */

/* Copies min(size, sizeof *out) bytes of the guest description. */
static inline int vk_info(struct vk_info *out, size_t size)
{
    return (int)vk__ret(vk_raw_hypercall(VK_SYS_vk_info, VK__PTR(out), (uint64_t)size, 0, 0, 0, 0));
}

/* mmap(2) that also understands MAP_VPAGETABLE; MAP_FAILED on error. */
static inline void *vk_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    long ret = vk_raw_hypercall(VK_SYS_vk_mmap, VK__PTR(addr), (uint64_t)len, VK__INT(prot),
                                VK__INT(flags), VK__INT(fd), VK__OFF(off));
    if (vk_is_error(ret)) {
        errno = (int)-ret;
        return MAP_FAILED;
    }
    return (void *)(uintptr_t)ret;
}

/* MADV_INVAL or MADV_SETMAP(value) on [addr, addr + len) of this process. */
static inline int mcontrol(void *addr, size_t len, int behav, off_t value)
{
    return (int)vk__ret(vk_raw_hypercall(VK_SYS_mcontrol, VK__PTR(addr), (uint64_t)len,
                                         VK__INT(behav), VK__OFF(value), 0, 0));
}

/* Create an empty vmspace named id (not NULL); type and data are unused. */
static inline int vmspace_create(void *id, int type, void *data)
{
    return (int)vk__ret(
        vk_raw_hypercall(VK_SYS_vmspace_create, VK__PTR(id), VK__INT(type), VK__PTR(data), 0, 0, 0));
}

static inline int vmspace_destroy(void *id)
{
    return (int)vk__ret(vk_raw_hypercall(VK_SYS_vmspace_destroy, VK__PTR(id), 0, 0, 0, 0, 0));
}

/* VMSPACE_CTL_RUN: run *tf / *vf in vmspace id until it traps; updates *tf. */
static inline int vmspace_ctl(void *id, int cmd, struct trapframe *tf, struct vextframe *vf)
{
    return (int)vk__ret(vk_raw_hypercall(VK_SYS_vmspace_ctl, VK__PTR(id), VK__INT(cmd), VK__PTR(tf),
                                         VK__PTR(vf), 0, 0));
}

/* mmap into vmspace id; prot and flags share one register (ABI section 1). */
static inline void *vmspace_mmap(void *id, void *addr, size_t len, int prot, int flags, int fd,
                                 off_t off)
{
    long ret = vk_raw_hypercall(VK_SYS_vmspace_mmap, VK__PTR(id), VK__PTR(addr), (uint64_t)len,
                                vk_vmspace_mmap_prot_flags(prot, flags), VK__INT(fd), VK__OFF(off));
    if (vk_is_error(ret)) {
        errno = (int)-ret;
        return MAP_FAILED;
    }
    return (void *)(uintptr_t)ret;
}

static inline int vmspace_munmap(void *id, void *addr, size_t len)
{
    return (int)vk__ret(
        vk_raw_hypercall(VK_SYS_vmspace_munmap, VK__PTR(id), VK__PTR(addr), (uint64_t)len, 0, 0, 0));
}

static inline int vmspace_mcontrol(void *id, void *addr, size_t len, int behav, off_t value)
{
    return (int)vk__ret(vk_raw_hypercall(VK_SYS_vmspace_mcontrol, VK__PTR(id), VK__PTR(addr),
                                         (uint64_t)len, VK__INT(behav), VK__OFF(value), 0));
}

/* Copy up to n bytes from vmspace address vaddr; a short count means the
 * next byte is not accessible. flags must be 0. */
static inline ssize_t vmspace_pread(void *id, void *buf, size_t n, int flags, off_t vaddr)
{
    return (ssize_t)vk__ret(vk_raw_hypercall(VK_SYS_vmspace_pread, VK__PTR(id), VK__PTR(buf),
                                             (uint64_t)n, VK__INT(flags), VK__OFF(vaddr), 0));
}

/* Copy up to n bytes to vmspace address vaddr; as vmspace_pread. */
static inline ssize_t vmspace_pwrite(void *id, const void *buf, size_t n, int flags, off_t vaddr)
{
    return (ssize_t)vk__ret(vk_raw_hypercall(VK_SYS_vmspace_pwrite, VK__PTR(id), VK__PTR(buf),
                                             (uint64_t)n, VK__INT(flags), VK__OFF(vaddr), 0));
}

#ifdef __cplusplus
}
#endif

#endif /* VKERNEL_H */
