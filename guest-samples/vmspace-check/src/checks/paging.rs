//! `paging`: user code in a vmspace through a `MAP_VPAGETABLE` window
//! (ABI sections 3, 5 and 7). The tables start empty; every page the user
//! code touches comes back as `T_PAGEFLT`, which this guest serves by
//! filling the VPTE and RUNning the same frame again, as a vkernel does. On
//! success:
//!
//! ```text
//! ok paging.demand.faults         one T_PAGEFLT per page, at the page, err U, rip
//!                                 at the load, none once the VPTE is there
//! ok paging.demand.sum            the user code's sum over the pages is right
//! ok paging.demand.writes         its stores landed in the frames
//! ok paging.demand.accessed-modified  A and M set on every entry of each walk
//! ok paging.readonly.read         a read-only VPTE reads
//! ok paging.readonly.accessed-not-modified  A set, M not
//! ok paging.readonly.write-faults a write to it: T_PAGEFLT with P|W|U
//! ok paging.readonly.no-m-on-failed-write  the failed write set no M
//! ok paging.readonly.upgrade-restarts  RW added (no INVAL): the store lands, M set
//! ok paging.nx.fetch-faults       a jump into an NX page: T_PAGEFLT with P|I|U
//! ok paging.nx.exec-after-clear   NX cleared: code in the window runs
//! ok paging.inval.writes-no-vpte  MADV_INVAL reads and writes no VPTE
//! ok paging.inval.new-frame-visible  a new frame shows after MADV_INVAL
//! ok paging.setmap.new-master     SETMAP with other tables shows their frame
//! ok paging.beyond-ram            a VPTE pointing beyond RAM: T_PAGEFLT, err U
//! ```

use vkabi::{
    MADV_INVAL, PAGE_SIZE, PGEX_I, PGEX_P, PGEX_U, PGEX_W, T_FAST_SYSCALL, T_PAGEFLT, VPTE_A,
    VPTE_M, VPTE_NX, VPTE_RW, VPTE_U,
};
use vpte::GuestPhysAddr;

use crate::checks::traps::{PGEX_MASK, pagefault};
use crate::env::{self, Env, Tables, Window, describe, stamp, stamp_frame};
use crate::report::{Outcome, Report, must, same, trap};
use crate::user::Snippet;

/// Where the window goes.
const WIN_VA: u64 = 0x1000_0000;
/// Pages the demand-paging loop touches.
const DEMAND: u64 = 6;
/// The read-only page.
const RO: u64 = DEMAND;
/// The NX page.
const NX: u64 = DEMAND + 1;
/// Pages in the window.
const PAGES: u64 = DEMAND + 2;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut pt = env.tables(64)?;
    let w = env.map_window(&vs, WIN_VA, PAGES, 0)?;
    w.setmap(&vs, pt.master())?;
    let rw = VPTE_RW | VPTE_U;

    // Demand paging: rax += [page]; [page + 8] = rax, for DEMAND pages.
    let frames = (0..DEMAND)
        .map(|_| env::frame(&mut pt))
        .collect::<Result<Vec<_>, _>>()?;
    for f in &frames {
        stamp_frame(env, *f);
    }
    let mut tf = user.frame(Snippet::SumPages);
    tf.tf_rbx = w.va(0, 0);
    tf.tf_rcx = DEMAND;
    tf.tf_rax = 0;
    let load_rip = user.entry(Snippet::SumPages);
    let mut faults = 0u64;
    let mut wrong = None;
    loop {
        vs.run_plain(&mut tf)?;
        if tf.tf_trapno != T_PAGEFLT || faults > DEMAND {
            break;
        }
        let want = pagefault(&tf, w.va(faults.min(DEMAND - 1), 0), PGEX_U, load_rip);
        if let Err(e) = want {
            wrong.get_or_insert(format!("fault {faults}: {e}"));
        }
        let page = (tf.tf_addr.wrapping_sub(w.va)) / PAGE_SIZE;
        if page >= DEMAND {
            wrong.get_or_insert(format!("fault outside the loop's pages: {}", describe(&tf)));
            break;
        }
        env::map(&mut pt, w.pindex(page), frames[page as usize], rw)?;
        faults += 1;
    }
    let ran = trap(&tf, T_FAST_SYSCALL, None);
    rep.result(
        "demand.faults",
        ran.clone().and_then(|()| match wrong {
            Some(e) => Err(e),
            None if faults != DEMAND => Err(format!("{faults} faults, expected {DEMAND}")),
            None => Ok(()),
        }),
    );
    let sums: Vec<u64> = frames
        .iter()
        .scan(0u64, |acc, f| {
            *acc = acc.wrapping_add(stamp(*f));
            Some(*acc)
        })
        .collect();
    let total = sums.last().copied().unwrap_or_default();
    rep.result(
        "demand.sum",
        ran.and_then(|()| {
            if tf.tf_rax == total {
                Ok(())
            } else {
                Err(format!("rax: expected {total:#x}, got {:#x}", tf.tf_rax))
            }
        }),
    );
    let lost = frames
        .iter()
        .zip(&sums)
        .enumerate()
        .find(|(_, (f, s))| env.load(GuestPhysAddr(f.0 + 8)) != **s);
    rep.check("demand.writes", lost.is_none(), || {
        let (i, (f, s)) = lost.expect("a lost store");
        format!(
            "page {i}: frame word 1 holds {:#x}, expected {s:#x}",
            env.load(GuestPhysAddr(f.0 + 8))
        )
    });
    rep.result(
        "demand.accessed-modified",
        walked(env, &pt, &w, 0..DEMAND, VPTE_A | VPTE_M),
    );

    readonly(env, rep, &vs, &user, &mut pt, &w)?;
    nx(env, rep, &vs, &user, &mut pt, &w)?;

    // A new frame for page 0 shows after MADV_INVAL, which touches no VPTE.
    let fresh = env::frame(&mut pt)?;
    stamp_frame(env, fresh);
    env::map(&mut pt, w.pindex(0), fresh, rw)?;
    let before = env.path(pt.root(), w.pindex(0));
    must(
        "vmspace_mcontrol(MADV_INVAL)",
        vs.mcontrol(w.va(0, 0), PAGE_SIZE, MADV_INVAL, 0),
    )?;
    let after = env.path(pt.root(), w.pindex(0));
    rep.check("inval.writes-no-vpte", before == after, || {
        format!("before {before:?}, after {after:?}")
    });
    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = w.va(0, 0);
    vs.run_plain(&mut tf)?;
    rep.result(
        "inval.new-frame-visible",
        trap(&tf, T_FAST_SYSCALL, None)
            .and_then(|()| same(tf.tf_rax, stamp(fresh), "the load after MADV_INVAL")),
    );

    // Other tables through SETMAP.
    let mut other = env.tables(8)?;
    let f = env::frame(&mut other)?;
    stamp_frame(env, f);
    env::map(&mut other, w.pindex(0), f, rw)?;
    w.setmap(&vs, other.master())?;
    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = w.va(0, 0);
    vs.run_plain(&mut tf)?;
    rep.result(
        "setmap.new-master",
        trap(&tf, T_FAST_SYSCALL, None)
            .and_then(|()| same(tf.tf_rax, stamp(f), "the load after SETMAP")),
    );

    // A leaf pointing at the last page of RAM plus one page.
    let beyond = GuestPhysAddr(env.info.ram_size & !(PAGE_SIZE - 1));
    env::map(&mut other, w.pindex(1), beyond, rw)?;
    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = w.va(1, 0);
    vs.run_plain(&mut tf)?;
    rep.result(
        "beyond-ram",
        pagefault(&tf, w.va(1, 0), PGEX_U, user.entry(Snippet::Load)),
    );
    Ok(())
}

/// That every entry on the walks of `pages` has `bits`.
fn walked(
    env: &Env,
    pt: &Tables,
    w: &Window,
    pages: std::ops::Range<u64>,
    bits: u64,
) -> Result<(), String> {
    for page in pages {
        for (level, entry) in env.path(pt.root(), w.pindex(page)) {
            if !entry.has(bits) {
                return Err(format!(
                    "page {page}: the {level} entry {entry} lacks {bits:#x}"
                ));
            }
        }
    }
    Ok(())
}

fn readonly(
    env: &mut Env,
    rep: &mut Report,
    vs: &crate::env::Vmspace,
    user: &crate::env::User,
    pt: &mut Tables,
    w: &Window,
) -> Outcome {
    let g = env::frame(pt)?;
    stamp_frame(env, g);
    env::map(pt, w.pindex(RO), g, VPTE_U)?;
    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = w.va(RO, 0);
    vs.run_plain(&mut tf)?;
    rep.result(
        "readonly.read",
        trap(&tf, T_FAST_SYSCALL, None)
            .and_then(|()| same(tf.tf_rax, stamp(g), "the load of a read-only page")),
    );
    let leaf = env::leaf(pt, w.pindex(RO));
    rep.check(
        "readonly.accessed-not-modified",
        leaf.has(VPTE_A) && !leaf.has(VPTE_M),
        || format!("leaf {leaf} after a read: expected A and no M"),
    );
    const VALUE: u64 = 0x0707_0000_0000_0707;
    let mut tf = user.frame(Snippet::Store);
    tf.tf_rbx = w.va(RO, 8);
    tf.tf_rdx = VALUE;
    vs.run_plain(&mut tf)?;
    rep.result(
        "readonly.write-faults",
        pagefault(
            &tf,
            w.va(RO, 8),
            PGEX_P | PGEX_W | PGEX_U,
            user.entry(Snippet::Store),
        ),
    );
    let leaf = env::leaf(pt, w.pindex(RO));
    rep.check("readonly.no-m-on-failed-write", !leaf.has(VPTE_M), || {
        format!("leaf {leaf} has M after a write that faulted")
    });
    let pa = env::leaf_pa(pt, w.pindex(RO))?;
    env.ram[(pa.0 / 8) as usize].fetch_or(VPTE_RW, std::sync::atomic::Ordering::SeqCst);
    vs.run_plain(&mut tf)?;
    let landed = env.load(GuestPhysAddr(g.0 + 8));
    let leaf = env::leaf(pt, w.pindex(RO));
    rep.result(
        "readonly.upgrade-restarts",
        trap(&tf, T_FAST_SYSCALL, None)
            .and_then(|()| same(landed, VALUE, "the frame after the restarted store"))
            .and_then(|()| {
                if leaf.has(VPTE_A | VPTE_M) {
                    Ok(())
                } else {
                    Err(format!("leaf {leaf} lacks A|M after the store"))
                }
            }),
    );
    Ok(())
}

fn nx(
    env: &mut Env,
    rep: &mut Report,
    vs: &crate::env::Vmspace,
    user: &crate::env::User,
    pt: &mut Tables,
    w: &Window,
) -> Outcome {
    let h = env::frame(pt)?;
    env.write_bytes(h, Snippet::Syscall.bytes());
    env::map(pt, w.pindex(NX), h, VPTE_RW | VPTE_U | VPTE_NX)?;
    let target = w.va(NX, 0);
    let mut tf = user.frame(Snippet::Jump);
    tf.tf_rbx = target;
    vs.run_plain(&mut tf)?;
    rep.result(
        "nx.fetch-faults",
        pagefault(&tf, target, PGEX_P | PGEX_I | PGEX_U, target)
            .map_err(|e| format!("{e} (err compared in {PGEX_MASK:#x})")),
    );
    pt.protect(w.pindex(NX), VPTE_RW | VPTE_U)
        .map_err(|e| format!("protect: {e}"))?;
    // Clearing NX is an upgrade; INVAL anyway, the ABI lists only
    // invalid-to-valid and read-only-to-writable as needing none.
    must(
        "vmspace_mcontrol(MADV_INVAL)",
        vs.mcontrol(target, PAGE_SIZE, MADV_INVAL, 0),
    )?;
    vs.run_plain(&mut tf)?;
    rep.result(
        "nx.exec-after-clear",
        trap(&tf, T_FAST_SYSCALL, Some(target + 2)),
    );
    Ok(())
}
