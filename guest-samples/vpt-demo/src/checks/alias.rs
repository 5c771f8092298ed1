//! `alias`: a 16-page window whose pages map to scattered frames is an alias
//! of RAM, both ways, and the walk keeps A and M exact (ABI section 3). On
//! success (after an information line `alias: window at 0x..., 16 pages`):
//!
//! ```text
//! alias: dmap -> window ok
//! alias: A set at every level after a read ok
//! alias: M clear after a read ok
//! alias: window -> dmap ok
//! alias: M set at every level after a write ok
//! alias: two pages of one frame alias each other ok
//! ```
//!
//! Every page is first touched by a read of its first byte, so each fault
//! address is a page address (the trace test relies on it).

use vkabi::{VPTE_A, VPTE_M, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, must};

/// Window pages.
const PAGES: u64 = 16;
/// Page 15 maps the frame of page 3.
const TWIN: (u64, u64) = (3, 15);

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("16 window pages alias their frames both ways; A and M exact");
    let mut pt = env.tables(PAGES + 8)?;
    let w = env.window(PAGES)?;
    rep.info(format_args!("window at {:#x}, {PAGES} pages", w.base()));
    let frames = (0..PAGES - 1)
        .map(|_| env::frame(&mut pt))
        .collect::<Result<Vec<_>, _>>()?;
    // Page i maps frame 14 - i (backwards); page 15 shares page 3's frame.
    let target = |i: u64| -> GuestPhysAddr {
        let i = if i == TWIN.1 { TWIN.0 } else { i };
        frames[(PAGES - 2 - i) as usize]
    };
    for f in &frames {
        stamp_frame(env, *f);
    }
    for i in 0..PAGES {
        env::map(&mut pt, w.pindex(i), target(i), VPTE_RW | VPTE_U)?;
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    let bad = (0..PAGES).find(|&i| {
        let f = target(i);
        w.read(i, 0) != stamp(f) || w.read(i, 511) != !stamp(f)
    });
    rep.check("dmap -> window", bad.is_none(), || {
        let i = bad.expect("a bad page");
        format!(
            "page {i} reads {:#x}, its frame holds {:#x}",
            w.read(i, 0),
            stamp(target(i))
        )
    });

    let paths: Vec<_> = (0..PAGES)
        .map(|i| env.path(pt.root(), w.pindex(i)))
        .collect();
    let no_a = paths.iter().flatten().find(|(_, e)| !e.has(VPTE_A));
    rep.check("A set at every level after a read", no_a.is_none(), || {
        let (level, e) = no_a.expect("an entry without A");
        format!("{level} entry {e}")
    });
    let m = paths
        .iter()
        .filter_map(|p| p.last())
        .find(|(_, e)| e.has(VPTE_M));
    rep.check("M clear after a read", m.is_none(), || {
        format!("leaf {}", m.expect("a leaf with M").1)
    });

    let mark = |i: u64| 0xA11A_5000_0000_0000 | i;
    for i in 0..PAGES {
        if i != TWIN.1 {
            w.write(i, 1, mark(i));
        }
    }
    let bad = (0..PAGES)
        .filter(|i| *i != TWIN.1)
        .find(|&i| env.load(GuestPhysAddr(target(i).0 + 8)) != mark(i));
    rep.check("window -> dmap", bad.is_none(), || {
        let i = bad.expect("a bad page");
        format!(
            "wrote {:#x} at page {i}, its frame holds {:#x}",
            mark(i),
            env.load(GuestPhysAddr(target(i).0 + 8))
        )
    });
    let no_m = (0..PAGES)
        .filter(|i| *i != TWIN.1)
        .flat_map(|i| env.path(pt.root(), w.pindex(i)))
        .find(|(_, e)| !e.has(VPTE_A | VPTE_M));
    rep.check("M set at every level after a write", no_m.is_none(), || {
        let (level, e) = no_m.expect("an entry without M");
        format!("{level} entry {e}")
    });

    w.write(TWIN.1, 2, 0x7715_0000_0000_0001);
    let first = w.read(TWIN.0, 2);
    w.write(TWIN.0, 3, 0x7715_0000_0000_0002);
    let second = w.read(TWIN.1, 3);
    rep.check(
        "two pages of one frame alias each other",
        first == 0x7715_0000_0000_0001 && second == 0x7715_0000_0000_0002,
        || {
            format!(
                "page {} read {first:#x}, page {} read {second:#x}",
                TWIN.0, TWIN.1
            )
        },
    );
    Ok(())
}
