/* vpt_tables.h: a bump frame allocator and a 4-level table builder over the
 * direct map, shared by vkrun's C test guests (vpt_bench.c, vpt_hostile.c).
 * The includer defines `dmap` (its mapping of RAM), `next_frame` (the next
 * free physical address) and `root` (the top table's physical address). */
#ifndef VPT_TABLES_H
#define VPT_TABLES_H

#include <string.h>
#include "vkernel.h"

/* A zeroed 4 KiB frame. */
static uint64_t alloc_frame(void)
{
    uint64_t f = next_frame;
    next_frame += 4096;
    memset(dmap + f, 0, 4096);
    return f;
}

/* The leaf entry for page index `pindex`, creating the tables on its way
 * with `table_bits` (V|RW|U, plus A|M to let the host prefault). */
static vpte_t *entry_for_with(uint64_t pindex, uint64_t table_bits)
{
    uint64_t table = root;
    for (int sh = 27; sh >= 0; sh -= 9) {
        vpte_t *e = (vpte_t *)(dmap + table) + ((pindex >> sh) & 511);
        if (sh == 0)
            return e;
        if (!(*e & VPTE_V))
            *e = alloc_frame() | table_bits;
        table = *e & VPTE_FRAME;
    }
    return 0;
}

#endif
