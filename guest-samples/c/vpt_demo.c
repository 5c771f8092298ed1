/*
 * vpt_demo.c - the smallest MAP_VPAGETABLE guest in C (ABI sections 2-5).
 *
 * Maps guest RAM as its direct map (DMAP), builds a 4-level page table in
 * it by hand (table and data frames from a bump pointer at 1 MiB), maps a
 * 4-page window with vk_mmap(MAP_SHARED|MAP_VPAGETABLE), points it at the
 * table with mcontrol(MADV_SETMAP), and checks that the window aliases the
 * frames both ways (window page i maps data frame 3 - i) and that the host
 * set A and M on the leaves. Prints `vpt_demo.c: ok` and exits 0, or prints
 * `vpt_demo.c: FAIL <what>` and exits 1; without vkrun it prints
 * `vk_info: Function not implemented` on stderr and exits 1.
 *
 * Build: gcc -O2 -Wall -Wextra -I guest-samples/include vpt_demo.c
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "vkernel.h"

#define WINDOW_PAGES 4
#define FIRST_FRAME (UINT64_C(1) << 20)

static unsigned char *dmap;
static uint64_t next_frame = FIRST_FRAME;

static int fail(const char *what)
{
    printf("vpt_demo.c: FAIL %s\n", what);
    return 1;
}

/* The 64-bit word at physical address pa, through the DMAP. */
static volatile uint64_t *phys(uint64_t pa)
{
    return (volatile uint64_t *)(void *)(dmap + pa);
}

/* A zeroed frame from the bump pointer. */
static uint64_t alloc_frame(void)
{
    uint64_t pa = next_frame;

    next_frame += PAGE_SIZE;
    memset(dmap + pa, 0, PAGE_SIZE);
    return pa;
}

/* The entry for page index pindex in the table at pa whose entries cover
 * 1 << shift pages. */
static volatile uint64_t *entry(uint64_t table, uint64_t pindex, unsigned shift)
{
    return phys(table + 8 * ((pindex >> shift) & (VPTE_ENTRIES - 1)));
}

/* The leaf of pindex below the L4 table at root, creating tables on the way. */
static volatile uint64_t *leaf(uint64_t root, uint64_t pindex)
{
    uint64_t table = root;

    for (unsigned shift = VPTE_TOP_SHIFT - 9; shift > 0; shift -= 9) {
        volatile uint64_t *e = entry(table, pindex, shift);
        if (!(*e & VPTE_V))
            *e = alloc_frame() | VPTE_V | VPTE_RW | VPTE_U;
        table = *e & VPTE_FRAME;
    }
    return entry(table, pindex, 0);
}

static uint64_t stamp(uint64_t pa)
{
    return (pa >> 12) * UINT64_C(0x9E3779B97F4A7C15) ^ UINT64_C(0x5EED000000000000);
}

int main(void)
{
    struct vk_info info;
    uint64_t root, frames[WINDOW_PAGES];
    volatile uint64_t *leaves[WINDOW_PAGES];
    volatile uint64_t *win;
    void *p;

    memset(&info, 0, sizeof info);
    if (vk_info(&info, sizeof info) != 0) {
        fprintf(stderr, "vk_info: %s\n", strerror(errno));
        return 1;
    }
    if (info.ram_size < FIRST_FRAME + 16 * PAGE_SIZE)
        return fail("RAM too small");
    p = mmap(NULL, (size_t)info.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.ram_fd, 0);
    if (p == MAP_FAILED)
        return fail("mmap of ram_fd");
    dmap = p;

    root = alloc_frame();
    for (int i = 0; i < WINDOW_PAGES; i++) {
        frames[i] = alloc_frame();
        *phys(frames[i]) = stamp(frames[i]);
    }
    for (int i = 0; i < WINDOW_PAGES; i++) {
        leaves[i] = leaf(root, (uint64_t)i);
        *leaves[i] = frames[WINDOW_PAGES - 1 - i] | VPTE_V | VPTE_RW | VPTE_U;
    }

    p = vk_mmap(NULL, WINDOW_PAGES * PAGE_SIZE, PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_VPAGETABLE, info.ram_fd, 0);
    if (p == MAP_FAILED) {
        printf("vpt_demo.c: FAIL vk_mmap: %s\n", strerror(errno));
        return 1;
    }
    win = p;
    if (mcontrol(p, WINDOW_PAGES * PAGE_SIZE, MADV_SETMAP,
                 (off_t)(root | VPTE_V | VPTE_RW | VPTE_U)) != 0) {
        printf("vpt_demo.c: FAIL mcontrol(MADV_SETMAP): %s\n", strerror(errno));
        return 1;
    }

    /* DMAP -> window, then window -> DMAP. */
    for (int i = 0; i < WINDOW_PAGES; i++) {
        uint64_t frame = frames[WINDOW_PAGES - 1 - i];
        volatile uint64_t *page = win + (size_t)i * (PAGE_SIZE / 8);

        if (page[0] != stamp(frame))
            return fail("the window does not show what the DMAP holds");
        if (!(*leaves[i] & VPTE_A) || (*leaves[i] & VPTE_M))
            return fail("after a read the leaf lacks A or has M");
        page[1] = ~stamp(frame);
        if (*phys(frame + 8) != ~stamp(frame))
            return fail("the DMAP does not show a write through the window");
        if (!(*leaves[i] & VPTE_M))
            return fail("after a write the leaf lacks M");
    }
    printf("vpt_demo.c: ok\n");
    return 0;
}
