/* vpt_bench: the guest half of the MAP_VPAGETABLE benchmark (tests/benches/
 * vpagetable.rs). Each mode measures one figure inside one guest process and
 * prints "name value" lines (microseconds); the native baselines run in the
 * same process, on the same memfd (guest RAM), in the same run.
 *
 *   vpt_bench write N     native memfd minor write faults vs first-touch
 *                         window write faults with random targets (no A, so
 *                         no batching)
 *   vpt_bench seq N       native sequential touch (read and write) of N
 *                         memfd pages vs a window whose entries map
 *                         contiguous frames with A|M already set
 *   vpt_bench inval N     MADV_INVAL of 1 installed page (N times) and of
 *                         4096 scattered installed pages, against the native
 *                         equivalent: madvise(MADV_DONTNEED) of the same
 *                         pages in a plain shared mapping of the RAM memfd
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include "vkernel.h"

static char *dmap;
static uint64_t next_frame = 4096, root;
static size_t ram_size;
static int ram_fd;

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

#include "vpt_tables.h"

static vpte_t *entry_for(uint64_t pindex)
{
    return entry_for_with(pindex, VPTE_V | VPTE_RW | VPTE_U | VPTE_A | VPTE_M);
}

static char *window(size_t pages)
{
    char *w = vk_mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE, ram_fd, 0);
    if (w == MAP_FAILED) {
        perror("vk_mmap");
        exit(1);
    }
    if (mcontrol(w, pages * 4096, MADV_SETMAP, root | VPTE_V | VPTE_RW | VPTE_U)) {
        perror("mcontrol");
        exit(1);
    }
    return w;
}

/* Data frames [base, base+n) at the top of RAM, written once so that every
 * later access is a minor fault on a page already in the page cache. */
static uint64_t data_frames(size_t n)
{
    uint64_t base = ram_size - n * 4096;
    if (base < next_frame + (n / 512 + 16) * 4096) {
        fprintf(stderr, "RAM too small\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        dmap[base + i * 4096] = 1;
    return base;
}

static void shuffle(uint64_t *v, size_t n)
{
    srand(7);
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)rand() % (i + 1);
        uint64_t t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

static char *native_mapping(uint64_t base, size_t n)
{
    char *m = mmap(0, n * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, (off_t)base);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return m;
}

static void bench_write(size_t n)
{
    uint64_t base = data_frames(n);
    char *m = native_mapping(base, n);
    double t = now_us();
    for (size_t i = 0; i < n; i++)
        m[i * 4096] = 2;
    printf("native_write_fault_us %.3f\n", (now_us() - t) / n);
    munmap(m, n * 4096);

    uint64_t *perm = malloc(n * 8);
    for (size_t i = 0; i < n; i++)
        perm[i] = i;
    shuffle(perm, n);
    for (size_t i = 0; i < n; i++)
        *entry_for(i) = (base + perm[i] * 4096) | VPTE_V | VPTE_RW | VPTE_U;
    char *w = window(n);
    t = now_us();
    for (size_t i = 0; i < n; i++)
        w[i * 4096] = 3;
    printf("window_write_fault_us %.3f\n", (now_us() - t) / n);
    for (size_t i = 0; i < n; i++)
        if (dmap[base + perm[i] * 4096] != 3) {
            printf("FAIL alias %zu\n", i);
            exit(1);
        }
}

static void bench_seq(size_t n)
{
    uint64_t base = data_frames(n);
    volatile char sink;
    char *m = native_mapping(base, n);
    double t = now_us();
    for (size_t i = 0; i < n; i++)
        sink = m[i * 4096];
    printf("native_seq_read_us %.3f\n", (now_us() - t) / n);
    munmap(m, n * 4096);
    m = native_mapping(base, n);
    t = now_us();
    for (size_t i = 0; i < n; i++)
        m[i * 4096] = 4;
    printf("native_seq_write_us %.3f\n", (now_us() - t) / n);
    munmap(m, n * 4096);

    for (size_t i = 0; i < n; i++)
        *entry_for(i) = (base + i * 4096) | VPTE_V | VPTE_RW | VPTE_U | VPTE_A | VPTE_M;
    char *w = window(n);
    t = now_us();
    for (size_t i = 0; i < n; i++)
        sink = w[i * 4096];
    printf("window_seq_read_us %.3f\n", (now_us() - t) / n);
    mcontrol(w, n * 4096, MADV_INVAL, 0);
    t = now_us();
    for (size_t i = 0; i < n; i++)
        w[i * 4096] = 5;
    printf("window_seq_write_us %.3f\n", (now_us() - t) / n);
    (void)sink;
}

static void bench_inval(size_t n)
{
    size_t pages = 4096 * 4;
    uint64_t base = data_frames(pages);
    uint64_t *perm = malloc(pages * 8);
    for (size_t i = 0; i < pages; i++)
        perm[i] = i;
    shuffle(perm, pages);
    for (size_t i = 0; i < pages; i++)
        *entry_for(i) = (base + perm[i] * 4096) | VPTE_V | VPTE_RW | VPTE_U;
    char *w = window(pages);
    volatile char sink;
    double total = 0;
    for (size_t k = 0; k < n; k++) {
        sink = w[0];
        double t = now_us();
        mcontrol(w, 4096, MADV_INVAL, 0);
        total += now_us() - t;
    }
    printf("inval_1_page_us %.3f\n", total / n);
    /* 4096 scattered pages: every 4th page of the window, random frames */
    total = 0;
    int rounds = 5;
    for (int r = 0; r < rounds; r++) {
        for (size_t i = 0; i < pages; i += 4)
            sink = w[i * 4096];
        double t = now_us();
        mcontrol(w, pages * 4096, MADV_INVAL, 0);
        total += now_us() - t;
    }
    printf("inval_4096_scattered_us %.3f\n", total / rounds);
    printf("inval_4096_scattered_per_page_us %.3f\n", total / rounds / 4096);

    /* The baseline: the host dropping the same translations natively. */
    char *m = mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, (off_t)base);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    total = 0;
    for (size_t k = 0; k < n; k++) {
        sink = m[0];
        double t = now_us();
        madvise(m, 4096, MADV_DONTNEED);
        total += now_us() - t;
    }
    printf("native_dontneed_1_page_us %.3f\n", total / n);
    total = 0;
    for (int r = 0; r < rounds; r++) {
        for (size_t i = 0; i < pages; i += 4)
            sink = m[i * 4096];
        double t = now_us();
        madvise(m, pages * 4096, MADV_DONTNEED);
        total += now_us() - t;
    }
    printf("native_dontneed_4096_scattered_us %.3f\n", total / rounds);
    munmap(m, pages * 4096);
    (void)sink;
}

int main(int argc, char **argv)
{
    struct vk_info info;
    if (argc < 3) {
        fprintf(stderr, "usage: vpt_bench write|seq|inval N\n");
        return 2;
    }
    if (vk_info(&info, sizeof info)) {
        perror("vk_info");
        return 1;
    }
    ram_size = info.ram_size;
    ram_fd = info.ram_fd;
    dmap = mmap(0, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    if (dmap == MAP_FAILED) {
        perror("dmap");
        return 1;
    }
    root = alloc_frame();
    size_t n = (size_t)atol(argv[2]);
    if (!strcmp(argv[1], "write"))
        bench_write(n);
    else if (!strcmp(argv[1], "seq"))
        bench_seq(n);
    else if (!strcmp(argv[1], "inval"))
        bench_inval(n);
    else
        return 2;
    return 0;
}
