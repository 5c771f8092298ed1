/* vpt_hostile: a guest that mistreats MAP_VPAGETABLE, for vkrun's tests. Each
 * mode must end with the documented fault or error for the guest, never a
 * supervisor crash or hang. Prints "<mode>: ok" and exits 0 on the expected
 * behaviour, "<mode>: FAIL ..." and exits 1 otherwise.
 *
 *   cycle     page tables that point at themselves (recursive slot, 2-cycle)
 *   beyond    table and page frames beyond RAM
 *   munmap    munmap/mmap the window while another thread faults in it
 *   closefd   close every descriptor above 2 (RAM, vkrun's own), then fault
 *   exit      exit_group while threads are faulting
 *   nx        code in a window runs, unless an entry on its path has NX
 *   fork      a forked child has no windows (SIGSEGV there); the parent's
 *             keep working
 *   replace-pipe, replace-null, replace-close
 *             replace every descriptor from 768 up (vkrun's: the agent's
 *             RAM memfd and userfaultfd) with a pipe full of forged
 *             userfaultfd messages, with /dev/null, or close them; then
 *             fault in a window. vkrun either goes on serving the faults
 *             ("replace: ok") or ends the guest with a clear message and
 *             status 125; it never hangs.
 *   hold-lock take the lock vkrun shares with this process's resolver (a
 *             word of vkrun's page at user_max + 0x105000, which the ABI
 *             keeps out of the guest's reach) and keep it for 2 s while
 *             one thread asks for a window (vk_mmap) and another writes a
 *             page installed read-only: both wait for the lock, but the
 *             tracer must not, so forks in the main thread meanwhile take
 *             under 100 ms (a rare one more on a loaded machine, none a
 *             second); once released, both calls complete.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <time.h>
#include <sys/wait.h>
#include "vkernel.h"

static char *dmap;
static uint64_t next_frame = 4096, root;
static struct vk_info info;
static __thread sigjmp_buf *segv_jump;
static volatile long segvs;

#include "vpt_tables.h"

static vpte_t *entry_for(uint64_t pindex)
{
    return entry_for_with(pindex, VPTE_V | VPTE_RW | VPTE_U);
}

static volatile long last_code, last_err;

static void on_segv(int sig, siginfo_t *si, void *uc_)
{
    ucontext_t *uc = uc_;
    (void)sig;
    last_code = si->si_code;
    last_err = uc->uc_mcontext.gregs[REG_ERR];
    __sync_fetch_and_add(&segvs, 1);
    if (segv_jump)
        siglongjmp(*segv_jump, 1);
    _exit(3);
}

/* Read one byte at p; 1 if it faulted (SIGSEGV), 0 if it read. */
static int probe(volatile char *p, char *out)
{
    sigjmp_buf jb;
    segv_jump = &jb;
    if (sigsetjmp(jb, 1)) {
        segv_jump = 0;
        return 1;
    }
    *out = *p;
    segv_jump = 0;
    return 0;
}

static char *window(size_t pages, uint64_t master)
{
    char *w = vk_mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE, info.ram_fd, 0);
    if (w == MAP_FAILED) {
        printf("FAIL vk_mmap: %s\n", strerror(errno));
        exit(1);
    }
    if (mcontrol(w, pages * 4096, MADV_SETMAP, master)) {
        printf("FAIL setmap: %s\n", strerror(errno));
        exit(1);
    }
    return w;
}

#define FAIL(...) do { printf(__VA_ARGS__); printf("\n"); return 1; } while (0)

static int cycle(void)
{
    /* L4 table whose entry 0 points back at itself (a recursive slot), and
     * a 2-cycle between two tables for index 1. */
    uint64_t a = alloc_frame(), b = alloc_frame();
    ((vpte_t *)(dmap + root))[0] = root | VPTE_V | VPTE_RW;
    ((vpte_t *)(dmap + root))[1] = a | VPTE_V | VPTE_RW;
    ((vpte_t *)(dmap + a))[0] = b | VPTE_V | VPTE_RW;
    ((vpte_t *)(dmap + b))[0] = a | VPTE_V | VPTE_RW;
    char *w = window(1, root | VPTE_V | VPTE_RW);
    char c;
    /* pindex 0 walks root[0] four times: the final page is root itself. */
    if (probe(w, &c))
        FAIL("cycle: FAIL the recursive slot faulted");
    if (memcmp(w, dmap + root, 64) != 0)
        FAIL("cycle: FAIL recursive slot does not read the table page");
    munmap(w, 4096);
    /* Index 1<<27 (in pages) goes root[1] -> a -> b -> a: a 4-read walk that
     * ends on table a; accessible, bounded. */
    char *w2 = vk_mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE, info.ram_fd,
                       (off_t)1 << 39);
    mcontrol(w2, 4096, MADV_SETMAP, root | VPTE_V | VPTE_RW);
    if (probe(w2, &c))
        FAIL("cycle: FAIL the 2-cycle faulted");
    printf("cycle: ok\n");
    return 0;
}

static int beyond(void)
{
    char *w = window(4, root | VPTE_V | VPTE_RW);
    *entry_for(0) = (info.ram_size) | VPTE_V | VPTE_RW;           /* page beyond RAM */
    *entry_for(1) = (info.ram_size - 4096) | VPTE_V | VPTE_RW;    /* last page: fine */
    char c;
    long before = segvs;
    if (!probe(w, &c))
        FAIL("beyond: FAIL a page beyond RAM was readable");
    if (probe(w + 4096, &c))
        FAIL("beyond: FAIL the last RAM page faulted");
    /* A table beyond RAM: a second window whose master points past RAM. */
    char *w2 = window(1, (info.ram_size + 4096 * 16) | VPTE_V | VPTE_RW);
    if (!probe(w2, &c))
        FAIL("beyond: FAIL a table beyond RAM was walked");
    if (segvs - before != 2)
        FAIL("beyond: FAIL expected 2 SIGSEGV, got %ld", segvs - before);
    printf("beyond: ok\n");
    return 0;
}

static char *volatile racing_window;
static volatile int racing_stop;
/* What the touchers read: the frame's marker (a window), 0 (the anonymous
 * memory in its place), anything else (wrong: a stale or foreign page). */
static volatile long read_marker, read_zero, read_wrong;

/* The byte page i of a racing or faulting window holds. */
static char marker(long i)
{
    return (char)(i % 251 + 1);
}

static void *toucher(void *arg)
{
    (void)arg;
    char c;
    long i = 0;
    while (!racing_stop) {
        char *w = racing_window;
        long page = i % 64;
        if (!probe(w + page * 4096, &c)) {
            if (c == marker(page))
                __sync_fetch_and_add(&read_marker, 1);
            else if (c == 0)
                __sync_fetch_and_add(&read_zero, 1);
            else
                __sync_fetch_and_add(&read_wrong, 1);
        }
        i++;
    }
    return 0;
}

static int munmap_race(void)
{
    for (int i = 0; i < 64; i++) {
        uint64_t f = alloc_frame();
        dmap[f] = marker(i);
        *entry_for(i) = f | VPTE_V | VPTE_RW;
    }
    racing_window = window(64, root | VPTE_V | VPTE_RW);
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], 0, toucher, 0);
    for (int round = 0; round < 200; round++) {
        char *w = racing_window;
        if (round % 2 == 0) {
            /* plain munmap + anonymous memory in its place */
            if (munmap(w, 64 * 4096))
                FAIL("munmap: FAIL munmap of a window: %s", strerror(errno));
            if (mmap(w, 64 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != w)
                FAIL("munmap: FAIL anonymous memory over the window: %s", strerror(errno));
        } else {
            /* a new window over the old place */
            char *n = vk_mmap(w, 64 * 4096, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_VPAGETABLE | MAP_FIXED, info.ram_fd, 0);
            if (n != w)
                FAIL("munmap: FAIL vk_mmap over a window: %s", n == MAP_FAILED ? strerror(errno) : "moved");
            if (mcontrol(n, 64 * 4096, MADV_SETMAP, root | VPTE_V | VPTE_RW))
                FAIL("munmap: FAIL setmap of the new window: %s", strerror(errno));
        }
        usleep(200);
    }
    racing_stop = 1;
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], 0);
    if (read_wrong)
        FAIL("munmap: FAIL %ld reads saw neither the page's frame nor zero", read_wrong);
    if (!read_marker || !read_zero)
        FAIL("munmap: FAIL the race was not run: %ld window reads, %ld anonymous", read_marker, read_zero);
    /* The last round left a window: every page reads its frame. */
    for (int i = 0; i < 64; i++)
        if (racing_window[i * 4096] != marker(i))
            FAIL("munmap: FAIL page %d after the race: read %d, want %d", i, racing_window[i * 4096], marker(i));
    printf("munmap: ok\n");
    return 0;
}

static int closefd(void)
{
    uint64_t f[8];
    for (int i = 0; i < 8; i++) {
        f[i] = alloc_frame();
        *entry_for(i) = f[i] | VPTE_V | VPTE_RW;
        dmap[f[i]] = (char)('a' + i);
    }
    char *w = window(8, root | VPTE_V | VPTE_RW);
    if (w[0] != 'a')
        FAIL("closefd: FAIL before closing");
    for (int fd = 3; fd < 1024; fd++)
        close(fd);
    for (int i = 1; i < 8; i++)
        if (w[i * 4096] != 'a' + i)
            FAIL("closefd: FAIL page %d after closing every descriptor", i);
    if (mcontrol(w, 8 * 4096, MADV_INVAL, 0))
        FAIL("closefd: FAIL INVAL: %s", strerror(errno));
    for (int i = 0; i < 8; i++)
        if (w[i * 4096] != 'a' + i)
            FAIL("closefd: FAIL page %d after INVAL", i);
    printf("closefd: ok\n");
    return 0;
}

static volatile long faulted_reads, faulter_bad;

static void *faulter(void *arg)
{
    char *w = arg;
    for (long i = 0;; i++) {
        long page = i % 512;
        if (mcontrol(w + page * 4096, 4096, MADV_INVAL, 0))
            faulter_bad = 1;
        if (*(volatile char *)(w + page * 4096) != marker(page))
            faulter_bad = 2;
        __sync_fetch_and_add(&faulted_reads, 1);
    }
    return 0;
}

static int exit_mid(void)
{
    for (int i = 0; i < 512; i++) {
        uint64_t f = alloc_frame();
        dmap[f] = marker(i);
        *entry_for(i) = f | VPTE_V | VPTE_RW;
    }
    char *w = window(512, root | VPTE_V | VPTE_RW);
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], 0, faulter, w);
    usleep(50000);
    if (faulter_bad)
        FAIL("exit: FAIL a faulting thread saw %s", faulter_bad == 1 ? "INVAL fail" : "a wrong page");
    if (!faulted_reads)
        FAIL("exit: FAIL no fault was served in 50 ms");
    printf("exit: ok\n");
    fflush(stdout);
    _exit(7); /* exit_group with faults in flight */
}

static int nx(void)
{
    uint64_t code = alloc_frame();
    dmap[code] = (char)0xC3; /* ret */
    *entry_for(0) = code | VPTE_V | VPTE_RW;
    *entry_for(1) = code | VPTE_V | VPTE_RW | VPTE_NX;
    char *w = window(2, root | VPTE_V | VPTE_RW);
    void (*run0)(void) = (void (*)(void))(void *)w;
    void (*run1)(void) = (void (*)(void))(void *)(w + 4096);
    sigjmp_buf jb;
    segv_jump = &jb;
    if (sigsetjmp(jb, 1))
        FAIL("nx: FAIL code without NX did not run");
    run0();
    if (sigsetjmp(jb, 1) == 0) {
        run1();
        FAIL("nx: FAIL code behind NX ran");
    }
    segv_jump = 0;
    if (last_code != SEGV_ACCERR)
        FAIL("nx: FAIL si_code %ld, want SEGV_ACCERR", last_code);
    if ((last_err & 0x15) != 0x15)
        FAIL("nx: FAIL REG_ERR %#lx, want P|U|I", last_err);
    printf("nx: ok\n");
    return 0;
}

static int fork_child(void)
{
    uint64_t f = alloc_frame();
    strcpy(dmap + f, "parent");
    *entry_for(0) = f | VPTE_V | VPTE_RW;
    char *w = window(4, root | VPTE_V | VPTE_RW);
    if (strcmp(w, "parent") != 0)
        FAIL("fork: FAIL before fork");
    pid_t child = fork();
    if (child == 0) {
        char c;
        /* The window is gone in the child: a clean fault, not stale memory. */
        _exit(probe(w, &c) ? 0 : 9);
    }
    int st = 0;
    waitpid(child, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        FAIL("fork: FAIL the child saw the window (status %#x)", st);
    if (mcontrol(w, 4096, MADV_INVAL, 0) || strcmp(w, "parent") != 0)
        FAIL("fork: FAIL the parent's window after fork");
    printf("fork: ok\n");
    return 0;
}

/* A forged userfaultfd message: a page fault at `addr` (struct uffd_msg). */
struct fake_uffd_msg {
    uint8_t event, reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    uint64_t flags, address, ptid;
};

static int replace(const char *how)
{
    for (int i = 0; i < 8; i++) {
        uint64_t f = alloc_frame();
        dmap[f] = (char)('a' + i);
        *entry_for(i) = f | VPTE_V | VPTE_RW;
    }
    char *w = window(8, root | VPTE_V | VPTE_RW);
    if (w[0] != 'a')
        FAIL("replace: FAIL before replacing");
    int pipefd[2] = {-1, -1};
    if (!strcmp(how, "pipe")) {
        if (pipe(pipefd))
            FAIL("replace: FAIL pipe: %s", strerror(errno));
        struct fake_uffd_msg m = {.event = 0x12, .flags = 1, .address = (uint64_t)w + 4096, .ptid = 1};
        for (int i = 0; i < 64; i++)
            if (write(pipefd[1], &m, sizeof m) != sizeof m)
                break;
    }
    int null = open("/dev/null", O_RDWR);
    int replaced = 0;
    for (int fd = 768; fd < 1024; fd++) {
        if (fd == pipefd[0] || fd == pipefd[1] || fcntl(fd, F_GETFD) < 0)
            continue;
        if (!strcmp(how, "close"))
            close(fd);
        else if (dup2(!strcmp(how, "pipe") ? pipefd[0] : null, fd) != fd)
            FAIL("replace: FAIL dup2 over %d: %s", fd, strerror(errno));
        replaced++;
    }
    if (!replaced)
        FAIL("replace: FAIL no descriptor from 768 up to replace");
    for (int i = 1; i < 8; i++)
        if (w[i * 4096] != 'a' + i)
            FAIL("replace: FAIL page %d after replacing %d descriptors", i, replaced);
    printf("replace: ok (%d descriptors)\n", replaced);
    return 0;
}

static char *volatile held_window;
static volatile int held_writer_done;

static void *held_mapper(void *arg)
{
    (void)arg;
    held_window = window(1, root | VPTE_V | VPTE_RW);
    return 0;
}

static void *held_writer(void *arg)
{
    *(volatile char *)arg = 'W';
    held_writer_done = 1;
    return 0;
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int hold_lock(void)
{
    uint64_t f = alloc_frame();
    dmap[f] = 'r';
    *entry_for(0) = f | VPTE_V | VPTE_RW; /* no M: a read installs read-only */
    char *w = window(1, root | VPTE_V | VPTE_RW);
    if (w[0] != 'r')
        FAIL("hold-lock: FAIL before taking the lock");
    uint32_t *lockword = (uint32_t *)(info.user_max + 0x105000);
    for (int spins = 0;; spins++) {
        uint32_t free_ = 0;
        if (__atomic_compare_exchange_n(lockword, &free_, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
        if (spins > 1000000)
            FAIL("hold-lock: FAIL the lock never came free");
    }
    pthread_t mapper, writer;
    pthread_create(&mapper, 0, held_mapper, 0);
    pthread_create(&writer, 0, held_writer, w);
    usleep(100000); /* both are waiting for the lock now */
    double start = now_ms(), slowest = 0;
    int forks = 0, slow = 0;
    while (now_ms() - start < 2000) {
        double t = now_ms();
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        int st;
        waitpid(child, &st, 0);
        double took = now_ms() - t;
        if (getenv("HOLD_LOCK_VERBOSE")) fprintf(stderr, "fork %d: %.2f ms\n", forks, took);
        if (took > slowest)
            slowest = took;
        slow += took >= 100;
        forks++;
        usleep(20000);
    }
    int early = held_window != 0 || held_writer_done;
    if (__atomic_exchange_n(lockword, 0, __ATOMIC_RELEASE) == 2)
        syscall(SYS_futex, lockword, FUTEX_WAKE, 1 << 30, 0, 0, 0);
    pthread_join(mapper, 0);
    pthread_join(writer, 0);
    if (early)
        FAIL("hold-lock: FAIL a call completed while the guest held the lock");
    if (dmap[f] != 'W' || !(*entry_for(0) & VPTE_M))
        FAIL("hold-lock: FAIL the write did not land (%c, entry %#lx)", dmap[f], (unsigned long)*entry_for(0));
    if (!held_window)
        FAIL("hold-lock: FAIL no window");
    /* A fork stuck behind the tracer would take until the release (about
     * 2 s); on a loaded machine a rare one is descheduled for 100 ms. */
    if (forks < 10 || slow * 10 > forks || slowest >= 1000)
        FAIL("hold-lock: FAIL %d forks while the lock was held, %d of them 100 ms or more, slowest %.1f ms",
             forks, slow, slowest);
    fprintf(stderr, "hold-lock: %d forks while held, %d of them 100 ms or more, slowest %.2f ms\n", forks, slow,
            slowest);
    printf("hold-lock: ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    if (vk_info(&info, sizeof info)) {
        perror("vk_info");
        return 1;
    }
    dmap = mmap(0, info.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.ram_fd, 0);
    root = alloc_frame();
    struct sigaction sa = {0};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, 0);
    setvbuf(stdout, 0, _IONBF, 0);
    if (!strcmp(argv[1], "cycle"))
        return cycle();
    if (!strcmp(argv[1], "beyond"))
        return beyond();
    if (!strcmp(argv[1], "munmap"))
        return munmap_race();
    if (!strcmp(argv[1], "closefd"))
        return closefd();
    if (!strncmp(argv[1], "replace-", 8))
        return replace(argv[1] + 8);
    if (!strcmp(argv[1], "exit"))
        return exit_mid();
    if (!strcmp(argv[1], "nx"))
        return nx();
    if (!strcmp(argv[1], "fork"))
        return fork_child();
    if (!strcmp(argv[1], "hold-lock"))
        return hold_lock();
    return 2;
}
