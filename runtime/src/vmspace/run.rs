//! `vmspace_ctl(VMSPACE_CTL_RUN)`: running guest user code in a vmspace
//! (ABI section 7).
//!
//! Each (vmspace, guest thread) pair has an execution context: a thread in
//! the vmspace's stub, not traced, that runs the user code under a filter
//! trapping every system call, and reports every trap from its signal
//! handler through its block in the stub region (see
//! [`crate::sys::stub`]). No ptrace stop is on the path of a RUN. One RUN is
//! four hand-offs:
//!
//! 1. the guest's RUN reaches a hypercall thread (user notification), which
//!    copies the frame in, posts the registers to the block and wakes the
//!    context ([`start`]);
//! 2. the context returns from its handler into the user code;
//! 3. the user code traps; the handler writes the registers to the block and
//!    wakes the same hypercall thread, asleep on the block ([`Waiter`]);
//! 4. that thread copies the frame out and answers the notification.
//!
//! The thread that starts a RUN finishes it. A separate waiter thread was
//! one more task on the path: on one CPU, each task woken preempts its
//! waker, which must run again later just to go to sleep (5.5 context
//! switches per RUN instead of 4, about 3 µs). The pool of hypercall
//! threads keeps another one receiving when other guest tasks may call
//! meanwhile (the hypercall server's pool).
//!
//! A signal for the calling guest thread interrupts its wait for the answer
//! (the kernel withdraws the notification) and stops it for the tracer
//! ([`interrupt`]): the tracer kicks the context out of the user code, the
//! waiter writes the frame with `tf_trapno = 0`, and the tracer makes the
//! interrupted RUN return 0 before the signal is delivered. If the user code
//! had not started, RUN returns `EINTR` instead. A notification withdrawn
//! without a stop (the call restarts) finds its RUN still in flight and
//! takes it over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{
    Hypercall, PGEX_I, PGEX_W, T_FAST_SYSCALL, T_PAGEFLT, T_SIGNAL, T_SYSCALL80, TrapFrame,
    VextFrame,
};

use super::context::{Context, OnInterrupted, Pending, RunState};
use super::exit::{Report, Trap, canonical, frame_of, gregs_of, in_regs, trap_of};
use crate::error::{errno_or, raw_result as raw};
use crate::stats::Stats;
use crate::sys::abi::{ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS};
use crate::sys::seccomp::{Notification, NotifyFd};
use crate::sys::stub::{
    CX_KICK, CX_KICK_AT, CX_MASK_HELD, CX_SAVED_MASK, CX_SEQ, CX_STATE, KICK_SIGNAL, REG_RIP,
    STATE_GO, STATE_WAIT,
};
use crate::sys::{futex, lock, proc};
use crate::trace::TraceWriter;
use crate::trace::format::{format_call, format_result, format_trap};
use crate::tracee::remote::{self, RemoteAddr};
use crate::vpt::{StubFault, Vpt};

/// How long the tracer waits for a kicked context before declaring its stub
/// broken.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiter checks that its stub is alive.
const WAITER_POLL: Duration = Duration::from_millis(100);

/// What the waiters need: where answers go and what they count and trace.
#[derive(Debug)]
pub struct RunEnv {
    /// Whether the fast RUN is offered (`VMSPACE_CTL_FASTINFO`): not when
    /// RUNs are traced or `vkrun --run=hypercall`.
    pub fast: bool,
    pub notify: Arc<NotifyFd>,
    pub stats: Arc<Stats>,
    pub trace: Arc<Mutex<TraceWriter>>,
    pub vpt: Arc<Vpt>,
}

/// Read `tf` and `vf` of a RUN from the guest thread.
fn copy_in(tid: Pid, tf: u64, vf: u64) -> Result<(TrapFrame, VextFrame), Errno> {
    let mut t = [0u8; size_of::<TrapFrame>()];
    let mut v = [0u8; size_of::<VextFrame>()];
    remote::read_two(tid, (RemoteAddr(tf), &mut t), (RemoteAddr(vf), &mut v))
        .map_err(|_| Errno::EFAULT)?;
    Ok((TrapFrame::from_bytes(&t), VextFrame::from_bytes(&v)))
}

/// How [`start`] left a RUN.
pub enum Started {
    /// Answer the notification with this now.
    Done(Result<i64, Errno>),
    /// The user code runs: the caller waits for it with this waiter, which
    /// answers.
    Wait(Waiter),
    /// Nothing to answer: the same call restarted while its run is in flight
    /// (the thread waiting for that run answers), or a call withdrawn before
    /// it ran.
    Nothing,
}

/// Start `vmspace_ctl(id, RUN, tf, vf)` for notification `n` in context
/// `ctx` (on a hypercall thread).
pub fn start(ctx: &Arc<Context>, n: &Notification, env: &Arc<RunEnv>) -> Started {
    let mut st = lock(&ctx.state);
    if let Some(v) = st.completed.take() {
        // The answer to a withdrawn notification, for its restart.
        return Started::Done(errno_or(v));
    }
    if let Some(run) = st.run.as_mut() {
        // The same call, restarted after its notification was withdrawn.
        run.notif = n.id;
        return Started::Nothing;
    }
    if ctx.vm.is_dead() {
        return Started::Done(Err(Errno::EIO));
    }
    let (tf, vf) = match copy_in(ctx.guest, n.args[2], n.args[3]) {
        Ok(f) => f,
        Err(e) => return Started::Done(Err(e)),
    };
    if !vf.vx_tls.iter().all(|t| canonical(t.base)) {
        // `wrfsbase` would fault in the context's handler and take the
        // whole stub down; natively no FS or GS base can be non-canonical.
        return Started::Done(Err(Errno::EINVAL));
    }
    let run = Pending {
        run_no: st.runs + 1,
        notif: n.id,
        args: n.args,
        tf,
        vf,
        when: SystemTime::now(),
        started: Instant::now(),
    };
    // A signal may have withdrawn the call since it was received; then the
    // tracer, which takes this lock to end the guest thread's run, found
    // none, and the call has already returned EINTR or restarted. Running
    // its frame now would write a frame the guest no longer expects and
    // hand its result to the next RUN. Once the run is recorded below, a
    // signal finds it and ends it. (strace's words for a call a signal
    // interrupted before it did anything.)
    if !env.notify.id_valid(n.id) {
        env.stats.count_hypercall(Some(Hypercall::VmspaceCtl), true);
        let text = "= ? ERESTARTSYS (To be restarted if SA_RESTART is set)";
        trace_run(&env.trace, ctx.guest, &run, text, None);
        return Started::Nothing;
    }
    env.stats.runs.fetch_add(1, Ordering::Relaxed);
    trace_begin(&env.trace, ctx.guest, &run);
    // A fast RUN's fault goes on through this hypercall, whose waiter
    // records it here, so the retry finds it whichever path it takes.
    let retry = st
        .retry
        .take()
        .and_then(|(rip, addr, write)| (rip == tf.tf_rip).then_some((addr, write)));
    if let Some((addr, write)) = retry {
        // The vkernel most likely filled the VPTE and retries: spare the
        // user code a second fault (two hand-offs through the fault
        // thread).
        env.vpt.prefault(ctx.vm.stub, addr, write, ctx.guest);
    }
    // The context sleeps until it is posted: a report not yet seen is stale
    // (a kick that landed after the last run ended).
    ctx.seen
        .store(ctx.word(CX_SEQ).load(Ordering::Acquire), Ordering::Relaxed);
    let run_no = run.run_no;
    st.runs = run_no;
    st.run = Some(run);
    // Post without the lock: the context may run (and report) at once.
    drop(st);
    ctx.post(&gregs_of(&tf), vf.vx_tls[0].base, vf.vx_tls[1].base);
    Started::Wait(Waiter {
        ctx: Arc::clone(ctx),
        env: Arc::clone(env),
        run_no,
    })
}

/// The end of one RUN: the hypercall thread that started it sleeps on the
/// block's report counter until the run is answered.
pub struct Waiter {
    ctx: Arc<Context>,
    env: Arc<RunEnv>,
    /// The run it finishes.
    run_no: u64,
}

impl Waiter {
    /// Wait for the context's reports until the RUN is answered or taken
    /// back by the tracer, the context closes, or `stop` is set. `idle`
    /// runs whenever a wait times out (every [`WAITER_POLL`]).
    pub fn finish(self, stop: &AtomicBool, idle: impl Fn()) {
        let ctx = &*self.ctx;
        loop {
            if lock(&ctx.state).run.as_ref().map(|p| p.run_no) != Some(self.run_no) {
                return; // answered, or taken back by the tracer
            }
            let seq = ctx.word(CX_SEQ).load(Ordering::Acquire);
            if seq == ctx.seen.load(Ordering::Relaxed) {
                if ctx.closed.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
                    return;
                }
                if ctx.vm.is_dead() {
                    self.fail_pending(Errno::EIO, "the vmspace's host process died");
                    return;
                }
                if ctx.listener.is_some() {
                    let mine =
                        || lock(&ctx.state).run.as_ref().map(|p| p.run_no) == Some(self.run_no);
                    if ctx.recv_report(WAITER_POLL, &mine) {
                        if ctx.word(CX_SEQ).load(Ordering::Acquire) == seq {
                            // A notification without a report: the user
                            // code's own report call (ENOSYS for it), or a
                            // context not picked up that parked again.
                            ctx.answer_stray();
                        }
                        continue;
                    }
                    if ctx.word(CX_STATE).load(Ordering::Acquire) == STATE_GO {
                        // Not picked up: answer the notification kept in
                        // the block (another waiter received it).
                        ctx.go();
                    }
                } else {
                    let _ = futex::wait(ctx.word(CX_SEQ), seq, WAITER_POLL);
                }
                if ctx.word(CX_SEQ).load(Ordering::Acquire) != seq {
                    continue;
                }
                idle();
                let kicked = lock(&ctx.state)
                    .interrupt
                    .as_ref()
                    .map(|(at, _)| at.elapsed());
                if kicked.is_some_and(|t| t > KICK_TIMEOUT) {
                    // The user code ignores the kick (it blocked the signal,
                    // or keeps clearing the kick word): the stub is broken.
                    tracing::warn!(guest = %ctx.guest, "a vmspace context did not stop; killing its stub");
                    ctx.vm.mark_dead();
                    continue;
                }
                if lock(&ctx.state).run.is_some() && !proc::task_alive(ctx.vm.stub, ctx.tid) {
                    // The context's thread is gone (user code jumped into
                    // vkrun's code and ended it): this context is broken.
                    // Closed first: the answer lets the guest RUN again at
                    // once, and that RUN must find a fresh context.
                    ctx.closed.store(true, Ordering::Release);
                    self.fail_pending(Errno::EIO, "the execution context's thread ended");
                    return;
                }
                continue;
            }
            ctx.seen.store(seq, Ordering::Relaxed);
            self.on_report(Report::read(ctx));
        }
    }

    /// The stub or the context's thread died: fail the RUN in flight.
    fn fail_pending(&self, errno: Errno, why: &str) {
        let ctx = &*self.ctx;
        let mut st = lock(&ctx.state);
        let Some(p) = st.run.take() else {
            return;
        };
        tracing::warn!(vmspace = format_args!("{:#x}", p.args[0]), guest = %ctx.guest, "RUN failed: {why}");
        self.answer(&mut st, &p, Err(errno));
    }

    fn on_report(&self, mut r: Report) {
        r.undo_uretprobe();
        let ctx = &*self.ctx;
        let mut st = lock(&ctx.state);
        let Some(p) = st.run.clone() else {
            return; // a report nobody asked for (user code jumping around)
        };
        let mut trap = trap_of(&r);
        if r.sig as i32 == KICK_SIGNAL && !st.interrupted() {
            // A kick meant for an earlier run: carry on.
            ctx.post(&in_regs(&r), r.fs, r.gs);
            return;
        }
        if trap.trapno == T_PAGEFLT && r.sig as i32 == libc::SIGSEGV && !st.interrupted() {
            // A window fault (the page is PROT_NONE until installed): the
            // host resolves it if the walk allows the access (a first touch,
            // a read-only page written), else it is the vkernel's, with the
            // walk's error bits.
            match self
                .env
                .vpt
                .on_stub_fault(ctx.vm.stub, trap.addr, trap.err, ctx.guest)
            {
                StubFault::Retry => {
                    ctx.post(&in_regs(&r), r.fs, r.gs);
                    return;
                }
                StubFault::Report(err) => trap.err = err,
            }
        }
        st.run = None;
        st.retry = (trap.trapno == T_PAGEFLT && trap.err & PGEX_I == 0)
            .then(|| (r.gregs[REG_RIP], trap.addr, trap.err & PGEX_W != 0));
        let (tf, vf) = frame_of(&p, &r, trap);
        let written = remote::write_two(
            ctx.guest,
            (RemoteAddr(p.args[2]), &tf.to_bytes()),
            (RemoteAddr(p.args[3]), &vf.to_bytes()),
        )
        .map_err(|_| Errno::EFAULT);
        let stats = &self.env.stats;
        let exits = match trap.trapno {
            T_FAST_SYSCALL | T_SYSCALL80 => &stats.run_exits_syscall,
            T_PAGEFLT => &stats.run_exits_pagefault,
            T_SIGNAL => &stats.run_exits_signal,
            _ => &stats.run_exits_trap,
        };
        exits.fetch_add(1, Ordering::Relaxed);
        let result = written.map(|()| 0);
        self.trace(&p, result, Some((trap, tf.tf_rip, tf.tf_rax)));
        if st.interrupted() {
            ctx.word(CX_KICK).store(0, Ordering::Release);
            self.end_interrupt(&mut st, result);
            return;
        }
        self.respond(&mut st, &p, result);
    }

    /// Answer a RUN that ends without a report (its stub died).
    fn answer(&self, st: &mut RunState, p: &Pending, result: Result<i64, Errno>) {
        self.trace(p, result, None);
        if st.interrupted() {
            self.end_interrupt(st, result);
            return;
        }
        self.respond(st, p, result);
    }

    /// A RUN a signal interrupted ended with `result`: count it and hand it
    /// to the tracer, which makes the guest's call return it.
    fn end_interrupt(&self, st: &mut RunState, result: Result<i64, Errno>) {
        self.env
            .stats
            .count_hypercall(Some(Hypercall::VmspaceCtl), result.is_err());
        st.end_interrupt(raw(result));
    }

    fn respond(&self, st: &mut RunState, p: &Pending, result: Result<i64, Errno>) {
        self.env
            .stats
            .count_hypercall(Some(Hypercall::VmspaceCtl), result.is_err());
        match self.env.notify.respond(p.notif, result) {
            Ok(()) => {}
            // Withdrawn (a signal): the tracer or the restarted call takes it.
            Err(Errno::ENOENT) => st.completed = Some(raw(result)),
            Err(errno) => tracing::warn!(%errno, "answering RUN failed"),
        }
    }

    fn trace(&self, p: &Pending, result: Result<i64, Errno>, trap: Option<(Trap, u64, u64)>) {
        let text = format_result(result, false);
        trace_run(&self.env.trace, self.ctx.guest, p, &text, trap);
    }
}

/// The trace line of a finished RUN, if the trace wants it:
/// `vmspace_ctl(...) = 0 (T_FAST_SYSCALL rip=...)`.
fn trace_run(
    trace: &Mutex<TraceWriter>,
    guest: Pid,
    p: &Pending,
    result: &str,
    trap: Option<(Trap, u64, u64)>,
) {
    let mut trace = lock(trace);
    let set = *trace.set();
    if !(set.runs || set.hypercall(Some(Hypercall::VmspaceCtl))) {
        return;
    }
    let h = Hypercall::VmspaceCtl;
    let call = format_call(Some(h), h.nr(), p.args);
    let mut result = result.to_owned();
    if let Some((trap, rip, rax)) = trap {
        let trap = format_trap(trap.trapno, trap.err, trap.addr, rip, rax);
        result.push_str(&format!(" ({trap})"));
    }
    let took = trace.wants_durations().then(|| p.started.elapsed());
    trace.end(guest.as_raw(), p.when, &call, &result, took);
}

/// A RUN began: its line comes when it ends, unless a line of the user
/// code's faults (or another thread's) comes first: then strace's
/// `vmspace_ctl(... <unfinished ...>` and `<... vmspace_ctl resumed>) = 0`.
fn trace_begin(trace: &Mutex<TraceWriter>, guest: Pid, p: &Pending) {
    let mut trace = lock(trace);
    let set = *trace.set();
    if !(set.runs || set.hypercall(Some(Hypercall::VmspaceCtl))) {
        return;
    }
    let h = Hypercall::VmspaceCtl;
    trace.begin(guest.as_raw(), p.when, format_call(Some(h), h.nr(), p.args));
}

/// What a signal does to the RUN of the guest thread it stopped.
#[derive(Debug)]
pub enum Interrupted {
    /// Not a RUN in flight: deliver the signal as it is.
    NotConcerned,
    /// RUN returns this value at once (set `rax` and deliver the signal).
    Now(i64),
    /// The context was kicked; `then` gets RUN's value when it reports
    /// (within [`KICK_TIMEOUT`], or the stub is declared dead and RUN
    /// returns `EIO`). The guest thread stays in its stop until then.
    Later,
}

/// The tracer found guest thread `ctx.guest` in a signal-delivery-stop with
/// `rax` = `ret` while its RUN in `ctx` was in flight or unanswered: what
/// its RUN must return. The tracer never waits here: a run whose user code
/// is running is kicked, and its waiter hands the result to `then`.
pub fn interrupt(
    ctx: &Context,
    ret: i64,
    trace: &Mutex<TraceWriter>,
    then: OnInterrupted,
) -> Interrupted {
    if ![
        -ERESTARTSYS,
        -ERESTARTNOINTR,
        -ERESTARTNOHAND,
        -(libc::EINTR as i64),
    ]
    .contains(&ret)
    {
        return Interrupted::NotConcerned;
    }
    let mut st = lock(&ctx.state);
    if let Some(v) = st.completed.take() {
        return Interrupted::Now(v);
    }
    if st.run.is_none() || st.interrupted() {
        return Interrupted::NotConcerned;
    }
    // Not picked up yet: take the run back; RUN fails with EINTR.
    if ctx
        .word(CX_STATE)
        .compare_exchange(STATE_GO, STATE_WAIT, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        if let Some(p) = st.run.take() {
            let text = format_result(Err(Errno::EINTR), false);
            trace_run(trace, ctx.guest, &p, &text, None);
        }
        // Its waiter is asleep on the report counter: let it go.
        let _ = futex::wake(ctx.word(CX_SEQ));
        ctx.vm
            .stats()
            .count_hypercall(Some(Hypercall::VmspaceCtl), true);
        return Interrupted::Now(-(libc::EINTR as i64));
    }
    st.interrupt = Some((Instant::now(), then));
    ctx.word(CX_KICK).store(1, Ordering::Release);
    let _ = ctx.vm.kick(ctx.tid);
    Interrupted::Later
}

/// A signal stopped guest thread `ctx.guest` inside a fast RUN (its
/// wrapper's busy word is set): kick the user code out (the report ends
/// the RUN with `tf_trapno = 0`), and block the thread's signals so that
/// this one, queued again when the tracer resumes the thread with it, is
/// delivered only once the wrapper has written `tf` and restored the mask
/// it saved here. The thread is stopped, so the wrapper cannot race this;
/// it may only be about to post (the kick then waits for the user code)
/// or have its report already (the kick is then ignored). Whether the
/// signal is held.
pub fn hold(_: &crate::tracee::Tracer, ctx: &Context) -> bool {
    let tid = ctx.guest;
    if ctx.word(CX_MASK_HELD).load(Ordering::Acquire) == 0 {
        let Ok(mask) = crate::sys::ptrace::get_sigmask(tid) else {
            return false;
        };
        ctx.qword(CX_SAVED_MASK).store(mask, Ordering::Relaxed);
    }
    if crate::sys::ptrace::set_sigmask(tid, u64::MAX).is_err() {
        return false;
    }
    ctx.word(CX_MASK_HELD).store(1, Ordering::Release);
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(1);
    ctx.qword(CX_KICK_AT).store(now.max(1), Ordering::Relaxed);
    ctx.word(CX_KICK).store(1, Ordering::Release);
    let _ = ctx.vm.kick(ctx.tid);
    true
}
