//! `superpage`: PS entries stop the walk (ABI section 3): a 2 MiB leaf at
//! L2, one whose frame is not 2 MiB aligned (the frame is not masked), a
//! 1 GiB leaf at L3 (only its pages inside RAM are touched), and a master
//! PDE with PS, which maps window page i to RAM page i. On success:
//!
//! ```text
//! superpage: 2 MiB leaf ok
//! superpage: 2 MiB leaf A and M ok
//! superpage: unaligned 2 MiB frame is not masked ok
//! superpage: 1 GiB leaf ok
//! superpage: linear master PDE ok
//! ```

use vkabi::{PAGE_SHIFT, PAGE_SIZE, VPTE_A, VPTE_M, VPTE_PS, VPTE_RW, VPTE_U};
use vpte::{GuestPhysAddr, Level, PageSize, Vpte};

use crate::env::{Env, stamp};
use crate::report::{Outcome, Report, must};
use crate::sys::{Place, Window};

/// Pages of the 2 MiB-aligned block of frames: two superpages' worth.
const BLOCK: u64 = 1024;
/// The unaligned superpage starts this many pages into the block.
const SKEW: u64 = 3;
const MARK: u64 = 0x5E9A_0000_0000_0001;

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("2 MiB and 1 GiB PS leaves (frames not masked); a linear master PDE");
    let mut pt = env.tables(BLOCK + 512 + 16)?;
    let block = pt
        .allocator()
        .alloc_aligned(BLOCK, 512)
        .ok_or("no 2 MiB-aligned frames")?;
    let pa = |k: u64| GuestPhysAddr(block.0 + k * PAGE_SIZE);
    for k in 0..BLOCK {
        env.store(pa(k), stamp(pa(k)));
    }
    let bits = VPTE_RW | VPTE_U;
    let map = |pt: &mut crate::env::Tables, w: &Window, page, frame, size| {
        pt.map(w.pindex(page), frame, size, bits)
            .map(drop)
            .map_err(|e| format!("map {size} at {}: {e}", w.pindex(page)))
    };

    // Window pages 0..512: one 2 MiB leaf on the block; 512..1024: one on
    // the block + SKEW pages.
    let w = env.window(BLOCK)?;
    map(&mut pt, &w, 0, block, PageSize::Size2M)?;
    map(&mut pt, &w, 512, pa(SKEW), PageSize::Size2M)?;
    must("MADV_SETMAP", w.setmap(pt.master()))?;
    let bad = (0..512).find(|&k| w.read(k, 0) != stamp(pa(k)));
    rep.check("2 MiB leaf", bad.is_none(), || {
        let k = bad.expect("a bad page");
        format!(
            "page {k} reads {:#x}, expected {:#x}",
            w.read(k, 0),
            stamp(pa(k))
        )
    });
    w.write(300, 1, MARK);
    let leaf = pt.lookup(w.pindex(300)).ok().flatten();
    let seen = env.load(GuestPhysAddr(pa(300).0 + 8));
    let good = leaf.is_some_and(|m| m.level == Level::L2 && m.entry.has(VPTE_A | VPTE_M | VPTE_PS));
    rep.check("2 MiB leaf A and M", good && seen == MARK, || {
        format!("leaf {leaf:?}, frame word {seen:#x}")
    });
    let bad = (512..BLOCK).find(|&k| w.read(k, 0) != stamp(pa(k - 512 + SKEW)));
    rep.check("unaligned 2 MiB frame is not masked", bad.is_none(), || {
        let k = bad.expect("a bad page");
        format!(
            "page {k} reads {:#x}, expected {:#x}",
            w.read(k, 0),
            stamp(pa(k - 512 + SKEW))
        )
    });

    // Pages of the block, by RAM page number, to look at through windows
    // where window page i is RAM page i.
    let samples: Vec<u64> = (0..BLOCK)
        .step_by(41)
        .chain([BLOCK - 1])
        .map(|k| pa(k).0 >> PAGE_SHIFT)
        .collect();
    let check_linear = |w: &Window| {
        samples
            .iter()
            .find(|&&n| w.read(n, 0) != stamp(GuestPhysAddr(n << PAGE_SHIFT)))
            .map(|n| format!("window page {n} reads {:#x}", w.read(*n, 0)))
    };

    // A 1 GiB window with offset 1 GiB: L3 entry 1 maps RAM from frame 0.
    let giga = Level::L3.bytes();
    let g = env.window_at(Place::Anywhere, giga, giga)?;
    map(&mut pt, &g, 0, GuestPhysAddr(0), PageSize::Size1G)?;
    must("MADV_SETMAP", g.setmap(pt.master()))?;
    let bad = check_linear(&g);
    let leaf = pt.lookup(g.pindex(0)).ok().flatten();
    let good = leaf.is_some_and(|m| m.level == Level::L3 && m.entry.has(VPTE_A | VPTE_PS));
    rep.check("1 GiB leaf", bad.is_none() && good, || {
        bad.unwrap_or_else(|| format!("leaf {leaf:?}"))
    });

    // The master PDE itself with PS: window page i is RAM page i.
    let l = env.window(env.info.ram_size >> PAGE_SHIFT)?;
    must(
        "MADV_SETMAP",
        l.setmap(Vpte::leaf(GuestPhysAddr(0), bits | VPTE_PS)),
    )?;
    let bad = check_linear(&l);
    let n = samples[1];
    l.write(n, 2, MARK);
    let seen = env.load(GuestPhysAddr((n << PAGE_SHIFT) + 16));
    rep.check("linear master PDE", bad.is_none() && seen == MARK, || {
        bad.unwrap_or_else(|| format!("wrote {MARK:#x} at page {n}, RAM holds {seen:#x}"))
    });
    Ok(())
}
