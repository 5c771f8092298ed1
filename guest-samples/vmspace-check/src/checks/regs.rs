//! `regs`: what RUN does with the frames (ABI section 7): every register
//! round-trips through a `syscall`, `rflags` is sanitised, the selectors are
//! forced to the host's, the vextframe's FS and GS bases reach the user
//! code, and FPU/SSE state lives in the execution context. On success:
//!
//! ```text
//! ok regs.syscall.trapno        tf_trapno = T_FAST_SYSCALL (0x81)
//! ok regs.syscall.err           tf_err = 2
//! ok regs.syscall.rip           rip advanced by the 2 bytes of syscall
//! ok regs.syscall.rcx           rcx = the rip after the syscall
//! ok regs.syscall.r11           r11 = rflags as syscall saved them
//! ok regs.gprs                  every other register (rsp included) as passed
//! ok regs.rflags.sanitised      IOPL, VIF, VIP, reserved bits dropped; IF set
//! ok regs.rflags.frame          tf_rflags out = the sanitised rflags
//! ok regs.rflags.zero           rflags 0 runs with 0x202
//! ok regs.selectors.CS-SS       for several cs/ss pairs: forced to 0x33/0x2b
//! ok regs.tls.fs-base           fs:[0] reads the page at vx_tls[0].base
//! ok regs.tls.gs-base           gs:[0] reads the page at vx_tls[1].base
//! ok regs.tls.per-run           swapped bases in the next RUN swap the values
//! ok regs.tls.non-canonical     a non-canonical FS or GS base: EINVAL, the frame
//!                               untouched, and the vmspace still runs
//! ok regs.fpu.xmm0-kept         xmm0 set in one RUN is there in the next
//! ```

use vkabi::{RFLAGS_USER_MASK, RFLAGS_USER_SET, T_FAST_SYSCALL, TlsInfo, TrapFrame, VextFrame};

use crate::env::{Env, USER_CS, USER_SS, describe};
use crate::report::{Outcome, Report, errno_text, same, trap};
use crate::sys;
use crate::user::Snippet;

/// The general registers `syscall` leaves alone, by name.
fn gprs(tf: &TrapFrame) -> [(&'static str, u64); 14] {
    [
        ("rdi", tf.tf_rdi),
        ("rsi", tf.tf_rsi),
        ("rdx", tf.tf_rdx),
        ("r8", tf.tf_r8),
        ("r9", tf.tf_r9),
        ("rax", tf.tf_rax),
        ("rbx", tf.tf_rbx),
        ("rbp", tf.tf_rbp),
        ("r10", tf.tf_r10),
        ("r12", tf.tf_r12),
        ("r13", tf.tf_r13),
        ("r14", tf.tf_r14),
        ("r15", tf.tf_r15),
        ("rsp", tf.tf_rsp),
    ]
}

/// rflags with bits inside the mask (CF PF AF ZF SF DF OF), and outside it:
/// reserved bits 3, 5 and 15, IOPL 3, VIF, VIP; IF clear.
const RFLAGS_IN: u64 = 0x0CD5 | 0x8 | 0x20 | 0x8000 | 0x3000 | 0x8_0000 | 0x10_0000;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;

    // Every register distinct; rsp a plausible stack.
    let mut tf = user.frame(Snippet::Syscall);
    let mut v = 0x0123_4567_89AB_0000u64;
    for r in [
        &mut tf.tf_rdi,
        &mut tf.tf_rsi,
        &mut tf.tf_rdx,
        &mut tf.tf_rcx,
        &mut tf.tf_r8,
        &mut tf.tf_r9,
        &mut tf.tf_rax,
        &mut tf.tf_rbx,
        &mut tf.tf_rbp,
        &mut tf.tf_r10,
        &mut tf.tf_r11,
        &mut tf.tf_r12,
        &mut tf.tf_r13,
        &mut tf.tf_r14,
        &mut tf.tf_r15,
    ] {
        v = v.wrapping_add(0x1111_0000_0000_1111);
        *r = v;
    }
    tf.tf_rsp = user.data.end() - 0x48;
    tf.tf_rflags = RFLAGS_IN;
    let before = tf;
    let expected_rflags = (RFLAGS_IN & RFLAGS_USER_MASK) | RFLAGS_USER_SET;
    let rip = user.entry(Snippet::Syscall) + 2;
    vs.run_plain(&mut tf)?;
    rep.result("syscall.trapno", trap(&tf, T_FAST_SYSCALL, None));
    rep.eq("syscall.err", "tf_err", tf.tf_err, 2);
    rep.eq("syscall.rip", "tf_rip", tf.tf_rip, rip);
    rep.eq(
        "syscall.rcx",
        "tf_rcx (the rip after syscall)",
        tf.tf_rcx,
        rip,
    );
    rep.eq(
        "syscall.r11",
        "tf_r11 (rflags saved by syscall)",
        tf.tf_r11,
        expected_rflags,
    );
    let changed: Vec<String> = gprs(&before)
        .iter()
        .zip(gprs(&tf))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((name, a), (_, b))| format!("{name}: expected {a:#x}, got {b:#x}"))
        .collect();
    rep.check("gprs", changed.is_empty(), || changed.join("; "));

    rep.eq(
        "rflags.sanitised",
        &format!(
            "r11 after RUN with rflags {RFLAGS_IN:#x} (& {RFLAGS_USER_MASK:#x} | {RFLAGS_USER_SET:#x})"
        ),
        tf.tf_r11,
        expected_rflags,
    );
    rep.eq("rflags.frame", "tf_rflags", tf.tf_rflags, expected_rflags);
    let mut tf = user.frame(Snippet::Syscall);
    tf.tf_rflags = 0;
    vs.run_plain(&mut tf)?;
    rep.eq(
        "rflags.zero",
        "r11 after RUN with rflags 0",
        tf.tf_r11,
        RFLAGS_USER_SET,
    );

    // Selectors: compatibility mode, kernel, null and junk; all must run as
    // 64-bit user code and come back as the host's.
    for (cs, ss) in [(0x23, 0x2b), (0x08, 0x10), (0, 0), (0xffff, 0xffff)] {
        let mut tf = user.frame(Snippet::Syscall);
        tf.tf_cs = cs;
        tf.tf_ss = ss;
        let name = format!("selectors.{cs:#x}-{ss:#x}");
        let r = vs.run(&mut tf, &mut VextFrame::default());
        let detail = match r {
            Err(e) => Some(format!("vmspace_ctl(RUN): {}", errno_text(e))),
            Ok(()) => trap(&tf, T_FAST_SYSCALL, Some(rip)).err().or_else(|| {
                (tf.tf_cs != USER_CS || tf.tf_ss != USER_SS).then(|| {
                    format!(
                        "expected cs {USER_CS:#x} ss {USER_SS:#x}, got cs {:#x} ss {:#x}",
                        tf.tf_cs, tf.tf_ss
                    )
                })
            }),
        };
        rep.check(name, detail.is_none(), || detail.unwrap_or_default());
    }

    // TLS: data page 1 for FS, page 2 for GS.
    const FS_VALUE: u64 = 0xF5F5_0000_0000_0F50;
    const GS_VALUE: u64 = 0x6565_0000_0000_0650;
    env.store(user.data.pa(1, 0), FS_VALUE);
    env.store(user.data.pa(2, 0), GS_VALUE);
    let bases = |fs: u64, gs: u64| VextFrame {
        vx_tls: [TlsInfo { base: fs, size: 8 }, TlsInfo { base: gs, size: 8 }],
    };
    let mut tf = user.frame(Snippet::Tls);
    let mut vf = bases(user.data.va(1, 0), user.data.va(2, 0));
    vs.run(&mut tf, &mut vf)
        .map_err(|e| format!("vmspace_ctl(RUN) with TLS bases: {}", errno_text(e)))?;
    let ran = trap(&tf, T_FAST_SYSCALL, None);
    rep.result(
        "tls.fs-base",
        ran.clone()
            .and_then(|()| same(tf.tf_rax, FS_VALUE, "fs:[0]")),
    );
    rep.result(
        "tls.gs-base",
        ran.and_then(|()| same(tf.tf_rdx, GS_VALUE, "gs:[0]")),
    );
    let mut tf = user.frame(Snippet::Tls);
    let mut vf = bases(user.data.va(2, 0), user.data.va(1, 0));
    vs.run(&mut tf, &mut vf)
        .map_err(|e| format!("vmspace_ctl(RUN) with TLS bases: {}", errno_text(e)))?;
    rep.result(
        "tls.per-run",
        trap(&tf, T_FAST_SYSCALL, None)
            .and_then(|()| same(tf.tf_rax, GS_VALUE, "fs:[0] with the bases swapped"))
            .and_then(|()| same(tf.tf_rdx, FS_VALUE, "gs:[0] with the bases swapped")),
    );

    // No x86 FS or GS base is non-canonical: such a frame is refused.
    let mut detail = None;
    for (fs, gs) in [(1 << 47, 0), (0, 0x5707_0000_0000_0000), (u64::MAX >> 1, 0)] {
        let mut tf = user.frame(Snippet::Tls);
        let before = tf;
        let mut vf = bases(fs, gs);
        match vs.run(&mut tf, &mut vf) {
            Err(vkabi::hypercall::Errno(libc::EINVAL)) if tf == before => {}
            r => {
                detail = Some(format!(
                    "bases {fs:#x}/{gs:#x}: {r:?}, expected EINVAL ({})",
                    describe(&tf)
                ));
                break;
            }
        }
    }
    if detail.is_none() {
        let mut tf = user.frame(Snippet::Tls);
        let mut vf = bases(user.data.va(1, 0), user.data.va(2, 0));
        let after = vs.run(&mut tf, &mut vf);
        if after.is_err() || tf.tf_rax != FS_VALUE {
            detail = Some(format!("the next RUN: {after:?}, {}", describe(&tf)));
        }
    }
    rep.check("tls.non-canonical", detail.is_none(), || {
        detail.unwrap_or_default()
    });

    // FPU: xmm0 set in one RUN, read in the next; in between this thread
    // uses its own xmm0.
    const XMM: u64 = 0x0F0F_1234_5678_F0F0;
    let mut tf = user.frame(Snippet::XmmSet);
    tf.tf_rax = XMM;
    vs.run_plain(&mut tf)?;
    let set = trap(&tf, T_FAST_SYSCALL, None);
    sys::clobber_xmm0(0xBAD0_BAD0_BAD0_BAD0);
    let mut tf = user.frame(Snippet::XmmGet);
    tf.tf_rax = 0;
    vs.run_plain(&mut tf)?;
    rep.result(
        "fpu.xmm0-kept",
        set.and_then(|()| trap(&tf, T_FAST_SYSCALL, None))
            .and_then(|()| same(tf.tf_rax, XMM, "xmm0 read back in the next RUN"))
            .map_err(|e| format!("{e} ({})", describe(&tf))),
    );
    Ok(())
}
