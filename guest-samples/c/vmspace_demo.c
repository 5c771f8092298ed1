/*
 * vmspace_demo.c - the C twin of vmspace-demo's demo: a small vkernel that
 * runs a user program in a vmspace through page tables it builds in guest
 * RAM (ABI section 7), with nothing but vkernel.h.
 *
 * It maps guest RAM as its direct map (DMAP), starts a 4-level table in it
 * (frames from 1 MiB up, via vpt_tables.h), creates a vmspace, maps one
 * MAP_SHARED|MAP_VPAGETABLE|MAP_FIXED window over [USER_BASE, user_max) with
 * file offset USER_BASE (so page index = va >> 12), points it at the table
 * with vmspace_mcontrol(MADV_SETMAP), copies the demo program (the same
 * bytes as the Rust guest: guest-samples/vmspace-demo/src/user.s) into RAM
 * frames and maps only its code (V|U). Then it loops on
 * vmspace_ctl(VMSPACE_CTL_RUN):
 *
 *   T_PAGEFLT on an unmapped heap or stack page: a fresh frame, leaf
 *     V|RW|U|NX, RUN again; anything else is SIGSEGV for the user program;
 *   T_FAST_SYSCALL: write(1|2, buf, n) (bytes read with vmspace_pread),
 *     getpid() (answers 1), exit(code); other numbers answer -ENOSYS;
 *   T_SIGNAL: RUN again; other traps kill the user program.
 *
 * Output, as vmspace-demo's:
 *
 *   primes below 100000: 9592, sum 454396537
 *   fib(90): 2880067194370816120
 *   sum(1..1000) by recursion: 500500
 *   vmspace_demo.c: 43 page faults served, 4 syscalls, exit 0
 *
 * Exit status: the user program's exit code; 128 + signal when a trap
 * killed it; 1 when the vkernel fails (`vk_info: Function not implemented`
 * on stderr without vkrun, or `vmspace_demo.c: <call>: <error>`).
 *
 * Build (the user program is linked in from the Rust crate's assembly):
 *   gcc -O2 -Wall -I guest-samples/include guest-samples/c/vmspace_demo.c \
 *       guest-samples/vmspace-demo/src/user.s
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vkernel.h"

/* The user address space; see guest-samples/vmspace-demo/src/kernel.rs. */
#define USER_BASE UINT64_C(0x400000)         /* window start and offset; code */
#define HEAP_BASE UINT64_C(0x10000000)       /* demand-zero heap ... */
#define HEAP_SIZE (UINT64_C(1) << 32)        /* ... of 4 GiB */
#define STACK_SIZE (UINT64_C(8) << 20)       /* demand-zero stack below user_max */
#define FIRST_FRAME (UINT64_C(1) << 20)      /* frames below stay unused */
#define TABLE_BITS (VPTE_V | VPTE_RW | VPTE_U)
#define CODE_BITS (VPTE_V | VPTE_U)          /* read and execute */
#define DATA_BITS (VPTE_V | VPTE_RW | VPTE_U | VPTE_NX) /* read and write */
#define USER_PID 1
#define MAX_IO 65536

/* Linux's numbers, which the user program uses. */
#define SYS_WRITE 1
#define SYS_GETPID 39
#define SYS_EXIT 60
#define SYS_EXIT_GROUP 231

/* The demo program's bytes, from user.s; its entry point is the first. */
extern const unsigned char vmspace_user_demo_start[], vmspace_user_demo_end[];

/* What vpt_tables.h builds on: the DMAP, the next free frame, the L4 table. */
static char *dmap;
static uint64_t next_frame = FIRST_FRAME, root;
#include "vpt_tables.h"

static struct vk_info info;
/* Its address is the vmspace's id, as DragonFly uses its pmap's. */
static char vmspace_token;
#define VM ((void *)&vmspace_token)

static uint64_t page_faults, syscalls;

/* Say which call failed and why; the vkernel's failure status. */
static int failed(const char *call)
{
    fprintf(stderr, "vmspace_demo.c: %s: %s\n", call, strerror(errno));
    return 1;
}

/* Whether the tables can take one more leaf: its frame and up to three
 * new tables on its way. */
static int room_for_a_page(void)
{
    return next_frame + 4 * PAGE_SIZE <= info.ram_size;
}

/* Map the page at va to frame with the leaf bits (V included). */
static void map_page(uint64_t va, uint64_t frame, uint64_t bits)
{
    *(volatile vpte_t *)entry_for_with(va >> PAGE_SHIFT, TABLE_BITS) = frame | bits;
}

/* The leaf for va, or 0 if an entry on the way is not valid. Reads only. */
static vpte_t lookup(uint64_t va)
{
    uint64_t pindex = va >> PAGE_SHIFT, table = root;

    for (int shift = VPTE_TOP_SHIFT - 9; shift >= 0; shift -= 9) {
        vpte_t e = *(volatile vpte_t *)(dmap + table + 8 * ((pindex >> shift) & 511));
        if (!(e & VPTE_V) || shift == 0)
            return e & VPTE_V ? e : 0;
        table = e & VPTE_FRAME;
    }
    return 0;
}

/* Whether va lies in the heap or the stack. */
static int demand_zero(uint64_t va)
{
    return (va >= HEAP_BASE && va < HEAP_BASE + HEAP_SIZE) ||
           (va >= info.user_max - STACK_SIZE && va < info.user_max);
}

/* The signal a BSD kernel sends for user trap t, 0 if user code cannot
 * raise it. */
static int trap_signal(uint64_t t)
{
    switch (t) {
    case T_PRIVINFLT:
    case T_FPOPFLT:
        return SIGILL;
    case T_BPTFLT:
    case T_TRCTRAP:
        return SIGTRAP;
    case T_ARITHTRAP:
    case T_DIVIDE:
    case T_OFLOW:
    case T_BOUND:
    case T_XMMFLT:
        return SIGFPE;
    case T_PROTFLT:
    case T_SEGNPFLT:
    case T_STKFLT:
    case T_TSSFLT:
    case T_ALIGNFLT:
        return SIGBUS;
    case T_SYSCALL80:
        return SIGSEGV;
    default:
        return 0;
    }
}

/* The signal's name, for messages. */
static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGILL:
        return "SIGILL";
    case SIGTRAP:
        return "SIGTRAP";
    case SIGFPE:
        return "SIGFPE";
    case SIGBUS:
        return "SIGBUS";
    case SIGSEGV:
        return "SIGSEGV";
    default:
        return "a signal";
    }
}

/* write(fd, buf, n) for fds 1 and 2: the bytes come out of the vmspace with
 * vmspace_pread. Returns the count or -errno. */
static long sys_write(uint64_t fd, uint64_t buf, uint64_t n)
{
    static char bytes[MAX_IO];
    ssize_t got;
    size_t done = 0;

    if (fd != 1 && fd != 2)
        return -EBADF;
    if (n == 0)
        return 0;
    if (n > MAX_IO)
        n = MAX_IO;
    got = vmspace_pread(VM, bytes, (size_t)n, 0, (off_t)buf);
    if (got < 0 && errno != EFAULT) {
        failed("vmspace_pread");
        exit(1);
    }
    if (got <= 0)
        return -EFAULT;
    while (done < (size_t)got) {
        ssize_t w = write((int)fd, bytes + done, (size_t)got - done);
        if (w < 0)
            return -errno;
        done += (size_t)w;
    }
    return got;
}

/* Serve the system call in tf; 1 when it was exit. */
static int serve_syscall(struct trapframe *tf)
{
    long ret;

    syscalls++;
    switch (tf->tf_rax) {
    case SYS_WRITE:
        ret = sys_write(tf->tf_rdi, tf->tf_rsi, tf->tf_rdx);
        break;
    case SYS_GETPID:
        ret = USER_PID;
        break;
    case SYS_EXIT:
    case SYS_EXIT_GROUP:
        return 1;
    default:
        ret = -ENOSYS;
        break;
    }
    tf->tf_rax = (uint64_t)ret;
    return 0;
}

/* Serve a T_PAGEFLT: 0 when the page is mapped now, SIGSEGV when the user
 * program must die. Exits 1 if the tables already allow the access (the
 * host should have resolved it) or RAM runs out. */
static int serve_page_fault(const struct trapframe *tf)
{
    uint64_t va = tf->tf_addr, err = tf->tf_err;
    vpte_t leaf;

    if (va < USER_BASE || va >= info.user_max)
        return SIGSEGV;
    leaf = lookup(va);
    if (leaf) {
        if (((err & PGEX_W) && !(leaf & VPTE_RW)) || ((err & PGEX_I) && (leaf & VPTE_NX)))
            return SIGSEGV;
        fprintf(stderr,
                "vmspace_demo.c: T_PAGEFLT at %#" PRIx64 " (err %#" PRIx64 ", rip %#" PRIx64
                "), but the tables map it with %#" PRIx64 ": the host did not resolve a valid entry\n",
                va, err, tf->tf_rip, leaf);
        exit(1);
    }
    if (!demand_zero(va))
        return SIGSEGV;
    if (!room_for_a_page()) {
        fprintf(stderr, "vmspace_demo.c: out of guest RAM (try a larger -m)\n");
        exit(1);
    }
    /* A fresh frame from the bump pointer: alloc_frame() clears it. */
    map_page(va, alloc_frame(), DATA_BITS);
    page_faults++;
    return 0;
}

/* Copy the demo program into frames and map it at USER_BASE. */
static int load_program(void)
{
    size_t len = (size_t)(vmspace_user_demo_end - vmspace_user_demo_start);

    for (size_t off = 0; off < len; off += PAGE_SIZE) {
        size_t n = len - off < PAGE_SIZE ? len - off : PAGE_SIZE;
        uint64_t frame;

        if (!room_for_a_page())
            return -1;
        frame = alloc_frame();
        memcpy(dmap + frame, vmspace_user_demo_start + off, n);
        map_page(USER_BASE + off, frame, CODE_BITS);
    }
    return 0;
}

int main(void)
{
    struct trapframe tf;
    struct vextframe vf;
    uint64_t len;
    void *p;
    int sig = 0;

    if (vk_info(&info, sizeof info) != 0) {
        fprintf(stderr, "vk_info: %s\n", strerror(errno));
        return 1;
    }
    p = mmap(NULL, (size_t)info.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.ram_fd, 0);
    if (p == MAP_FAILED)
        return failed("mmap of ram_fd");
    dmap = p;
    if (info.ram_size < FIRST_FRAME + 64 * PAGE_SIZE) {
        fprintf(stderr, "vmspace_demo.c: guest RAM too small\n");
        return 1;
    }
    root = alloc_frame();
    if (load_program() != 0) {
        fprintf(stderr, "vmspace_demo.c: out of guest RAM for the code\n");
        return 1;
    }

    if (vmspace_create(VM, 0, NULL) != 0)
        return failed("vmspace_create");
    len = info.user_max - USER_BASE;
    p = vmspace_mmap(VM, (void *)(uintptr_t)USER_BASE, (size_t)len,
                     PROT_READ | PROT_WRITE | PROT_EXEC,
                     MAP_SHARED | MAP_VPAGETABLE | MAP_FIXED, info.ram_fd, (off_t)USER_BASE);
    if (p == MAP_FAILED)
        return failed("vmspace_mmap");
    if ((uintptr_t)p != USER_BASE) {
        fprintf(stderr, "vmspace_demo.c: vmspace_mmap(MAP_FIXED) returned %p\n", p);
        return 1;
    }
    if (vmspace_mcontrol(VM, p, (size_t)len, MADV_SETMAP, (off_t)(root | TABLE_BITS)) != 0)
        return failed("vmspace_mcontrol(MADV_SETMAP)");

    memset(&tf, 0, sizeof tf);
    memset(&vf, 0, sizeof vf);
    tf.tf_rip = USER_BASE;
    tf.tf_rsp = info.user_max;
    tf.tf_rdi = HEAP_BASE;
    tf.tf_rflags = RFLAGS_USER_SET;
    for (;;) {
        if (vmspace_ctl(VM, VMSPACE_CTL_RUN, &tf, &vf) != 0)
            return failed("vmspace_ctl(VMSPACE_CTL_RUN)");
        if (tf.tf_trapno == T_FAST_SYSCALL) {
            if (serve_syscall(&tf))
                break;
        } else if (tf.tf_trapno == T_PAGEFLT) {
            sig = serve_page_fault(&tf);
            if (sig)
                break;
        } else if (tf.tf_trapno != T_SIGNAL) {
            sig = trap_signal(tf.tf_trapno);
            if (!sig) {
                fprintf(stderr, "vmspace_demo.c: RUN returned trap %" PRIu64 " at rip %#" PRIx64
                        ": not a user trap\n", tf.tf_trapno, tf.tf_rip);
                return 1;
            }
            break;
        }
    }
    vmspace_destroy(VM);

    if (sig) {
        fprintf(stderr, "vmspace_demo.c: user program killed by %s: trap %" PRIu64
                " at rip %#" PRIx64 " (addr %#" PRIx64 ", err %#" PRIx64 ")\n",
                signal_name(sig), tf.tf_trapno, tf.tf_rip, tf.tf_addr, tf.tf_err);
        printf("vmspace_demo.c: %" PRIu64 " page faults served, %" PRIu64
               " syscalls, killed by %s\n", page_faults, syscalls, signal_name(sig));
        return 128 + sig;
    }
    printf("vmspace_demo.c: %" PRIu64 " page faults served, %" PRIu64 " syscalls, exit %d\n",
           page_faults, syscalls, (int)tf.tf_rdi);
    return (int)(tf.tf_rdi & 0xff);
}
