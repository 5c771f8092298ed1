/*
 * A starting point for a vkernel in C (docs/guide.md, steps 1-3): ask the
 * supervisor for vk_info, map guest RAM as the direct map, build 4-level
 * page tables for a one-page MAP_VPAGETABLE window, point the window at
 * them and check that it shows the RAM page. Copy this directory anywhere;
 * it needs only vkernel.h (make VKERNEL_CFLAGS=-I/path/to/include, or an
 * installed header found by pkg-config).
 *
 * Run: vkrun -m 64M -- ./vkernel
 */
#include <vkernel.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t *dmap;         /* guest RAM, PA 0 at dmap[0] */
static uint64_t next_frame;   /* bump allocator: frames are never reused */
static uint64_t ram_size;

static uint64_t *phys(uint64_t pa) { return (uint64_t *)(dmap + pa); }

/* A fresh frame; zero because RAM starts zero and frames are not reused. */
static uint64_t alloc_frame(void)
{
    uint64_t pa = next_frame;
    if (pa + 4096 > ram_size) {
        fprintf(stderr, "vkernel: out of RAM\n");
        exit(1);
    }
    next_frame += 4096;
    return pa;
}

/* The level-1 entry for page index `pindex` under `root`, making the
 * tables above it on the way (shifts 27, 18, 9: ABI section 3). */
static uint64_t *leaf_entry(uint64_t root, uint64_t pindex)
{
    uint64_t table = root;
    for (int shift = 27; shift > 0; shift -= 9) {
        uint64_t *e = phys(table) + ((pindex >> shift) & 511);
        if (!(*e & VPTE_V))
            *e = alloc_frame() | VPTE_V | VPTE_RW | VPTE_U;
        table = *e & VPTE_FRAME;
    }
    return phys(table) + (pindex & 511);
}

int main(void)
{
    struct vk_info info;
    if (vk_info(&info, sizeof info) != 0) {
        fprintf(stderr, "vkernel: vk_info: %s (run me under vkrun)\n", strerror(errno));
        return 1;
    }
    if (info.abi_version != 1) {
        fprintf(stderr, "vkernel: ABI version %u, this vkernel knows 1\n", info.abi_version);
        return 1;
    }
    ram_size = info.ram_size;
    next_frame = 1 << 20 < ram_size / 2 ? 1 << 20 : 0;

    dmap = mmap(NULL, info.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, info.ram_fd, 0);
    if (dmap == MAP_FAILED) {
        perror("vkernel: mmap of guest RAM");
        return 1;
    }

    uint64_t root = alloc_frame();
    uint64_t page = alloc_frame();
    *leaf_entry(root, 0) = page | VPTE_V | VPTE_RW | VPTE_U;

    volatile uint64_t *win = vk_mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_VPAGETABLE, info.ram_fd, 0);
    if (win == MAP_FAILED) {
        fprintf(stderr, "vkernel: vk_mmap: %s\n", strerror(errno));
        return 1;
    }
    if (mcontrol((void *)win, 4096, MADV_SETMAP, (off_t)(root | VPTE_V | VPTE_RW | VPTE_U)) != 0) {
        fprintf(stderr, "vkernel: mcontrol(MADV_SETMAP): %s\n", strerror(errno));
        return 1;
    }

    win[0] = 0x766b65726e656c;  /* through the window ... */
    if (*phys(page) != 0x766b65726e656c) {  /* ... seen through the DMAP */
        fprintf(stderr, "vkernel: the window does not alias RAM\n");
        return 1;
    }
    if ((*leaf_entry(root, 0) & (VPTE_A | VPTE_M)) != (VPTE_A | VPTE_M)) {
        fprintf(stderr, "vkernel: the write did not set VPTE_A and VPTE_M\n");
        return 1;
    }
    printf("vkernel: window at %p shows RAM page %#lx; A and M set\n", (void *)win,
           (unsigned long)page);
    return 0;
}
