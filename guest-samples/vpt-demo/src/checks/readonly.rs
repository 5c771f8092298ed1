//! `readonly`: the read-only downgrade (ABI section 3 "Protection"). A read
//! through a leaf with RW but no M maps the page read-only, so the first
//! write faults again (transparently) and sets M; a leaf without RW can be
//! read, and a write to it raises SIGSEGV. On success:
//!
//! ```text
//! readonly: read through an RW leaf without M ok
//! readonly: the read leaves M clear ok
//! readonly: the first write sets M ok
//! readonly: read through a leaf without RW ok
//! readonly: write through a leaf without RW raises SIGSEGV ok
//! readonly: the write lands once the handler sets RW ok
//! ```

use vkabi::{VPTE_A, VPTE_M, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, must};
use crate::sys::{Fix, SEGV_ACCERR, expect_segv};

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("a read maps read-only, the first write sets M; RW clear raises SIGSEGV");
    let mut pt = env.tables(8)?;
    let w = env.window(2)?;
    let (fa, fb) = (env::frame(&mut pt)?, env::frame(&mut pt)?);
    stamp_frame(env, fa);
    stamp_frame(env, fb);
    let (p0, p1) = (w.pindex(0), w.pindex(1));
    env::map(&mut pt, p0, fa, VPTE_RW | VPTE_U)?;
    env::map(&mut pt, p1, fb, VPTE_U)?;
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    let v = w.read(0, 0);
    rep.check("read through an RW leaf without M", v == stamp(fa), || {
        format!("read {v:#x}, the frame holds {:#x}", stamp(fa))
    });
    let leaf = env::leaf(&pt, p0);
    rep.check(
        "the read leaves M clear",
        leaf.has(VPTE_A) && !leaf.has(VPTE_M),
        || format!("leaf {leaf}"),
    );
    w.write(0, 1, 0x0F0F_0001);
    let leaf = env::leaf(&pt, p0);
    let seen = env.load(GuestPhysAddr(fa.0 + 8));
    rep.check(
        "the first write sets M",
        leaf.has(VPTE_M) && seen == 0x0F0F_0001,
        || format!("leaf {leaf}, frame word {seen:#x}"),
    );

    let v = w.read(1, 0);
    rep.check("read through a leaf without RW", v == stamp(fb), || {
        format!("read {v:#x}, the frame holds {:#x}", stamp(fb))
    });
    let fix = Fix::Or {
        pa: env::leaf_pa(&pt, p1)?,
        bits: VPTE_RW,
    };
    let ((), segv) = expect_segv(fix, || w.write(1, 1, 0x0F0F_0002));
    rep.check(
        "write through a leaf without RW raises SIGSEGV",
        segv.signals == 1 && segv.code == SEGV_ACCERR,
        || format!("{} signals, si_code {}", segv.signals, segv.code),
    );
    let seen = env.load(GuestPhysAddr(fb.0 + 8));
    rep.check(
        "the write lands once the handler sets RW",
        seen == 0x0F0F_0002,
        || format!("frame word {seen:#x}"),
    );
    Ok(())
}
