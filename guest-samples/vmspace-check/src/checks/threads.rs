//! `threads`: each guest thread that RUNs gets its own execution context,
//! two threads may RUN the same vmspace at the same time, and vmspaces are
//! isolated from each other (ABI section 7). On success:
//!
//! ```text
//! ok threads.same-vmspace.concurrent  two runner threads' user code meets: each
//!                                     waits for the other's flag, so both ran at once
//! ok threads.same-vmspace.counters    each counted its own word exactly N times
//! ok threads.same-vmspace.own-registers  each got its own registers back
//! ok threads.fpu-per-thread           xmm0 set by each thread is its own in its next RUN
//! ok threads.vmspaces.linear          the same VA maps each vmspace's own frame
//! ok threads.vmspaces.anon            an anonymous page written in one reads 0 in the other
//! ok threads.vmspaces.pread           vmspace_pread of the two differs accordingly
//! ok threads.vmspaces.mapping-absent  a page mapped in one faults in the other
//! ok threads.calls-beside-run         while one thread's RUN spins, another thread's
//!                                     hypercalls (vk_info, vmspace_pread) are answered
//!                                     at once, 100 times each (at most 5 pairs over
//!                                     50 ms, for a loaded machine)
//! ```

use std::time::{Duration, Instant};

use vkabi::hypercall;
use vkabi::{
    MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, PGEX_U, PROT_READ, PROT_WRITE, T_FAST_SYSCALL,
    TrapFrame, VextFrame,
};

use crate::checks::traps::pagefault;
use crate::env::{Env, Vmspace, describe, stamp, stamp_frame};
use crate::report::{Outcome, Report, errno_text, must, trap};
use crate::runner::{RunEnd, Runner};
use crate::sys;
use crate::user::Snippet;

/// Increments each thread makes.
const N: u64 = 100_000;
const ANON_VA: u64 = 0x0200_0000;
const ONLY_A_VA: u64 = 0x0300_0000;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    same_vmspace(env, rep)?;
    two_vmspaces(env, rep)?;
    calls_beside_run(env, rep)
}

/// An answer `calls_beside_run` calls prompt (a call waiting for a free
/// hypercall thread would take until the RUN ends, or vkrun's 100 ms
/// safety net, every time).
const PROMPT: Duration = Duration::from_millis(50);
/// Pairs of calls of the 100 that may be slower than [`PROMPT`]: on a
/// loaded machine a thread is sometimes not scheduled for that long (seen
/// at load averages of 10 and more); a starved pool makes every pair slow.
const SLOW_ALLOWED: u32 = 5;

/// Hypercalls from this thread while a runner's RUN spins in user code.
fn calls_beside_run(env: &mut Env, rep: &mut Report) -> Outcome {
    // The runner's RUN ends with a signal it handles.
    sys::install_counter(libc::SIGUSR1, true).map_err(|e| format!("sigaction: {e}"))?;
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let progress = user.data.pa(0, 0);
    env.store(progress, 0);
    let mut runner = Runner::new(vs.id());
    let mut tf = user.frame(Snippet::Spin);
    tf.tf_rbx = user.data.va(0, 0);
    runner.start(tf, VextFrame::default())?;
    runner.wait_progress(env.ram, progress, 0)?;
    let mut slowest = Duration::ZERO;
    let mut slow = 0;
    let mut failure = None;
    let mut buf = [0u8; 8];
    for _ in 0..100 {
        let t = Instant::now();
        let info = hypercall::vk_info();
        let read = vs.pread(&mut buf, user.data.va(0, 0));
        let took = t.elapsed();
        slowest = slowest.max(took);
        slow += u32::from(took > PROMPT);
        if let Err(e) = info {
            failure = Some(format!("vk_info: {}", errno_text(e)));
        } else if read != Ok(8) {
            failure = Some(format!("vmspace_pread: {read:?}"));
        }
    }
    runner.signal(libc::SIGUSR1)?;
    let end = runner.wait_end()?;
    end.ok()?;
    let detail = failure.or_else(|| {
        (slow > SLOW_ALLOWED).then(|| {
            format!("{slow} of 100 pairs of calls took over {PROMPT:?}, the slowest {slowest:?}")
        })
    });
    rep.check("calls-beside-run", detail.is_none(), || {
        detail.unwrap_or_default()
    });
    Ok(())
}

fn same_vmspace(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut a = Runner::new(vs.id());
    let mut b = Runner::new(vs.id());
    // A's flag and counter at words 0 and 1, B's at words 8 and 9.
    let (flag_a, flag_b) = (user.data.va(0, 0), user.data.va(0, 64));
    let frame = |mine: u64, other: u64, mark: u64| {
        let mut tf = user.frame(Snippet::Meet);
        tf.tf_rbx = mine;
        tf.tf_rdx = other;
        tf.tf_rcx = N;
        tf.tf_r12 = mark;
        tf.tf_r13 = !mark;
        tf.tf_rsp = user.data.end() - mark % 256 * 8;
        tf
    };
    let (tf_a, tf_b) = (
        frame(flag_a, flag_b, 0xAAAA_0000_0000_00A1),
        frame(flag_b, flag_a, 0xBBBB_0000_0000_00B2),
    );
    a.start(tf_a, VextFrame::default())?;
    b.start(tf_b, VextFrame::default())?;
    let (end_a, end_b) = (a.wait_end(), b.wait_end());
    let both = end_a.and_then(|a| end_b.map(|b| (a, b)));
    let ran = both.as_ref().map_err(Clone::clone).and_then(|(a, b)| {
        for (who, end) in [("A", a), ("B", b)] {
            end.ok()
                .and_then(|()| trap(&end.tf, T_FAST_SYSCALL, None))
                .map_err(|e| format!("thread {who}: {e}"))?;
        }
        Ok(())
    });
    rep.result(
        "same-vmspace.concurrent",
        ran.clone().map_err(|e| {
            format!("{e} (the code of each thread waits until the other's has started)")
        }),
    );
    let (ca, cb) = (env.load(user.data.pa(0, 8)), env.load(user.data.pa(0, 72)));
    rep.check(
        "same-vmspace.counters",
        ran.is_ok() && ca == N && cb == N,
        || format!("counters A {ca:#x} and B {cb:#x}, expected {N:#x} each"),
    );
    let own = both.and_then(|(ea, eb)| {
        own_registers("A", &tf_a, &ea)?;
        own_registers("B", &tf_b, &eb)
    });
    rep.result("same-vmspace.own-registers", own);

    // FPU per context, interleaved: A sets, B sets, A reads, B reads.
    let (xa, xb) = (0xA0A0_1111_2222_0A0Au64, 0xB0B0_3333_4444_0B0Bu64);
    let set = |r: &mut Runner, v: u64| -> Result<RunEnd, String> {
        let mut tf = user.frame(Snippet::XmmSet);
        tf.tf_rax = v;
        r.run(tf, VextFrame::default())
    };
    let get = |r: &mut Runner| -> Result<u64, String> {
        let end = r.run(user.frame(Snippet::XmmGet), VextFrame::default())?;
        end.ok()?;
        trap(&end.tf, T_FAST_SYSCALL, None)?;
        Ok(end.tf.tf_rax)
    };
    set(&mut a, xa)?;
    set(&mut b, xb)?;
    let (ga, gb) = (get(&mut a)?, get(&mut b)?);
    rep.check("fpu-per-thread", ga == xa && gb == xb, || {
        format!("xmm0 read back: A {ga:#x} (expected {xa:#x}), B {gb:#x} (expected {xb:#x})")
    });
    Ok(())
}

fn own_registers(who: &str, sent: &TrapFrame, end: &RunEnd) -> Result<(), String> {
    let got = &end.tf;
    let pairs = [
        ("rbx", sent.tf_rbx, got.tf_rbx),
        ("rdx", sent.tf_rdx, got.tf_rdx),
        ("r12", sent.tf_r12, got.tf_r12),
        ("r13", sent.tf_r13, got.tf_r13),
        ("rsp", sent.tf_rsp, got.tf_rsp),
    ];
    for (name, want, have) in pairs {
        if want != have {
            return Err(format!(
                "thread {who}: {name} expected {want:#x}, got {have:#x} ({})",
                describe(got)
            ));
        }
    }
    Ok(())
}

fn two_vmspaces(env: &mut Env, rep: &mut Report) -> Outcome {
    let a = env.vmspace()?;
    let b = env.vmspace()?;
    let ua = env.user(&a)?;
    let ub = env.user(&b)?;
    stamp_frame(env, ua.data.pa(0, 0));
    stamp_frame(env, ub.data.pa(0, 0));
    let (sa, sb) = (stamp(ua.data.pa(0, 0)), stamp(ub.data.pa(0, 0)));

    // The same VA, each its own frame.
    let load = |vs: &Vmspace, user: &crate::env::User, va: u64| -> Result<TrapFrame, String> {
        let mut tf = user.frame(Snippet::Load);
        tf.tf_rbx = va;
        vs.run_plain(&mut tf)?;
        Ok(tf)
    };
    let (ta, tb) = (load(&a, &ua, ua.data.va)?, load(&b, &ub, ub.data.va)?);
    rep.check(
        "vmspaces.linear",
        ta.tf_trapno == T_FAST_SYSCALL
            && tb.tf_trapno == T_FAST_SYSCALL
            && ta.tf_rax == sa
            && tb.tf_rax == sb,
        || {
            format!(
                "loads at {:#x}: A {} (expected rax {sa:#x}), B {} (expected rax {sb:#x})",
                ua.data.va,
                describe(&ta),
                describe(&tb)
            )
        },
    );

    // Anonymous memory at the same VA: written in A, still 0 in B.
    let anon = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    for vs in [&a, &b] {
        must(
            "vmspace_mmap(anonymous)",
            vs.mmap(ANON_VA, 4096, PROT_READ | PROT_WRITE, anon, -1, 0),
        )?;
    }
    const VALUE: u64 = 0xA11C_E000_0000_0001;
    let mut tf = ua.frame(Snippet::Store);
    tf.tf_rbx = ANON_VA;
    tf.tf_rdx = VALUE;
    a.run_plain(&mut tf)?;
    let stored = trap(&tf, T_FAST_SYSCALL, None);
    let tb = load(&b, &ub, ANON_VA)?;
    rep.result(
        "vmspaces.anon",
        stored.and_then(|()| {
            if tb.tf_trapno == T_FAST_SYSCALL && tb.tf_rax == 0 {
                Ok(())
            } else {
                Err(format!(
                    "A stored {VALUE:#x} at {ANON_VA:#x}; B's load there: {} (expected rax 0)",
                    describe(&tb)
                ))
            }
        }),
    );
    let pa = (a.read_word(ANON_VA)?, b.read_word(ANON_VA)?);
    let pl = (a.read_word(ua.data.va)?, b.read_word(ub.data.va)?);
    rep.check("vmspaces.pread", pa == (VALUE, 0) && pl == (sa, sb), || {
        format!(
            "vmspace_pread A/B at {ANON_VA:#x}: {:#x}/{:#x} (expected {VALUE:#x}/0), \
                 at {:#x}: {:#x}/{:#x} (expected {sa:#x}/{sb:#x})",
            pa.0, pa.1, ua.data.va, pl.0, pl.1
        )
    });

    // A page only A maps.
    env.map_linear(&a, ONLY_A_VA, 1, PROT_READ | PROT_WRITE)?;
    let tb = load(&b, &ub, ONLY_A_VA)?;
    rep.result(
        "vmspaces.mapping-absent",
        pagefault(&tb, ONLY_A_VA, PGEX_U, ub.entry(Snippet::Load)),
    );
    Ok(())
}
