//! `errors`: every error ABI section 7 names, the argument rules of
//! `vmspace_mmap` (section 4) and `vmspace_mcontrol` (section 5), and
//! `EBUSY` for a vmspace another thread is running in. On success:
//!
//! ```text
//! ok errors.enoent.CALL              CALL on an id never created: ENOENT
//!                                    (vmspace_destroy, _ctl, _mmap, _munmap,
//!                                    _mcontrol, _pread, _pwrite)
//! ok errors.enoent.destroyed         vmspace_destroy and _ctl after a destroy
//! ok errors.null-id.CALL             CALL with id NULL: EINVAL (all eight)
//! ok errors.eexist                   create of an existing id: EEXIST
//! ok errors.ctl-cmd.N                cmd N != VMSPACE_CTL_RUN: EOPNOTSUPP
//! ok errors.efault.tf-WHAT           bad tf (null, 8, unmapped, running into
//!                                    an unmapped page, kernel): EFAULT
//! ok errors.efault.vf-WHAT           bad vf (null, 8, unmapped, running into
//!                                    an unmapped page): EFAULT
//! ok errors.efault.tf-partial-untouched  the mapped part of a tf running into an
//!                                    unmapped page is not written
//! ok errors.efault.tf-untouched      a good tf with a bad vf is not written
//! ok errors.efault.caller-intact     a good RUN afterwards works
//! ok errors.prw-flags.CALL-FLAGS     pread/pwrite with flags != 0: EINVAL
//! ok errors.munmap.*                 length 0, wrap, beyond user_max, not
//!                                    entirely mapped, page offset folded
//! ok errors.mmap.*                   the VPAGETABLE rules, length 0, beyond
//!                                    user_max, wrap; linear, anonymous,
//!                                    anywhere, big offset, last user page
//! ok errors.mcontrol.*               SETMAP on linear, mixed ranges, behav
//!                                    0..9, bad behav, wrap, beyond user_max,
//!                                    unmapped parts skipped
//! ok errors.ebusy                    destroy while another thread RUNs
//! ok errors.ebusy.signal-ends-run    a signal makes that RUN return (trapno 0)
//! ok errors.ebusy.destroy-after      then destroy succeeds
//! ```

use std::os::fd::AsRawFd;

use vkabi::hypercall::{self, Errno};
use vkabi::{
    MADV_INVAL, MADV_SETMAP, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, MAP_STACK,
    MAP_VPAGETABLE, PAGE_SIZE, PROT_READ, PROT_WRITE, T_FAST_SYSCALL, T_SIGNAL, TrapFrame,
    USER_MAX, VMSPACE_CTL_RUN, VPTE_RW, VPTE_U, VextFrame,
};

use crate::env::{self, Env, Vmspace, describe, stamp, stamp_frame};
use crate::report::{Outcome, Report, errno_text, must, show, trap};
use crate::runner::Runner;
use crate::sys::{self, Hole};
use crate::user::Snippet;

/// An id nobody creates.
const UNKNOWN: u64 = 0x7673_dead_0000_0001;
const RW: i32 = PROT_READ | PROT_WRITE;
/// Scratch addresses in the vmspaces of this area.
const M: u64 = 0x0100_0000;
const V: u64 = 0x0200_0000;
const GAP: u64 = 0x0300_0000;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    enoent(env, rep)?;
    null_id(rep);
    eexist(env, rep)?;
    ctl(env, rep)?;
    prw_flags(env, rep)?;
    munmap(env, rep)?;
    mmap(env, rep)?;
    mcontrol(env, rep)?;
    ebusy(env, rep)
}

/// Every vmspace call with `id`, valid otherwise: (name, result).
fn every_call(id: u64) -> Vec<(&'static str, Result<u64, Errno>)> {
    let mut tf = TrapFrame::default();
    let mut vf = VextFrame::default();
    let mut buf = [0u8; 8];
    let anon = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    vec![
        (
            "vmspace_destroy",
            hypercall::vmspace_destroy(id).map(|()| 0),
        ),
        (
            "vmspace_ctl",
            hypercall::vmspace_ctl(id, VMSPACE_CTL_RUN, &mut tf, &mut vf).map(|()| 0),
        ),
        (
            "vmspace_mmap",
            hypercall::vmspace_mmap(id, M, PAGE_SIZE, RW, anon, -1, 0),
        ),
        (
            "vmspace_munmap",
            hypercall::vmspace_munmap(id, M, PAGE_SIZE).map(|()| 0),
        ),
        (
            "vmspace_mcontrol",
            hypercall::vmspace_mcontrol(id, M, PAGE_SIZE, MADV_INVAL, 0).map(|()| 0),
        ),
        (
            "vmspace_pread",
            hypercall::vmspace_pread(id, &mut buf, 0, M).map(|n| n as u64),
        ),
        (
            "vmspace_pwrite",
            hypercall::vmspace_pwrite(id, &buf, 0, M).map(|n| n as u64),
        ),
    ]
}

fn enoent(env: &mut Env, rep: &mut Report) -> Outcome {
    for (name, r) in every_call(UNKNOWN) {
        rep.errno(
            format_args!("enoent.{name}"),
            &format!("{name}({UNKNOWN:#x}, ...)"),
            r,
            Errno::ENOENT,
        );
    }
    let vs = env.vmspace()?;
    let id = vs.leak();
    must("vmspace_destroy", hypercall::vmspace_destroy(id))?;
    let again = hypercall::vmspace_destroy(id);
    let mut tf = TrapFrame::default();
    let run = hypercall::vmspace_ctl(id, VMSPACE_CTL_RUN, &mut tf, &mut VextFrame::default());
    rep.check(
        "enoent.destroyed",
        again == Err(Errno::ENOENT) && run == Err(Errno::ENOENT),
        || {
            format!(
                "after destroy: vmspace_destroy {}, vmspace_ctl {}; expected ENOENT for both",
                show(&again),
                show(&run)
            )
        },
    );
    Ok(())
}

fn null_id(rep: &mut Report) {
    rep.errno(
        "null-id.vmspace_create",
        "vmspace_create(NULL)",
        hypercall::vmspace_create(0, 0, 0),
        Errno::EINVAL,
    );
    for (name, r) in every_call(0) {
        rep.errno(
            format_args!("null-id.{name}"),
            &format!("{name}(NULL, ...)"),
            r,
            Errno::EINVAL,
        );
    }
}

fn eexist(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    rep.errno(
        "eexist",
        &format!("second vmspace_create({:#x})", vs.id()),
        hypercall::vmspace_create(vs.id(), 0, 0),
        Errno::EEXIST,
    );
    Ok(())
}

/// The frame as bytes, to see whether a call wrote it.
fn frame_bytes(tf: &TrapFrame) -> [u64; 25] {
    [
        tf.tf_rdi,
        tf.tf_rsi,
        tf.tf_rdx,
        tf.tf_rcx,
        tf.tf_r8,
        tf.tf_r9,
        tf.tf_rax,
        tf.tf_rbx,
        tf.tf_rbp,
        tf.tf_r10,
        tf.tf_r11,
        tf.tf_r12,
        tf.tf_r13,
        tf.tf_r14,
        tf.tf_r15,
        tf.tf_xflags,
        tf.tf_trapno,
        tf.tf_addr,
        tf.tf_flags,
        tf.tf_err,
        tf.tf_rip,
        tf.tf_cs,
        tf.tf_rflags,
        tf.tf_rsp,
        tf.tf_ss,
    ]
}

/// `vmspace_ctl` with bad commands and bad pointers, then a good RUN.
fn ctl(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let id = vs.id();
    let good = user.frame(Snippet::Syscall);

    for cmd in [0i32, 2, -1, 0x100] {
        let mut tf = good;
        let mut vf = VextFrame::default();
        let r = hypercall::vmspace_ctl(id, cmd, &mut tf, &mut vf);
        rep.errno(
            format_args!("ctl-cmd.{cmd}"),
            &format!("vmspace_ctl({id:#x}, {cmd}, tf, vf)"),
            r,
            Errno::EOPNOTSUPP,
        );
    }

    let hole = Hole::new(1).map_err(|e| format!("mmap for a hole: {e}"))?;
    let tf_size = size_of::<TrapFrame>() as u64;
    let vf_size = size_of::<VextFrame>() as u64;
    // The part of a frame that fits before the hole is filled with a marker
    // that must survive.
    hole.fill_before_hole(tf_size / 2, 0x5a);
    let mut vf = VextFrame::default();
    let vf_ptr = &raw mut vf as u64;
    let bad_tfs = [
        ("null", 0),
        ("8", 8),
        ("unmapped", hole.unmapped()),
        ("into-unmapped", hole.before_hole(tf_size / 2)),
        ("kernel", 0xffff_8000_0000_0000),
    ];
    for (what, tf) in bad_tfs {
        let r = sys::vmspace_ctl_raw(id, VMSPACE_CTL_RUN, tf, vf_ptr);
        rep.errno(
            format_args!("efault.tf-{what}"),
            &format!("vmspace_ctl(RUN, tf {tf:#x}, vf)"),
            r,
            Errno::EFAULT,
        );
    }
    let kept = hole.bytes_before_hole(tf_size / 2);
    rep.check(
        "efault.tf-partial-untouched",
        kept.iter().all(|b| *b == 0x5a),
        || "the mapped part of a tf running into an unmapped page was written".to_owned(),
    );
    let mut tf = good;
    let tf_ptr = &raw mut tf as u64;
    let bad_vfs = [
        ("null", 0),
        ("8", 8),
        ("unmapped", hole.unmapped()),
        ("into-unmapped", hole.before_hole(vf_size / 2)),
    ];
    for (what, vf) in bad_vfs {
        let r = sys::vmspace_ctl_raw(id, VMSPACE_CTL_RUN, tf_ptr, vf);
        rep.errno(
            format_args!("efault.vf-{what}"),
            &format!("vmspace_ctl(RUN, tf, vf {vf:#x})"),
            r,
            Errno::EFAULT,
        );
    }
    let untouched = frame_bytes(&tf) == frame_bytes(&good);
    rep.check("efault.tf-untouched", untouched, || {
        format!(
            "a good tf passed with a bad vf was written: {}",
            describe(&tf)
        )
    });
    drop(hole);

    let mut tf = good;
    let r = vs.run(&mut tf, &mut VextFrame::default());
    rep.result(
        "efault.caller-intact",
        r.map_err(|e| format!("the RUN after the EFAULTs: {}", errno_text(e)))
            .and_then(|()| trap(&tf, T_FAST_SYSCALL, Some(user.entry(Snippet::Syscall) + 2))),
    );
    Ok(())
}

fn prw_flags(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let data = env.map_linear(&vs, M, 1, RW)?;
    let mut buf = [0u8; 8];
    for flags in [1i32, -1, 0x100] {
        rep.errno(
            format_args!("prw-flags.pread-{flags:#x}"),
            &format!("vmspace_pread(8 bytes at {:#x}, flags {flags:#x})", data.va),
            hypercall::vmspace_pread(vs.id(), &mut buf, flags, data.va),
            Errno::EINVAL,
        );
        rep.errno(
            format_args!("prw-flags.pwrite-{flags:#x}"),
            &format!(
                "vmspace_pwrite(8 bytes at {:#x}, flags {flags:#x})",
                data.va
            ),
            hypercall::vmspace_pwrite(vs.id(), &buf, flags, data.va),
            Errno::EINVAL,
        );
    }
    Ok(())
}

/// Whether `va` is mapped in `vs`, as a 1-byte `vmspace_pread` sees it.
fn mapped(vs: &Vmspace, va: u64) -> Result<bool, String> {
    let mut b = [0u8; 1];
    match vs.pread(&mut b, va) {
        Ok(1) => Ok(true),
        Ok(0) => Ok(false),
        r => Err(format!("vmspace_pread(1 byte at {va:#x}): {}", show(&r))),
    }
}

/// The mapped state of `pages` pages from `va`, compared with `want`.
fn pages_are(vs: &Vmspace, va: u64, want: &[bool]) -> Result<(), String> {
    for (i, w) in want.iter().enumerate() {
        let at = va + i as u64 * PAGE_SIZE;
        let got = mapped(vs, at)?;
        if got != *w {
            return Err(format!(
                "page {at:#x} is {}mapped, expected {}mapped",
                if got { "" } else { "not " },
                if *w { "" } else { "not " }
            ));
        }
    }
    Ok(())
}

fn munmap(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    env.map_linear(&vs, M, 3, RW)?;
    let call = |va: u64, len: u64| {
        (
            format!("vmspace_munmap({va:#x}, {len:#x})"),
            vs.munmap(va, len),
        )
    };

    let (c1, r1) = call(M, 0);
    let (c2, r2) = call(GAP, 0);
    rep.check("munmap.zero-length", r1.is_ok() && r2.is_ok(), || {
        format!("{c1}: {}; {c2}: {}; expected 0", show(&r1), show(&r2))
    });
    for (name, va, len) in [
        ("munmap.wrap", M, 0xffff_ffff_ffff_f000),
        ("munmap.wrap-high", 0xffff_ffff_ffff_f000, 0x2000),
        (
            "munmap.end-beyond-user-max",
            USER_MAX - PAGE_SIZE,
            2 * PAGE_SIZE,
        ),
        ("munmap.at-user-max", USER_MAX, PAGE_SIZE),
        ("munmap.not-entirely-mapped", M, 4 * PAGE_SIZE),
        ("munmap.nothing-mapped", GAP, PAGE_SIZE),
    ] {
        let (c, r) = call(va, len);
        rep.errno(name, &c, r, Errno::EINVAL);
    }
    rep.result(
        "munmap.failed-call-unmaps-nothing",
        pages_are(&vs, M, &[true, true, true]),
    );
    // [M + 0x10, M + 0x1010) is pages 0 and 1.
    let (c, r) = call(M + 0x10, PAGE_SIZE);
    rep.result(
        "munmap.page-offset-folded",
        r.map_err(|e| format!("{c}: {}", errno_text(e)))
            .and_then(|()| pages_are(&vs, M, &[false, false, true])),
    );
    let (c, r) = call(M + 2 * PAGE_SIZE, PAGE_SIZE);
    rep.result(
        "munmap.ok",
        r.map_err(|e| format!("{c}: {}", errno_text(e)))
            .and_then(|()| pages_are(&vs, M, &[false, false, false])),
    );
    Ok(())
}

fn mmap(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let fd = env.ram_fd();
    let vpt = MAP_SHARED | MAP_VPAGETABLE | MAP_FIXED;
    let linear = MAP_SHARED | MAP_FIXED;
    let anon = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    let zero = std::fs::File::open("/dev/zero").map_err(|e| format!("open /dev/zero: {e}"))?;
    let other_fd = zero.as_raw_fd();
    let len = 2 * PAGE_SIZE;
    let einval: [(&str, u64, u64, i32, i32, i32); 13] = [
        (
            "vpt-private",
            V,
            len,
            RW,
            MAP_PRIVATE | MAP_VPAGETABLE | MAP_FIXED,
            fd,
        ),
        ("vpt-other-fd", V, len, RW, vpt, other_fd),
        ("vpt-no-fd", V, len, RW, vpt, -1),
        ("vpt-read-only", V, len, PROT_READ, vpt, fd),
        ("vpt-write-only", V, len, PROT_WRITE, vpt, fd),
        ("vpt-prot-none", V, len, 0, vpt, fd),
        ("vpt-map-stack", V, len, RW, vpt | MAP_STACK, fd),
        ("vpt-zero-length", V, 0, RW, vpt, fd),
        ("linear-zero-length", V, 0, RW, linear, fd),
        ("anon-zero-length", V, 0, RW, anon, -1),
        (
            "end-beyond-user-max",
            USER_MAX - PAGE_SIZE,
            len,
            RW,
            linear,
            fd,
        ),
        ("at-user-max", USER_MAX, PAGE_SIZE, RW, anon, -1),
        ("wrap", 0xffff_ffff_ffff_f000, len, RW, anon, -1),
    ];
    for (name, va, len, prot, flags, fd) in einval {
        let r = vs.mmap(va, len, prot, flags, fd, 0);
        rep.errno(
            format_args!("mmap.{name}"),
            &format!("vmspace_mmap({va:#x}, {len:#x}, prot {prot:#x}, flags {flags:#x}, fd {fd})"),
            r,
            Errno::EINVAL,
        );
    }
    drop(zero);

    // What works, checked through vmspace_pread/pwrite.
    let pa = env.frames(1)?;
    stamp_frame(env, pa);
    let r = vs.mmap(V, PAGE_SIZE, RW, linear, fd, pa.0);
    rep.result(
        "mmap.linear-fixed",
        check_at(&vs, r, Some(V), Some(stamp(pa))),
    );
    let r = vs.mmap(0, PAGE_SIZE, RW, MAP_SHARED, fd, pa.0);
    rep.result(
        "mmap.linear-anywhere",
        check_at(&vs, r, None, Some(stamp(pa))),
    );
    let r = vs.mmap(V + 0x10_0000, PAGE_SIZE, RW, anon, -1, 0);
    rep.result(
        "mmap.anon-fixed",
        check_at(&vs, r, Some(V + 0x10_0000), Some(0)),
    );
    let r = vs.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    rep.result("mmap.anon-anywhere", check_at(&vs, r, None, Some(0)));
    // DragonFly maps its kernel with offset 512 GiB: not checked against RAM.
    let r = vs.mmap(V + 0x20_0000, len, RW, vpt, fd, 512 << 30);
    rep.result(
        "mmap.vpt-big-offset",
        check_at(&vs, r, Some(V + 0x20_0000), None),
    );
    let last = USER_MAX - PAGE_SIZE;
    let r = vs.mmap(last, PAGE_SIZE, RW, anon, -1, 0);
    let r = check_at(&vs, r, Some(last), Some(0)).and_then(|()| {
        let word = 0x1A57_0000_0000_0001u64.to_le_bytes();
        match vs.pwrite(&word, USER_MAX - 8) {
            Ok(8) => Ok(()),
            r => Err(format!("vmspace_pwrite of the last 8 bytes: {}", show(&r))),
        }
    });
    rep.result("mmap.last-user-page", r);
    Ok(())
}

/// That a `vmspace_mmap` returned `want` (or, if `None`, a page-aligned
/// address with the page below `user_max`), and that the page's first word
/// reads `word` (if given).
fn check_at(
    vs: &Vmspace,
    r: Result<u64, Errno>,
    want: Option<u64>,
    word: Option<u64>,
) -> Result<(), String> {
    let got = r.map_err(|e| format!("vmspace_mmap: {}", errno_text(e)))?;
    match want {
        Some(w) if got != w => return Err(format!("expected {w:#x}, got {got:#x}")),
        None if !got.is_multiple_of(PAGE_SIZE) || got > USER_MAX - PAGE_SIZE => {
            return Err(format!(
                "the supervisor picked {got:#x}: not a page below user_max {USER_MAX:#x}"
            ));
        }
        _ => {}
    }
    if let Some(w) = word {
        let v = vs.read_word(got)?;
        if v != w {
            return Err(format!(
                "the mapping at {got:#x} reads {v:#x}, expected {w:#x}"
            ));
        }
    }
    Ok(())
}

fn mcontrol(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let lin = env.map_linear(&vs, M, 1, RW)?;
    let win = env.map_window(&vs, V, 2, 0)?;
    let mut pt = env.tables(8)?;
    let f = env::frame(&mut pt)?;
    stamp_frame(env, f);
    env::map(&mut pt, win.pindex(0), f, VPTE_RW | VPTE_U)?;
    let master = pt.master().raw();
    let call = |va: u64, len: u64, behav: i32, value: u64| {
        (
            format!("vmspace_mcontrol({va:#x}, {len:#x}, {behav}, {value:#x})"),
            vs.mcontrol(va, len, behav, value),
        )
    };

    let (c, r) = call(lin.va, lin.len(), MADV_SETMAP, master);
    rep.errno("mcontrol.setmap-linear", &c, r, Errno::EINVAL);
    // From the linear page over a gap to the window's end: EINVAL, but the
    // window still gets its master.
    let (c, r) = call(lin.va, win.va + win.len() - lin.va, MADV_SETMAP, master);
    let r = if r == Err(Errno::EINVAL) {
        vs.read_word(win.va).and_then(|v| {
            if v == stamp(f) {
                Ok(())
            } else {
                Err(format!(
                    "{c}: EINVAL as expected, but the window reads {v:#x} through it, not {:#x}",
                    stamp(f)
                ))
            }
        })
    } else {
        Err(format!("{c}: expected EINVAL, got {}", show(&r)))
    };
    rep.result("mcontrol.setmap-mixed", r);

    let bad: Vec<String> = (0..=9)
        .filter_map(|behav| {
            let (c, r) = call(lin.va, lin.len(), behav, 0);
            r.is_err().then(|| format!("{c}: {}", show(&r)))
        })
        .collect();
    rep.check("mcontrol.behav.0-9", bad.is_empty(), || {
        format!("expected success: {}", bad.join("; "))
    });
    for behav in [12, 13, 100, -1] {
        let (c, r) = call(lin.va, lin.len(), behav, 0);
        rep.errno(format_args!("mcontrol.behav.{behav}"), &c, r, Errno::EINVAL);
    }
    for (name, va, len) in [
        ("mcontrol.wrap", win.va, 0xffff_ffff_ffff_f000),
        (
            "mcontrol.end-beyond-user-max",
            USER_MAX - PAGE_SIZE,
            2 * PAGE_SIZE,
        ),
    ] {
        let (c, r) = call(va, len, MADV_INVAL, 0);
        rep.errno(name, &c, r, Errno::EINVAL);
    }
    let (c1, r1) = call(GAP, PAGE_SIZE, MADV_INVAL, 0);
    let (c2, r2) = call(GAP, PAGE_SIZE, MADV_SETMAP, master);
    rep.check(
        "mcontrol.unmapped-skipped",
        r1.is_ok() && r2.is_ok(),
        || format!("{c1}: {}; {c2}: {}; expected 0", show(&r1), show(&r2)),
    );
    let (c, r) = call(win.va, win.len(), MADV_INVAL, 0);
    rep.success("mcontrol.inval-window", &c, r);
    Ok(())
}

/// `EBUSY`: destroy while a runner thread spins inside RUN.
fn ebusy(env: &mut Env, rep: &mut Report) -> Outcome {
    sys::install_counter(libc::SIGUSR1, true).map_err(|e| format!("sigaction: {e}"))?;
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut runner = Runner::new(vs.id());
    let mut tf = user.frame(Snippet::Spin);
    tf.tf_rbx = user.data.va(0, 0);
    runner.start(tf, VextFrame::default())?;
    runner.wait_progress(env.ram, user.data.pa(0, 0), 0)?;
    let r = hypercall::vmspace_destroy(vs.id());
    rep.errno(
        "ebusy",
        &format!("vmspace_destroy({:#x}) while a thread RUNs it", vs.id()),
        r,
        Errno::EBUSY,
    );
    runner.signal(libc::SIGUSR1)?;
    let end = runner.wait_end()?;
    rep.result(
        "ebusy.signal-ends-run",
        end.ok().and_then(|()| trap(&end.tf, T_SIGNAL, None)),
    );
    drop(runner);
    let id = vs.leak();
    let r = hypercall::vmspace_destroy(id);
    rep.success(
        "ebusy.destroy-after",
        &format!("vmspace_destroy({id:#x}) after the RUN returned"),
        r,
    );
    Ok(())
}
