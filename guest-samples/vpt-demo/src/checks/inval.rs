//! `inval`: changes that are not upgrades show once `MADV_INVAL` covers
//! them, and `MADV_SETMAP` with a new master drops every translation (ABI
//! section 5). On success:
//!
//! ```text
//! inval: MADV_INVAL writes no VPTE ok
//! inval: a new frame shows after MADV_INVAL ok
//! inval: a cleared RW faults after MADV_INVAL ok
//! inval: a cleared V faults after MADV_INVAL ok
//! inval: SETMAP with a new master drops translations ok
//! ```
//!
//! Between the change and the INVAL the old or the new translation may be
//! used (like a TLB), so nothing is asserted there.

use vkabi::{VPTE_A, VPTE_RW, VPTE_U};
use vpte::{GuestPhysAddr, Vpte};

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, must};
use crate::sys::{Fix, SEGV_ACCERR, SEGV_MAPERR, expect_segv};

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("MADV_INVAL shows a new frame, a cleared RW, a cleared V; SETMAP swaps tables");
    let mut pt = env.tables(16)?;
    let w = env.window(3)?;
    let frames = (0..4)
        .map(|_| env::frame(&mut pt))
        .collect::<Result<Vec<_>, _>>()?;
    for f in &frames {
        stamp_frame(env, *f);
    }
    let (fa, fb, fc, fd) = (frames[0], frames[1], frames[2], frames[3]);
    let rw = VPTE_RW | VPTE_U;
    env::map(&mut pt, w.pindex(0), fa, rw)?;
    env::map(&mut pt, w.pindex(1), fc, rw)?;
    env::map(&mut pt, w.pindex(2), fd, rw)?;
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    // A new frame for page 0.
    let v = w.read(0, 0);
    if v != stamp(fa) {
        return Err(format!(
            "page 0 reads {v:#x} before any change, its frame holds {:#x}",
            stamp(fa)
        ));
    }
    env::map(&mut pt, w.pindex(0), fb, rw)?;
    let _either = w.read(0, 0);
    let before = env.path(pt.root(), w.pindex(0));
    must("MADV_INVAL", w.inval(0, 1))?;
    let after = env.path(pt.root(), w.pindex(0));
    rep.check("MADV_INVAL writes no VPTE", before == after, || {
        format!("before {before:?}, after {after:?}")
    });
    let v = w.read(0, 0);
    rep.check("a new frame shows after MADV_INVAL", v == stamp(fb), || {
        format!("read {v:#x}, the new frame holds {:#x}", stamp(fb))
    });

    // RW cleared on page 1 after a write installed it writable.
    w.write(1, 1, 1);
    pt.protect(w.pindex(1), VPTE_U)
        .map_err(|e| format!("protect: {e}"))?;
    must("MADV_INVAL", w.inval(1, 1))?;
    let fix = Fix::Or {
        pa: env::leaf_pa(&pt, w.pindex(1))?,
        bits: VPTE_RW,
    };
    let ((), segv) = expect_segv(fix, || w.write(1, 1, 2));
    let seen = env.load(GuestPhysAddr(fc.0 + 8));
    rep.check(
        "a cleared RW faults after MADV_INVAL",
        segv.signals == 1 && segv.code == SEGV_ACCERR && seen == 2,
        || {
            format!(
                "{} SIGSEGVs, si_code {}, frame word {seen}",
                segv.signals, segv.code
            )
        },
    );

    // V cleared on page 2 after a read installed it.
    let _ = w.read(2, 0);
    let gone = pt
        .unmap(w.pindex(2))
        .map_err(|e| format!("unmap: {e}"))?
        .ok_or("unmap found nothing")?;
    must("MADV_INVAL", w.inval(2, 1))?;
    let fix = Fix::Store {
        pa: gone.entry_pa,
        value: Vpte::leaf(fd, rw).raw(),
    };
    let (v, segv) = expect_segv(fix, || w.read(2, 0));
    rep.check(
        "a cleared V faults after MADV_INVAL",
        segv.signals == 1 && segv.code == SEGV_MAPERR && v == stamp(fd),
        || {
            format!(
                "{} SIGSEGVs, si_code {}, read {v:#x}",
                segv.signals, segv.code
            )
        },
    );

    // New tables: page 0 maps another frame there.
    let mut other = env.tables(8)?;
    let fe = env::frame(&mut other)?;
    stamp_frame(env, fe);
    env::map(&mut other, w.pindex(0), fe, rw)?;
    must("MADV_SETMAP", w.setmap(other.master()))?;
    let v = w.read(0, 0);
    let leaf = env::leaf(&other, w.pindex(0));
    rep.check(
        "SETMAP with a new master drops translations",
        v == stamp(fe) && leaf.has(VPTE_A),
        || {
            format!(
                "read {v:#x}, the new tables' frame holds {:#x}; their leaf {leaf}",
                stamp(fe)
            )
        },
    );
    Ok(())
}
