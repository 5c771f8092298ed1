//! `dirperm`: RW and NX in directory entries count (ABI section 3
//! "Protection": a page is writable only if every level allows it, and not
//! executable if any level forbids it). For each of L4, L3 and L2, a leaf
//! with RW|A|M (so that nothing downgrades it on the way) under a directory
//! entry with RW cleared can be read, a write raises SIGSEGV with
//! `SEGV_ACCERR` and P|W|U, and lands once the handler sets RW again; then
//! NX set at that level makes a call into the page raise SIGSEGV with I.
//! Run with `-e trace=faults` too, which takes every fault through the
//! supervisor's walker instead of the in-guest resolver. On success, per
//! level:
//!
//! ```text
//! dirperm: L2 RW clear: read ok
//! dirperm: L2 RW clear: write raises SIGSEGV ok
//! dirperm: L2 RW clear: the write lands once RW is set ok
//! dirperm: L2 NX set: a call raises SIGSEGV ok
//! dirperm: L2 NX set: the call runs once NX is clear ok
//! dirperm: L2 RW clear: a first write by read(2) is EFAULT and sets no M ok
//! ```
//!
//! The last check writes first, into a page nobody touched (its leaf has
//! neither A nor M): a walker that skipped the directory's RW would set M
//! on the way down (seen with a resolver that tested RW only at the leaf,
//! which the read-first checks above miss: the read installs read-only and
//! the supervisor's walker then decides the write).

use vkabi::{PGEX_I, PGEX_P, PGEX_U, PGEX_W, VPTE_A, VPTE_M, VPTE_NX, VPTE_RW, VPTE_U};
use vpte::{GuestPhysAddr, Vpte};

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, must};
use crate::sys::{Fix, SEGV_ACCERR, expect_segv};

/// `mov eax, 0x2a; ret`: what the NX check calls.
const CODE: [u8; 6] = [0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3];

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("RW cleared or NX set at L4, L3 or L2 denies writes or execution");
    for (depth, name) in [(0, "L4"), (1, "L3"), (2, "L2")] {
        level(env, rep, depth, name)?;
    }
    Ok(())
}

/// The address of the directory entry `depth` levels below the master
/// (0: L4) on the walk of `pindex` from `root`.
fn entry_pa(env: &Env, root: GuestPhysAddr, pindex: u64, depth: u32) -> GuestPhysAddr {
    let mut table = root;
    for d in 0..=depth {
        let index = (pindex >> (27 - 9 * d)) & 511;
        let pa = GuestPhysAddr(table.0 + 8 * index);
        if d == depth {
            return pa;
        }
        table = Vpte(env.load(pa)).frame();
    }
    unreachable!("the loop returns at depth")
}

fn level(env: &mut Env, rep: &mut Report, depth: u32, name: &str) -> Outcome {
    let mut pt = env.tables(8)?;
    let w = env.window(1)?;
    let frame = env::frame(&mut pt)?;
    stamp_frame(env, frame);
    let p = w.pindex(0);
    env::map(&mut pt, p, frame, VPTE_RW | VPTE_U | VPTE_A | VPTE_M)?;
    let dir = entry_pa(env, pt.root(), p.0, depth);
    env.store(dir, env.load(dir) & !VPTE_RW);
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    let v = w.read(0, 0);
    rep.check(
        format_args!("{name} RW clear: read"),
        v == stamp(frame),
        || format!("read {v:#x}, the frame holds {:#x}", stamp(frame)),
    );
    let fix = Fix::Or {
        pa: dir,
        bits: VPTE_RW,
    };
    let ((), segv) = expect_segv(fix, || w.write(0, 1, 0x0D1E_0001));
    let want = PGEX_P | PGEX_W | PGEX_U;
    rep.check(
        format_args!("{name} RW clear: write raises SIGSEGV"),
        segv.signals == 1 && segv.code == SEGV_ACCERR && segv.err & want == want,
        || {
            format!(
                "{} signals, si_code {}, err {:#x}",
                segv.signals, segv.code, segv.err
            )
        },
    );
    let seen = env.load(GuestPhysAddr(frame.0 + 8));
    rep.check(
        format_args!("{name} RW clear: the write lands once RW is set"),
        seen == 0x0D1E_0001,
        || format!("frame word {seen:#x}"),
    );

    // A first write, by the kernel (`read(2)` into the page): EFAULT, and
    // no M anywhere from the denying entry down. (A of the denying entry is
    // not asserted: walkers may set it before they check RW.)
    let mut pt = env.tables(8)?;
    let w = env.window(1)?;
    let frame = env::frame(&mut pt)?;
    let p = w.pindex(0);
    env::map(&mut pt, p, frame, VPTE_RW | VPTE_U)?;
    let dir = entry_pa(env, pt.root(), p.0, depth);
    env.store(dir, env.load(dir) & !VPTE_RW);
    must("MADV_SETMAP", w.setmap(pt.master()))?;
    let zero = std::fs::File::open("/dev/zero").map_err(|e| format!("/dev/zero: {e}"))?;
    let r = w.read_fd(&zero, 0, 0, 8);
    let efault = r.as_ref().err().and_then(std::io::Error::raw_os_error) == Some(libc::EFAULT);
    let below: Vec<(vpte::Level, Vpte)> = env
        .path(pt.root(), p)
        .into_iter()
        .skip(depth as usize)
        .collect();
    let dirty = below.iter().any(|(_, e)| e.has(VPTE_M));
    let leaf = env::leaf(&pt, p);
    rep.check(
        format_args!("{name} RW clear: a first write by read(2) is EFAULT and sets no M"),
        efault && !dirty && !leaf.has(VPTE_A),
        || format!("read(2) gave {r:?}; entries from {name} down: {below:?}"),
    );

    // NX at the same level, on a fresh window (no host translation yet).
    let mut pt = env.tables(8)?;
    let w = env.window(1)?;
    let frame = env::frame(&mut pt)?;
    env.write_bytes(frame, &CODE);
    let p = w.pindex(0);
    env::map(&mut pt, p, frame, VPTE_RW | VPTE_U | VPTE_A | VPTE_M)?;
    let dir = entry_pa(env, pt.root(), p.0, depth);
    let entry = env.load(dir);
    env.store(dir, entry | VPTE_NX);
    must("MADV_SETMAP", w.setmap(pt.master()))?;
    let fix = Fix::Store {
        pa: dir,
        value: entry & !VPTE_NX,
    };
    // SAFETY: the window page holds `mov eax, 42; ret` (written above), a
    // complete function of this ABI; the handler clears NX and the call
    // then runs it.
    let call: extern "C" fn() -> u32 = unsafe { std::mem::transmute(w.va(0, 0) as usize) };
    let (ret, segv) = expect_segv(fix, || call());
    rep.check(
        format_args!("{name} NX set: a call raises SIGSEGV"),
        segv.signals == 1 && segv.err & PGEX_I != 0,
        || format!("{} signals, err {:#x}", segv.signals, segv.err),
    );
    rep.check(
        format_args!("{name} NX set: the call runs once NX is clear"),
        ret == 42,
        || format!("the call returned {ret}"),
    );
    Ok(())
}
