//! `signals`: a signal for the guest thread that is inside RUN ends the RUN
//! (ABI section 7: returns 0 with `tf_trapno` 0, the guest's handler runs
//! after the return), the frame shows how far the user code got, and
//! RUNning that frame again continues. Checked for a handler installed with
//! `SA_RESTART` (SIGUSR1) and one without (SIGUSR2), each signal sent with
//! `pthread_kill` from this thread while the runner thread's user code
//! spins, counting in rax and storing the count where this thread watches.
//! For each KIND (`sa-restart`, `no-sa-restart`), on success:
//!
//! ```text
//! ok signals.KIND.returns-0        vmspace_ctl returned 0
//! ok signals.KIND.trapno-0         tf_trapno 0
//! ok signals.KIND.progress         rax at least the count seen, rip in the loop,
//!                                  the other registers as passed
//! ok signals.KIND.handler-once     the handler ran once, on the runner thread,
//!                                  by the time RUN returned
//! ok signals.KIND.rerun-continues  RUN of that frame counts on from there
//! ok signals.KIND.second-signal    a second signal ends that RUN too (trapno 0,
//!                                  rax grew)
//! ok signals.KIND.handler-once-again  and the handler ran once more
//! ok signals.KIND.no-extra-handler no handler runs later
//! ok signals.ignored.keeps-running  a signal the guest does not handle
//!                                  (SIGCHLD, SIGWINCH at their default) does not
//!                                  end the RUN: the user code counts on, and a
//!                                  handled signal then ends it with trapno 0
//! ok signals.storm.consistent      a thread RUNs short runs (`syscall` at once)
//!                                  back to back while this thread sends it
//!                                  SIGUSR2 (no SA_RESTART) every few
//!                                  microseconds: every RUN that returns 0 returns
//!                                  its own frame (T_FAST_SYSCALL, tf_err 2, rip
//!                                  past the `syscall`; or T_SIGNAL, rip on it and
//!                                  a handler run during the call; each with
//!                                  the rax it was given), never an earlier
//!                                  call's, and every other RUN fails with EINTR
//! ok signals.storm.interrupted     the signals did land inside RUNs: some RUNs
//!                                  failed with EINTR or ended with trapno 0
//! ```

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vkabi::hypercall::Errno;
use vkabi::{T_FAST_SYSCALL, T_SIGNAL, TrapFrame, VMSPACE_CTL_RUN, VextFrame};

use crate::env::{Env, User, describe};
use crate::report::{Outcome, Report, errno_text, trap};
use crate::runner::{RunEnd, Runner};
use crate::sys;
use crate::user::Snippet;

/// A register the spinning code leaves alone.
const MARK: u64 = 0x5167_0000_0000_00A1;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    sys::install_counter(libc::SIGUSR1, true).map_err(|e| format!("sigaction: {e}"))?;
    sys::install_counter(libc::SIGUSR2, false).map_err(|e| format!("sigaction: {e}"))?;
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    for (kind, sig) in [
        ("sa-restart", libc::SIGUSR1),
        ("no-sa-restart", libc::SIGUSR2),
    ] {
        round(env, &user, vs.id(), rep, kind, sig)?;
    }
    ignored(env, &user, vs.id(), rep)?;
    storm(&user, vs.id(), rep)
}

/// How long the storm lasts.
const STORM: Duration = Duration::from_secs(2);
/// rax of the storm's RUNs: `getpid` (39) in the half the kernel reads as
/// the system call number, the RUN's sequence number above it. (Numbers
/// 335 and 336 would not trap: Linux lets them past every seccomp filter.)
const STORM_NR: u64 = 39;
/// `tf_trapno` as the storm passes it: RUN must overwrite it.
const UNSET: u64 = 0xFFFF;

/// What the storm's runner saw.
#[derive(Debug, Default)]
struct Storm {
    runs: u64,
    eintr: u64,
    signalled: u64,
    /// The first inconsistent RUN.
    bad: Option<String>,
}

/// RUN `syscall` back to back until `stop`, each RUN with its own rax.
fn storm_runner(id: u64, start: TrapFrame, stop: &AtomicBool) -> Storm {
    let mut seen = Storm::default();
    while !stop.load(Ordering::Relaxed) && seen.bad.is_none() {
        let rax = seen.runs << 32 | STORM_NR;
        seen.runs += 1;
        let mut tf = TrapFrame {
            tf_rax: rax,
            tf_trapno: UNSET,
            ..start
        };
        let mut vf = VextFrame::default();
        let (handled_before, _) = sys::handled(libc::SIGUSR2);
        // Raw RUNs and the library's (the fast RUN, when vkrun offers it)
        // alternate on the one context.
        let result = if seen.runs % 2 == 0 {
            sys::vmspace_ctl_raw(id, VMSPACE_CTL_RUN, &raw mut tf as u64, &raw mut vf as u64)
        } else {
            vkabi::hypercall::vmspace_ctl(id, VMSPACE_CTL_RUN, &mut tf, &mut vf)
        };
        let signalled = sys::handled(libc::SIGUSR2).0 != handled_before;
        // The user code is one `syscall` (2 bytes) at `start.tf_rip`.
        let own = tf.tf_rax == rax
            && match tf.tf_trapno {
                T_FAST_SYSCALL => tf.tf_err == 2 && tf.tf_rip == start.tf_rip + 2,
                T_SIGNAL => signalled && tf.tf_rip == start.tf_rip,
                _ => false,
            };
        match result {
            Err(Errno(libc::EINTR)) => seen.eintr += 1,
            Err(e) => seen.bad = Some(format!("RUN {rax:#x} failed: {}", errno_text(e))),
            Ok(()) if !own => {
                seen.bad = Some(format!(
                    "RUN with rax {rax:#x} (handler ran: {signalled}) returned 0 with \
                     another frame: {}",
                    describe(&tf)
                ));
            }
            Ok(()) => seen.signalled += u64::from(tf.tf_trapno == T_SIGNAL),
        }
    }
    seen
}

/// A signal storm against a thread doing short RUNs: a signal may land
/// while the supervisor is receiving a RUN, posting it, or answering it.
fn storm(user: &User, id: u64, rep: &mut Report) -> Outcome {
    let start = user.frame(Snippet::Syscall);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let runner = std::thread::spawn(move || storm_runner(id, start, &flag));
    let until = Instant::now() + STORM;
    let mut pause = 1u64;
    let mut sent = 0u64;
    while Instant::now() < until && !runner.is_finished() {
        sys::pthread_kill(runner.as_pthread_t(), libc::SIGUSR2)
            .map_err(|e| format!("pthread_kill: {e}"))?;
        sent += 1;
        // 1-64 microseconds apart, so signals fall on every phase of a RUN.
        pause = pause * 37 % 64 + 1;
        std::thread::sleep(Duration::from_micros(pause));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = runner.join().map_err(|_| "the storm's runner panicked")?;
    let counts = format!(
        "{} RUNs, {} signals sent, {} EINTR, {} ended with trapno 0",
        seen.runs, sent, seen.eintr, seen.signalled
    );
    let bad = seen.bad.clone();
    rep.check("storm.consistent", bad.is_none(), || {
        format!("{} ({counts})", bad.unwrap_or_default())
    });
    rep.check("storm.interrupted", seen.eintr + seen.signalled > 0, || {
        format!("no RUN was interrupted: {counts}")
    });
    Ok(())
}

/// Signals without a handler leave RUN running (as they leave any system
/// call natively); a handled one ends it.
fn ignored(env: &Env, user: &User, id: u64, rep: &mut Report) -> Outcome {
    let progress = user.data.pa(0, 0);
    env.store(progress, 0);
    let mut runner = Runner::new(id);
    let mut tf = user.frame(Snippet::Spin);
    tf.tf_rbx = user.data.va(0, 0);
    tf.tf_rax = 0;
    runner.start(tf, VextFrame::default())?;
    let mut seen = runner.wait_progress(env.ram, progress, 0)?;
    let mut detail = None;
    for sig in [libc::SIGCHLD, libc::SIGWINCH, libc::SIGCHLD] {
        runner.signal(sig)?;
        if let Some(end) = runner.wait_end_for(Duration::from_millis(100))? {
            detail = Some(format!(
                "signal {sig} (no handler) ended RUN: {:?}, {}",
                end.result,
                describe(&end.tf)
            ));
            break;
        }
        match runner.wait_progress(env.ram, progress, seen) {
            Ok(now) => seen = now,
            Err(e) => {
                detail = Some(format!("after signal {sig} (no handler): {e}"));
                break;
            }
        }
    }
    if detail.is_none() {
        runner.signal(libc::SIGUSR1)?;
        let end = runner.wait_end()?;
        if let Err(e) = end.ok().and_then(|()| trap(&end.tf, T_SIGNAL, None)) {
            detail = Some(format!("the handled signal after them: {e}"));
        }
    }
    rep.check("ignored.keeps-running", detail.is_none(), || {
        detail.unwrap_or_default()
    });
    Ok(())
}

fn slot(sig: i32) -> usize {
    usize::from(sig != libc::SIGUSR1)
}

fn round(env: &Env, user: &User, id: u64, rep: &mut Report, kind: &str, sig: i32) -> Outcome {
    let progress = user.data.pa(0, 0);
    env.store(progress, 0);
    let mut runner = Runner::new(id);
    let mut tf = user.frame(Snippet::Spin);
    tf.tf_rbx = user.data.va(0, 0);
    tf.tf_r12 = MARK;
    tf.tf_rax = 0;
    let start = tf;
    let loop_ =
        user.entry(Snippet::Spin)..user.entry(Snippet::Spin) + Snippet::Spin.bytes().len() as u64;

    runner.start(tf, VextFrame::default())?;
    let seen = runner.wait_progress(env.ram, progress, 0)?;
    let (before, _) = sys::handled(sig);
    runner.signal(sig)?;
    let end = runner.wait_end()?;
    rep.result(format_args!("{kind}.returns-0"), end.ok());
    rep.result(
        format_args!("{kind}.trapno-0"),
        trap(&end.tf, T_SIGNAL, None),
    );
    let tf = end.tf;
    let detail = if tf.tf_rax < seen {
        Some(format!(
            "rax {:#x} is below the count {seen:#x} the code had stored",
            tf.tf_rax
        ))
    } else if !loop_.contains(&tf.tf_rip) {
        Some(format!(
            "rip {:#x} is outside the loop {loop_:#x?}",
            tf.tf_rip
        ))
    } else if tf.tf_rbx != start.tf_rbx || tf.tf_r12 != MARK || tf.tf_rsp != start.tf_rsp {
        Some(format!(
            "rbx/r12/rsp changed: {:#x}/{:#x}/{:#x}, passed {:#x}/{MARK:#x}/{:#x}",
            tf.tf_rbx, tf.tf_r12, tf.tf_rsp, start.tf_rbx, start.tf_rsp
        ))
    } else {
        None
    };
    rep.check(format_args!("{kind}.progress"), detail.is_none(), || {
        detail.unwrap_or_default()
    });
    handler_once(rep, kind, "handler-once", &end, sig, before + 1);

    // RUN that frame again: it counts on from its rax.
    let first = tf;
    runner.start(first, VextFrame::default())?;
    let more = runner.wait_progress(env.ram, progress, first.tf_rax);
    rep.result(
        format_args!("{kind}.rerun-continues"),
        more.as_ref().map(drop).map_err(|e| {
            format!(
                "after RUN of the returned frame (rax {:#x}): {e}",
                first.tf_rax
            )
        }),
    );
    more?;
    runner.signal(sig)?;
    let end = runner.wait_end()?;
    let second = check_second(&end, &first);
    rep.result(format_args!("{kind}.second-signal"), second);
    handler_once(rep, kind, "handler-once-again", &end, sig, before + 2);
    drop(runner);
    std::thread::sleep(Duration::from_millis(50));
    let (now, _) = sys::handled(sig);
    rep.eq(
        format_args!("{kind}.no-extra-handler"),
        "handler runs in total",
        now - before,
        2,
    );
    Ok(())
}

fn check_second(end: &RunEnd, first: &TrapFrame) -> Result<(), String> {
    end.ok()?;
    trap(&end.tf, T_SIGNAL, None)?;
    if end.tf.tf_rax <= first.tf_rax {
        return Err(format!(
            "rax {:#x} did not grow past {:#x} ({})",
            end.tf.tf_rax,
            first.tf_rax,
            describe(&end.tf)
        ));
    }
    Ok(())
}

fn handler_once(rep: &mut Report, kind: &str, name: &str, end: &RunEnd, sig: i32, want: u64) {
    let (count, tid) = end.handled[slot(sig)];
    rep.check(
        format_args!("{kind}.{name}"),
        count == want && tid == end.tid,
        || {
            format!(
                "when RUN returned the handler had run {count} times in all (expected {want}), \
                 last on thread {tid} (the runner is {})",
                end.tid
            )
        },
    );
}
