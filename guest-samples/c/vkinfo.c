/*
 * vkinfo.c - the C twin of the vkinfo sample guest.
 *
 * Asks the supervisor for vk_info, prints its fields one per line:
 *
 *   abi_version: 1
 *   page_size: 4096
 *   ram_fd: N
 *   vpte_levels: 4
 *   ram_size: N                (decimal)
 *   user_max: 0x7fffffe00000
 *
 * then maps guest RAM (ram_fd, MAP_SHARED, ram_size bytes or at most the
 * first 64 MiB), writes a pattern into its first, middle and last pages and
 * checks each one through a second, independent one-page mapping of the
 * same memfd at that page's offset, in both directions (ABI section 2: a PA
 * is a byte offset into the memfd, and every mapping of it aliases), checks
 * that the memfd cannot grow (it is sealed), prints `pattern: ok` and exits 0.
 *
 * Exit status, as the Rust vkinfo (guest-samples/vkinfo): 0 when everything
 * checks out; 1 when vk_info fails, with `vk_info: <strerror>` on stderr
 * (without vkrun: `vk_info: Function not implemented`); 2 when RAM
 * misbehaves, with `pattern: <what>` on stderr.
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -I guest-samples/include vkinfo.c
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* ftruncate, also under -std=c11 */
#endif
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vkernel.h"

/* How much of RAM the pattern check maps. */
#define PATTERN_MAP_LIMIT (UINT64_C(64) << 20)

#define EXIT_NO_VK_INFO 1
#define EXIT_RAM_MISBEHAVES 2

/* The word stored at byte `offset` of RAM by pass `pass`: distinct per page,
 * per word and per pass, so a stale or misplaced page cannot match. */
static uint64_t pattern_word(uint64_t offset, uint64_t pass)
{
    return (offset * UINT64_C(0x9E3779B97F4A7C15)) ^ (pass << 56) ^ UINT64_C(0x5A5A5A5A00000000);
}

static void fill_page(volatile uint64_t *page, uint64_t ram_offset, uint64_t pass)
{
    for (size_t i = 0; i < PAGE_SIZE / sizeof(uint64_t); i++)
        page[i] = pattern_word(ram_offset + i * sizeof(uint64_t), pass);
}

/* Returns the index of the first wrong word, or -1 if the page holds the
 * pattern. */
static long check_page(const volatile uint64_t *page, uint64_t ram_offset, uint64_t pass)
{
    for (size_t i = 0; i < PAGE_SIZE / sizeof(uint64_t); i++)
        if (page[i] != pattern_word(ram_offset + i * sizeof(uint64_t), pass))
            return (long)i;
    return -1;
}

/* Write through `dmap` at `ram_offset`, read through a new mapping of that
 * page, write through the new mapping and read through `dmap`. */
static int check_alias(int fd, unsigned char *dmap, uint64_t ram_offset)
{
    volatile uint64_t *direct = (volatile uint64_t *)(void *)(dmap + ram_offset);
    volatile uint64_t *alias;
    void *p;
    long bad;

    fill_page(direct, ram_offset, 1);
    p = mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)ram_offset);
    if (p == MAP_FAILED) {
        fprintf(stderr, "pattern: mmap at RAM offset 0x%" PRIx64 ": %s\n", ram_offset,
                strerror(errno));
        return -1;
    }
    alias = p;
    bad = check_page(alias, ram_offset, 1);
    if (bad < 0) {
        fill_page(alias, ram_offset, 2);
        bad = check_page(direct, ram_offset, 2);
    }
    if (bad >= 0)
        fprintf(stderr, "pattern: mismatch at RAM offset 0x%" PRIx64 "\n",
                ram_offset + (uint64_t)bad * sizeof(uint64_t));
    if (munmap(p, PAGE_SIZE) != 0) {
        fprintf(stderr, "pattern: munmap: %s\n", strerror(errno));
        return -1;
    }
    return bad >= 0 ? -1 : 0;
}

int main(void)
{
    struct vk_info info;
    uint64_t map_len, pages, offsets[3];
    unsigned char *dmap;
    void *p;

    memset(&info, 0, sizeof info);
    if (vk_info(&info, sizeof info) != 0) {
        fprintf(stderr, "vk_info: %s\n", strerror(errno));
        return EXIT_NO_VK_INFO;
    }
    printf("abi_version: %" PRIu32 "\n", info.abi_version);
    printf("page_size: %" PRIu32 "\n", info.page_size);
    printf("ram_fd: %" PRId32 "\n", info.ram_fd);
    printf("vpte_levels: %" PRIu32 "\n", info.vpte_levels);
    printf("ram_size: %" PRIu64 "\n", info.ram_size);
    printf("user_max: 0x%" PRIx64 "\n", info.user_max);
    fflush(stdout);

    map_len = info.ram_size < PATTERN_MAP_LIMIT ? info.ram_size : PATTERN_MAP_LIMIT;
    map_len -= map_len % PAGE_SIZE;
    if (map_len == 0) {
        fprintf(stderr, "pattern: ram_size %" PRIu64 " is less than a page\n", info.ram_size);
        return EXIT_RAM_MISBEHAVES;
    }
    p = mmap(NULL, (size_t)map_len, PROT_READ | PROT_WRITE, MAP_SHARED, info.ram_fd, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "pattern: mmap ram_fd: %s\n", strerror(errno));
        return EXIT_RAM_MISBEHAVES;
    }
    dmap = p;

    pages = map_len / PAGE_SIZE;
    offsets[0] = 0;
    offsets[1] = pages / 2 * PAGE_SIZE;
    offsets[2] = (pages - 1) * PAGE_SIZE;
    for (size_t i = 0; i < sizeof offsets / sizeof offsets[0]; i++)
        if (check_alias(info.ram_fd, dmap, offsets[i]) != 0)
            return EXIT_RAM_MISBEHAVES;

    if (munmap(p, (size_t)map_len) != 0) {
        fprintf(stderr, "pattern: munmap: %s\n", strerror(errno));
        return EXIT_RAM_MISBEHAVES;
    }
    /* Guest RAM cannot be resized by the guest: the memfd is sealed. */
    if (ftruncate(info.ram_fd, (off_t)(info.ram_size + PAGE_SIZE)) == 0) {
        fprintf(stderr, "pattern: RAM could be grown\n");
        return EXIT_RAM_MISBEHAVES;
    }
    printf("pattern: ok\n");
    return fflush(stdout) == 0 ? 0 : EXIT_RAM_MISBEHAVES;
}
