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

/* ---- The fast RUN (ABI section 7, "The fast RUN") ----------------------- */

/*
 * vmspace_ctl(RUN) hands the registers to the calling thread's execution
 * context itself, through the context's block (one page, mapped once per
 * thread and vmspace), instead of through vkrun; vkrun offers it unless RUNs
 * are traced (vkrun -e trace=runs) or it runs with --run=hypercall, and the
 * raw hypercall is taken otherwise. The layout below is vkabi's
 * (vkabi::fastrun); c_header.rs checks it.
 */
#define VMSPACE_CTL_FASTINFO 0x564B0001 /* vkrun's ("VK" 1): fd | page << 32 of the block */
#define VK_FAST_OPEN_MAGIC UINT32_C(0x31435552)
#define VK_FAST_CX_STATE 0x000
#define VK_FAST_CX_SEQ 0x004
#define VK_FAST_CX_KICK 0x008
#define VK_FAST_CX_SIG 0x010
#define VK_FAST_CX_CODE 0x014
#define VK_FAST_CX_ADDR 0x018
#define VK_FAST_CX_SYSCALL 0x020
#define VK_FAST_CX_FS_OUT 0x028
#define VK_FAST_CX_GS_OUT 0x030
#define VK_FAST_CX_FS_IN 0x038
#define VK_FAST_CX_GS_IN 0x040
#define VK_FAST_CX_OPEN 0x060
#define VK_FAST_CX_BUSY 0x064
#define VK_FAST_CX_MASK_HELD 0x068
#define VK_FAST_CX_FAULT 0x06C
#define VK_FAST_CX_SAVED_MASK 0x070
#define VK_FAST_CX_FAULT_ADDR 0x078
#define VK_FAST_CX_FAULT_ERR 0x080
#define VK_FAST_CX_STUB_PID 0x088
#define VK_FAST_CX_CTX_TID 0x08C
#define VK_FAST_CX_KICK_AT 0x090
#define VK_FAST_CX_N_RUNS 0x098
#define VK_FAST_CX_N_SYSCALL 0x0A0
#define VK_FAST_CX_N_PAGEFAULT 0x0A8
#define VK_FAST_CX_N_TRAP 0x0B0
#define VK_FAST_CX_N_SIGNAL 0x0B8
#define VK_FAST_CX_NOTIF 0x0C0
#define VK_FAST_CX_LISTENER 0x0C4
#define VK_FAST_CX_NOTIF_ID 0x0C8
#define VK_FAST_CX_RECV_LOCK 0x0D0
#define VK_FAST_NR_REPORT 0x0DF00FFF
#define VK_FAST_FASTINFO_LISTENER 1
#define VK_FAST_CX_IN 0x100
#define VK_FAST_CX_OUT 0x200
#define VK_FAST_GREGS_IN 18
#define VK_FAST_GREGS 23
#define VK_FAST_STATE_WAIT 0
#define VK_FAST_STATE_GO 1
#define VK_FAST_STATE_RUNNING 2
#define VK_FAST_STATE_EXIT 3
#define VK_FAST_KICK_SIGNAL 23

#if defined(__cplusplus)
#define VK__TLS thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define VK__TLS _Thread_local
#else
#define VK__TLS __thread
#endif
#define VK__FAST_ENTRIES 8

/* This thread's blocks (a forked child, whose thread id differs, starts
 * afresh and unmaps what it inherited). */
struct vk__fast_cache {
    long tid;
    int off;                   /* vkrun does not offer the fast path */
    const void *tf, *vf;       /* the frames last checked accessible */
    struct {
        void *id;
        unsigned char *block;
        int listener; /* the context's, when it reports by notification */
        int retry;    /* the last RUN returned a data T_PAGEFLT */
    } e[VK__FAST_ENTRIES];
};
static VK__TLS struct vk__fast_cache vk__fc;

static inline uint32_t vk__ld32(unsigned char *b, int off)
{
    return __atomic_load_n((uint32_t *)(void *)(b + off), __ATOMIC_ACQUIRE);
}
static inline void vk__st32(unsigned char *b, int off, uint32_t v)
{
    __atomic_store_n((uint32_t *)(void *)(b + off), v, __ATOMIC_SEQ_CST);
}
static inline uint64_t vk__ld64(unsigned char *b, int off)
{
    return __atomic_load_n((uint64_t *)(void *)(b + off), __ATOMIC_ACQUIRE);
}
static inline void vk__st64(unsigned char *b, int off, uint64_t v)
{
    __atomic_store_n((uint64_t *)(void *)(b + off), v, __ATOMIC_RELAXED);
}
static inline void vk__inc64(unsigned char *b, int off)
{
    __atomic_fetch_add((uint64_t *)(void *)(b + off), 1, __ATOMIC_RELAXED);
}

static inline int vk__canonical(uint64_t a)
{
    int64_t top = (int64_t)a >> 47;
    return top == 0 || top == -1;
}

/* Whether n bytes at p can be read and written (EFAULT otherwise). */
static inline int vk__accessible(const void *p, size_t n)
{
    unsigned char tmp[200];
    uint64_t local[2] = {VK__PTR(tmp), (uint64_t)n};
    uint64_t remote[2] = {VK__PTR(p), (uint64_t)n};
    long pid = vk_syscall6(39, 0, 0, 0, 0, 0, 0);
    if (n > sizeof tmp)
        return 0;
    if (vk_syscall6(310, pid, (long)VK__PTR(local), 1, (long)VK__PTR(remote), 1, 0) != (long)n)
        return 0;
    return vk_syscall6(311, pid, (long)VK__PTR(local), 1, (long)VK__PTR(remote), 1, 0) == (long)n;
}

static inline void vk__fast_drop(int i)
{
    if (vk__fc.e[i].block) {
        vk_syscall6(11, (long)VK__PTR(vk__fc.e[i].block), 4096, 0, 0, 0, 0);
        vk_syscall6(3, vk__fc.e[i].listener, 0, 0, 0, 0, 0);
    }
    vk__fc.e[i].block = 0;
    vk__fc.e[i].id = 0;
    vk__fc.e[i].retry = 0;
}

/* This thread's block for vmspace id, or NULL (take the hypercall). */
static inline unsigned char *vk__fast_block(void *id, int *slot)
{
    long tid = vk_syscall6(186, 0, 0, 0, 0, 0, 0);
    long r, at;
    int i, free_slot = -1;
    if (vk__fc.tid != tid) {
        for (i = 0; i < VK__FAST_ENTRIES; i++)
            vk__fast_drop(i);
        vk__fc.tid = tid;
        vk__fc.tf = vk__fc.vf = 0;
    }
    for (i = 0; i < VK__FAST_ENTRIES; i++) {
        if (vk__fc.e[i].block && vk__fc.e[i].id == id) {
            *slot = i;
            return vk__fc.e[i].block;
        }
        if (!vk__fc.e[i].block && free_slot < 0)
            free_slot = i;
    }
    if (vk__fc.off || free_slot < 0)
        return 0;
    r = vk_raw_hypercall(VK_SYS_vmspace_ctl, VK__PTR(id), VMSPACE_CTL_FASTINFO, 0, 0, 0, 0);
    if (r == -EOPNOTSUPP || r == -ENOSYS) {
        vk__fc.off = 1;
        return 0;
    }
    if (r < 0)
        return 0;
    at = vk_syscall6(9, 0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, (long)(uint32_t)r,
                     (long)(((uint64_t)r >> 32) << 12));
    vk_syscall6(3, (long)(uint32_t)r, 0, 0, 0, 0, 0);
    if (vk_is_error(at))
        return 0;
    /* The context's listener, if it reports by notification. */
    r = vk_raw_hypercall(VK_SYS_vmspace_ctl, VK__PTR(id), VMSPACE_CTL_FASTINFO,
                         VK_FAST_FASTINFO_LISTENER, 0, 0, 0);
    if (r < 0 && vk__ld32((unsigned char *)(uintptr_t)at, VK_FAST_CX_NOTIF)) {
        /* Not had (a signal interrupted the question): the hypercall this
         * time, the question again next time. */
        vk_syscall6(11, at, 4096, 0, 0, 0, 0);
        return 0;
    }
    vk__fc.e[free_slot].listener = r < 0 ? -1 : (int)r;
    vk__fc.e[free_slot].id = id;
    vk__fc.e[free_slot].block = (unsigned char *)(uintptr_t)at;
    *slot = free_slot;
    return vk__fc.e[free_slot].block;
}

/* Receive the context's next report notification within ms; its id is
 * kept in the block for the next go. */
static inline int vk__fast_recv(unsigned char *b, int l, int ms)
{
    uint64_t notif[10] = {0};
    struct {
        int fd;
        short events, revents;
    } pfd = {l, 1 /* POLLIN */, 0};
    long n = vk_syscall6(7, (long)VK__PTR(&pfd), 1, ms, 0, 0, 0);
    if (n <= 0)
        return 0;
    if (!(pfd.revents & 1)) {
        /* no task left on the filter: the stub is dying */
        int64_t ts[2] = {0, 10000000};
        vk_syscall6(202, (long)VK__PTR(b + VK_FAST_CX_SEQ), 0, (long)vk__ld32(b, VK_FAST_CX_SEQ),
                    (long)VK__PTR(ts), 0, 0);
        return 0;
    }
    {
        /* One receiver at a time, and only while one is pending: a receive
         * with none pending would block for good. A holder that keeps the
         * lock for long (the user code can write the block) loses it. */
        uint32_t *lock = (uint32_t *)(void *)(b + VK_FAST_CX_RECV_LOCK);
        uint32_t zero;
        int tries, got = 0;
        for (tries = 0; tries < 100; tries++) {
            int64_t ts[2] = {0, 1000000};
            zero = 0;
            if (__atomic_compare_exchange_n(lock, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                break;
            vk_syscall6(202, (long)VK__PTR(lock), 0, 1, (long)VK__PTR(ts), 0, 0);
        }
        __atomic_store_n(lock, 1, __ATOMIC_RELEASE);
        pfd.revents = 0;
        if (vk_syscall6(7, (long)VK__PTR(&pfd), 1, 0, 0, 0, 0) == 1 && (pfd.revents & 1) &&
            vk_syscall6(16, l, (long)0xC0502100 /* NOTIF_RECV */, (long)VK__PTR(notif), 0, 0, 0) == 0) {
            __atomic_store_n((uint64_t *)(void *)(b + VK_FAST_CX_NOTIF_ID), notif[0],
                             __ATOMIC_RELEASE);
            got = 1;
        }
        __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
        return got;
    }
}

/* Answer the notification the context sleeps in with value 0 (go) or
 * error -ENOSYS (the user code's own report call). */
static inline long vk__fast_send(unsigned char *b, int l, int32_t error)
{
    uint64_t resp[3];
    resp[0] = vk__ld64(b, VK_FAST_CX_NOTIF_ID);
    resp[1] = 0;
    resp[2] = (uint64_t)(uint32_t)error;
    return vk_syscall6(16, l, (long)0xC0182101 /* NOTIF_SEND */, (long)VK__PTR(resp), 0, 0, 0);
}

/* Wake the context to look at its state. */
static inline void vk__fast_go(unsigned char *b, int l)
{
    int i;
    if (l < 0) {
        vk_syscall6(202, (long)VK__PTR(b + VK_FAST_CX_STATE), 1 /* FUTEX_WAKE */, 1, 0, 0, 0);
        return;
    }
    /* Refused: the report it answers was received by someone else's wait
     * first, or not yet: receive it, answer it. */
    for (i = 0; i < 2; i++)
        if (vk__fast_send(b, l, 0) == 0 || !vk__fast_recv(b, l, 100))
            return;
}

static inline void vk__fast_post(unsigned char *b, int l, const uint64_t *g, uint64_t fs,
                                 uint64_t gs)
{
    int i;
    for (i = 0; i < VK_FAST_GREGS_IN; i++)
        vk__st64(b, VK_FAST_CX_IN + 8 * i, g[i]);
    vk__st64(b, VK_FAST_CX_FS_IN, fs);
    vk__st64(b, VK_FAST_CX_GS_IN, gs);
    vk__st32(b, VK_FAST_CX_STATE, VK_FAST_STATE_GO);
    vk__fast_go(b, l);
}

/* The end of a fast RUN: not busy; signals vkrun held are let through. */
static inline void vk__fast_finish(unsigned char *b)
{
    vk__st32(b, VK_FAST_CX_KICK, 0);
    vk__st64(b, VK_FAST_CX_KICK_AT, 0);
    vk__st32(b, VK_FAST_CX_BUSY, 0);
    if (__atomic_exchange_n((uint32_t *)(void *)(b + VK_FAST_CX_MASK_HELD), 0, __ATOMIC_SEQ_CST)) {
        uint64_t mask = vk__ld64(b, VK_FAST_CX_SAVED_MASK);
        vk_syscall6(14, 2 /* SIG_SETMASK */, (long)VK__PTR(&mask), 0, 8, 0, 0);
    }
}

/* Whether the context can still report (its thread lives, a kick for a
 * signal has not been ignored for 5 s). */
static inline int vk__fast_alive(unsigned char *b)
{
    long pid = (long)vk__ld32(b, VK_FAST_CX_STUB_PID), tid = (long)vk__ld32(b, VK_FAST_CX_CTX_TID);
    uint64_t at = vk__ld64(b, VK_FAST_CX_KICK_AT);
    if (pid == 0 || tid == 0 || vk_syscall6(234, pid, tid, 0, 0, 0, 0) == -3 /* ESRCH */)
        return 0;
    if (at) {
        int64_t ts[2] = {0, 0};
        uint64_t now;
        vk_syscall6(228, 1 /* CLOCK_MONOTONIC */, (long)VK__PTR(ts), 0, 0, 0, 0);
        now = (uint64_t)ts[0] * UINT64_C(1000000000) + (uint64_t)ts[1];
        if (now > at && now - at > UINT64_C(5000000000))
            return 0;
    }
    return 1;
}

/* The trap of a report (x86 exception numbers to DragonFly's T_*), as
 * vkabi::fastrun::Report::trap. */
static inline void vk__fast_trap(uint32_t sig, int32_t code, uint64_t addr, uint64_t sysc,
                                 const uint64_t *g, uint64_t out[3])
{
    uint64_t hw = g[20], err = g[19];
    out[1] = err;
    out[2] = 0;
    switch (sig) {
    case 31: /* SIGSYS */
        if ((uint32_t)(sysc >> 32) == UINT32_C(0x40000003)) {
            out[0] = T_SYSCALL80;
            out[1] = 0;
        } else {
            out[0] = T_FAST_SYSCALL;
            out[1] = 2;
        }
        return;
    case 11: /* SIGSEGV */
        if (hw == 14) {
            out[0] = T_PAGEFLT;
            out[1] = (err & (PGEX_P | PGEX_W | PGEX_U | PGEX_I)) | (code == 2 ? PGEX_P : 0);
            out[2] = g[22];
        } else
            out[0] = hw == 11 ? T_SEGNPFLT : hw == 12 ? T_STKFLT : T_PROTFLT;
        return;
    case 7: /* SIGBUS */
        if (hw == 17)
            out[0] = T_ALIGNFLT;
        else {
            out[0] = T_PAGEFLT;
            out[1] = PGEX_U;
            out[2] = addr;
        }
        return;
    case 4: out[0] = T_PRIVINFLT; return;
    case 5: out[0] = hw == 1 ? T_TRCTRAP : T_BPTFLT; return;
    case 8: out[0] = hw == 16 ? T_ARITHTRAP : hw == 19 ? T_XMMFLT : T_DIVIDE; return;
    default: out[0] = T_SIGNAL; out[1] = 0; return;
    }
}

static inline void vk__fast_frame(const uint64_t *g, const uint64_t trap[3], uint64_t fs,
                                  uint64_t gs, struct trapframe *tf, struct vextframe *vf)
{
    tf->tf_r8 = g[0]; tf->tf_r9 = g[1]; tf->tf_r10 = g[2]; tf->tf_r11 = g[3];
    tf->tf_r12 = g[4]; tf->tf_r13 = g[5]; tf->tf_r14 = g[6]; tf->tf_r15 = g[7];
    tf->tf_rdi = g[8]; tf->tf_rsi = g[9]; tf->tf_rbp = g[10]; tf->tf_rbx = g[11];
    tf->tf_rdx = g[12]; tf->tf_rax = g[13]; tf->tf_rcx = g[14]; tf->tf_rsp = g[15];
    tf->tf_rip = g[16]; tf->tf_rflags = g[17];
    tf->tf_cs = 0x33;
    tf->tf_ss = 0x2b;
    tf->tf_trapno = trap[0];
    tf->tf_err = trap[1];
    tf->tf_addr = trap[2];
    vf->vx_tls[0].base = fs;
    vf->vx_tls[1].base = gs;
}

/* vmspace_ctl(RUN) on the fast path: the raw result, or 1 for "not taken"
 * (take the hypercall). */
static inline long vk__fast_run(void *id, struct trapframe *tf, struct vextframe *vf)
{
    unsigned char *b;
    uint64_t g[VK_FAST_GREGS], trap[3];
    uint32_t seen, seq, sig;
    int slot = 0, i, l;
    if (id == 0 || vk__fc.off)
        return 1;
    b = vk__fast_block(id, &slot);
    if (!b)
        return 1;
    if (tf != vk__fc.tf || vf != vk__fc.vf) {
        if (!vk__accessible(tf, sizeof *tf) || !vk__accessible(vf, sizeof *vf))
            return -EFAULT;
        vk__fc.tf = tf;
        vk__fc.vf = vf;
    }
    if (!vk__canonical(vf->vx_tls[0].base) || !vk__canonical(vf->vx_tls[1].base))
        return -EINVAL;
    if (vk__fc.e[slot].retry) {
        /* The retry of a fault takes the hypercall: vkrun installs the page
         * the vkernel has just mapped before the user code runs. */
        vk__fc.e[slot].retry = 0;
        return 1;
    }
    l = vk__fc.e[slot].listener;
    vk__st32(b, VK_FAST_CX_KICK, 0);
    vk__st64(b, VK_FAST_CX_KICK_AT, 0);
    vk__st32(b, VK_FAST_CX_BUSY, 1);
    if (vk__ld32(b, VK_FAST_CX_OPEN) != VK_FAST_OPEN_MAGIC ||
        vk__ld32(b, VK_FAST_CX_STATE) != VK_FAST_STATE_WAIT) {
        vk__fast_finish(b);
        vk__fast_drop(slot);
        return 1;
    }
    g[0] = tf->tf_r8; g[1] = tf->tf_r9; g[2] = tf->tf_r10; g[3] = tf->tf_r11;
    g[4] = tf->tf_r12; g[5] = tf->tf_r13; g[6] = tf->tf_r14; g[7] = tf->tf_r15;
    g[8] = tf->tf_rdi; g[9] = tf->tf_rsi; g[10] = tf->tf_rbp; g[11] = tf->tf_rbx;
    g[12] = tf->tf_rdx; g[13] = tf->tf_rax; g[14] = tf->tf_rcx; g[15] = tf->tf_rsp;
    g[16] = tf->tf_rip;
    g[17] = (tf->tf_rflags & RFLAGS_USER_MASK) | RFLAGS_USER_SET;
    seen = vk__ld32(b, VK_FAST_CX_SEQ);
    vk__fast_post(b, l, g, vf->vx_tls[0].base, vf->vx_tls[1].base);
    for (;;) {
        if (l >= 0) {
            /* Notification mode: receive each report's notification
             * before reading the report, so that the next go answers it. */
            if (!vk__fast_recv(b, l, 100)) {
                if (vk__ld32(b, VK_FAST_CX_OPEN) != VK_FAST_OPEN_MAGIC || !vk__fast_alive(b)) {
                    vk__fast_finish(b);
                    vk__fast_drop(slot);
                    return -EIO;
                }
                if (vk__ld32(b, VK_FAST_CX_SEQ) == seen) {
                    if (vk__ld32(b, VK_FAST_CX_STATE) == VK_FAST_STATE_GO)
                        vk__fast_go(b, l); /* its notification went elsewhere */
                    continue;
                }
                /* reported, received by an earlier wait: read the report */
            } else if (vk__ld32(b, VK_FAST_CX_SEQ) == seen) {
                /* no report: go again, or the user code's own report call */
                if (vk__ld32(b, VK_FAST_CX_STATE) == VK_FAST_STATE_GO)
                    vk__fast_go(b, l);
                else
                    vk__fast_send(b, l, -ENOSYS);
                continue;
            }
        }
        seq = vk__ld32(b, VK_FAST_CX_SEQ);
        if (seq == seen) {
            int64_t ts[2] = {0, 100000000};
            if (vk__ld32(b, VK_FAST_CX_OPEN) != VK_FAST_OPEN_MAGIC ||
                (vk_syscall6(202, (long)VK__PTR(b + VK_FAST_CX_SEQ), 0 /* FUTEX_WAIT */,
                             (long)seq, (long)VK__PTR(ts), 0, 0) == -110 /* ETIMEDOUT */ &&
                 !vk__fast_alive(b))) {
                vk__fast_finish(b);
                vk__fast_drop(slot);
                return -EIO;
            }
            continue;
        }
        seen = seq;
        for (i = 0; i < VK_FAST_GREGS; i++)
            g[i] = vk__ld64(b, VK_FAST_CX_OUT + 8 * i);
        sig = vk__ld32(b, VK_FAST_CX_SIG);
        {
            int32_t code = (int32_t)vk__ld32(b, VK_FAST_CX_CODE);
            uint64_t addr = vk__ld64(b, VK_FAST_CX_ADDR), sysc = vk__ld64(b, VK_FAST_CX_SYSCALL);
            uint64_t fs = vk__ld64(b, VK_FAST_CX_FS_OUT), gs = vk__ld64(b, VK_FAST_CX_GS_OUT);
            if (sig == 4 && code == 0x80 && g[14] == g[16] && g[13] == UINT64_MAX) {
                /* uretprobe (335) past the filter: the user code's call */
                sig = 31;
                sysc = 335 | (UINT64_C(0xC000003E) << 32);
                g[13] = 335;
            }
            if (sig == VK_FAST_KICK_SIGNAL) {
                if (__atomic_exchange_n((uint32_t *)(void *)(b + VK_FAST_CX_FAULT), 0,
                                        __ATOMIC_ACQ_REL)) {
                    trap[0] = T_PAGEFLT;
                    trap[1] = vk__ld64(b, VK_FAST_CX_FAULT_ERR);
                    trap[2] = vk__ld64(b, VK_FAST_CX_FAULT_ADDR);
                } else if (vk__ld32(b, VK_FAST_CX_KICK)) {
                    trap[0] = T_SIGNAL;
                    trap[1] = trap[2] = 0;
                } else {
                    vk__fast_post(b, l, g, fs, gs); /* a stale kick: carry on */
                    continue;
                }
            } else
                vk__fast_trap(sig, code, addr, sysc, g, trap);
            vk__fast_frame(g, trap, fs, gs, tf, vf);
            if (trap[0] == T_PAGEFLT && sig == 11) {
                /* A window fault vkrun may resolve: go on through the
                 * hypercall from where the user code stopped, unless a
                 * signal waits (RUN then ends for it). */
                int held = vk__ld32(b, VK_FAST_CX_MASK_HELD) != 0;
                if (held) {
                    tf->tf_trapno = T_SIGNAL;
                    tf->tf_err = tf->tf_addr = 0;
                    vk__inc64(b, VK_FAST_CX_N_RUNS);
                    vk__inc64(b, VK_FAST_CX_N_SIGNAL);
                }
                vk__fast_finish(b);
                if (held)
                    return 0;
                return vk_raw_hypercall(VK_SYS_vmspace_ctl, VK__PTR(id), VMSPACE_CTL_RUN,
                                        VK__PTR(tf), VK__PTR(vf), 0, 0);
            }
        }
        vk__inc64(b, VK_FAST_CX_N_RUNS);
        vk__inc64(b, trap[0] == T_FAST_SYSCALL || trap[0] == T_SYSCALL80 ? VK_FAST_CX_N_SYSCALL
                     : trap[0] == T_PAGEFLT                            ? VK_FAST_CX_N_PAGEFAULT
                     : trap[0] == T_SIGNAL                             ? VK_FAST_CX_N_SIGNAL
                                                                       : VK_FAST_CX_N_TRAP);
        vk__fast_finish(b);
        return 0;
    }
}

/* VMSPACE_CTL_RUN: run *tf / *vf in vmspace id until it traps; updates *tf.
 * Takes the fast RUN when vkrun offers it, the hypercall otherwise. */
static inline int vmspace_ctl(void *id, int cmd, struct trapframe *tf, struct vextframe *vf)
{
    if (cmd == VMSPACE_CTL_RUN) {
        long r = vk__fast_run(id, tf, vf);
        int i;
        if (r == 1)
            r = vk_raw_hypercall(VK_SYS_vmspace_ctl, VK__PTR(id), VK__INT(cmd), VK__PTR(tf),
                                 VK__PTR(vf), 0, 0);
        for (i = 0; i < VK__FAST_ENTRIES; i++)
            if (vk__fc.e[i].block && vk__fc.e[i].id == id)
                vk__fc.e[i].retry = r == 0 && tf->tf_trapno == T_PAGEFLT && !(tf->tf_err & PGEX_I);
        return (int)vk__ret(r);
    }
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
