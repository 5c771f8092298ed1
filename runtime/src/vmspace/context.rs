//! EXECUTION CONTEXTS: a (vmspace, guest thread) pair, whose thread in
//! the stub runs the user code until it traps. The context posts
//! registers to its block, kicks its thread out of the user code, closes;
//! its run state says which RUN is in flight ([`crate::vmspace::run`]
//! drives it).
//!
//! Lock order: a context's `state` is not held while waiting on the
//! context's thread except through a bounded wait.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{TrapFrame, VextFrame};

use super::space::Vmspace;
use crate::sys::seccomp::NotifyFd;
use crate::sys::stub::{
    CX_BUSY, CX_FS_IN, CX_GS_IN, CX_IN, CX_KICK, CX_N_PAGEFAULT, CX_N_RUNS, CX_N_SIGNAL,
    CX_N_SYSCALL, CX_N_TRAP, CX_NOTIF_ID, CX_OPEN, CX_RECV_LOCK, CX_SEQ, CX_STATE, FAST_OPEN,
    GREGS_IN, STATE_EXIT, STATE_GO,
};

/// How long a "go" waits for the report notification it answers, when
/// its waiter handled the report before receiving it.
const NOTIF_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(100);
use crate::sys::{futex, lock};

/// A RUN in flight.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// Which run of the context this is (its waiter's ticket).
    pub(super) run_no: u64,
    /// The notification to answer (a restarted call replaces it).
    pub(super) notif: u64,
    pub(super) args: [u64; 6],
    /// The frame as copied in (fields the run does not change come back).
    pub(super) tf: TrapFrame,
    pub(super) vf: VextFrame,
    pub(super) when: SystemTime,
    pub(super) started: Instant,
}

#[derive(Debug, Default)]
pub(super) struct RunState {
    pub(super) run: Option<Pending>,
    /// The last run ended with `T_PAGEFLT` for a data access: (rip, address,
    /// write). If the next RUN retries that instruction, its page is
    /// resolved before the user code runs.
    pub(super) retry: Option<(u64, u64, bool)>,
    /// Runs started so far.
    pub(super) runs: u64,
    /// A RUN whose frame was written but whose answer found the notification
    /// withdrawn: its result, for the tracer or the restarted call.
    pub(super) completed: Option<i64>,
    /// A signal interrupted the run: since when, and what to do with RUN's
    /// result once the context has reported (or is declared dead). The
    /// guest thread waits in its signal-delivery-stop meanwhile; the
    /// tracer does not wait.
    pub(super) interrupt: Option<(Instant, OnInterrupted)>,
}

/// What becomes of an interrupted RUN's result (see [`RunState::interrupt`]).
pub struct OnInterrupted(pub Box<dyn FnOnce(i64) + Send>);

impl std::fmt::Debug for OnInterrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnInterrupted")
    }
}

impl RunState {
    /// Whether a signal interrupted the run in flight.
    pub(super) fn interrupted(&self) -> bool {
        self.interrupt.is_some()
    }

    /// The interrupted run ended with `result`: hand it on.
    pub(super) fn end_interrupt(&mut self, result: i64) {
        if let Some((_, OnInterrupted(then))) = self.interrupt.take() {
            then(result);
        }
    }
}

/// One execution context: a (vmspace, guest thread) pair.
#[derive(Debug)]
pub struct Context {
    pub vm: Arc<Vmspace>,
    /// Block index in the stub region.
    pub slot: usize,
    /// The context's thread in the stub.
    pub tid: Pid,
    /// The guest thread it serves.
    pub guest: Pid,
    pub(super) state: Mutex<RunState>,
    /// Reports seen by the waiter.
    pub(super) seen: AtomicU32,
    /// The context is being destroyed: its waiter ends.
    pub(super) closed: AtomicBool,
    /// The context's listener, when it reports by user notification (its
    /// handler sleeps in its report until the next "go" answers it).
    pub(super) listener: Option<NotifyFd>,
}

impl Context {
    /// A context whose thread `tid` has made its first report.
    pub fn new(
        vm: Arc<Vmspace>,
        slot: usize,
        tid: Pid,
        guest: Pid,
        seen: u32,
        listener: Option<NotifyFd>,
    ) -> Self {
        Self {
            vm,
            slot,
            tid,
            guest,
            state: Mutex::new(RunState::default()),
            seen: AtomicU32::new(seen),
            closed: AtomicBool::new(false),
            listener,
        }
    }

    pub(super) fn word(&self, off: usize) -> &AtomicU32 {
        self.vm.block_word(self.slot, off)
    }

    pub(super) fn qword(&self, off: usize) -> &AtomicU64 {
        self.vm.block_qword(self.slot, off)
    }

    /// Whether the context has ended (its guest thread died, or its thread
    /// in the stub is gone).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether a RUN of this context is in flight or unanswered.
    pub fn busy(&self) -> bool {
        let st = lock(&self.state);
        st.run.is_some() || st.completed.is_some()
    }

    /// Whether the guest thread is inside a fast RUN of this context (its
    /// wrapper says so in the block: the guest's word, trusted only for
    /// what it harms, the guest itself).
    pub fn fast_busy(&self) -> bool {
        self.word(CX_BUSY).load(Ordering::SeqCst) != 0
    }

    /// Add the fast RUNs the guest's wrapper counted in the block to the
    /// counters (at most once each: the counts are taken).
    pub fn sum_fast_counts(&self) {
        let stats = self.vm.stats();
        let take = |off| self.qword(off).swap(0, Ordering::Relaxed);
        stats.runs.fetch_add(take(CX_N_RUNS), Ordering::Relaxed);
        stats
            .run_exits_syscall
            .fetch_add(take(CX_N_SYSCALL), Ordering::Relaxed);
        stats
            .run_exits_pagefault
            .fetch_add(take(CX_N_PAGEFAULT), Ordering::Relaxed);
        stats
            .run_exits_trap
            .fetch_add(take(CX_N_TRAP), Ordering::Relaxed);
        stats
            .run_exits_signal
            .fetch_add(take(CX_N_SIGNAL), Ordering::Relaxed);
    }

    /// Withdraw the fast path (for a destroy that may still fail): whether
    /// it was offered.
    pub(super) fn close_fast(&self) -> bool {
        self.word(CX_OPEN).swap(0, Ordering::SeqCst) == FAST_OPEN
    }

    /// Offer the fast path (again).
    pub(super) fn open_fast(&self) {
        self.word(CX_OPEN).store(FAST_OPEN, Ordering::SeqCst);
    }

    /// End the context: its thread exits, its waiter returns.
    pub fn close(&self) {
        // A fast RUN's wrapper sees the block closed and gives up (`EIO`),
        // or takes the hypercall next time.
        self.word(CX_OPEN).store(0, Ordering::SeqCst);
        self.sum_fast_counts();
        self.closed.store(true, Ordering::Release);
        lock(&self.state).end_interrupt(-(Errno::EIO as i64));
        self.word(CX_STATE).store(STATE_EXIT, Ordering::Release);
        self.go();
        let _ = futex::wake(self.word(CX_SEQ));
        // If its user code is running (its guest thread died inside RUN),
        // kick it into the handler, which then sees EXIT.
        self.word(CX_KICK).store(1, Ordering::Release);
        let _ = self.vm.kick(self.tid);
    }

    /// Post registers and go. (The kick flag is left alone: a kick for this
    /// run may already be on its way.)
    pub(super) fn post(&self, gregs: &[u64; GREGS_IN], fs: u64, gs: u64) {
        for (i, v) in gregs.iter().enumerate() {
            self.qword(CX_IN + 8 * i).store(*v, Ordering::Relaxed);
        }
        self.qword(CX_FS_IN).store(fs, Ordering::Relaxed);
        self.qword(CX_GS_IN).store(gs, Ordering::Relaxed);
        self.word(CX_STATE).store(STATE_GO, Ordering::Release);
        self.go();
    }

    /// Wake the context to look at its state: answer the notification it
    /// sleeps in, or wake its futex.
    pub(super) fn go(&self) {
        let Some(l) = &self.listener else {
            let _ = futex::wake(self.word(CX_STATE));
            return;
        };
        for _ in 0..2 {
            let id = self.qword(CX_NOTIF_ID).load(Ordering::Acquire);
            match l.respond(id, Ok(0)) {
                Ok(()) => return,
                // The context's report that this answers is not received
                // yet (its waiter handled the report first): receive it.
                Err(_) => {
                    if !self.recv_locked(l, NOTIF_CATCH_UP, &|| true) {
                        return;
                    }
                }
            }
        }
    }

    /// Receive a pending notification under the block's receive lock (one
    /// receiver at a time, and only while one is pending: a receive with
    /// none pending blocks for good), if `mine()` still holds then (a
    /// waiter whose RUN was taken back receives nothing more). A holder that
    /// keeps the lock for long (the user code can write the block) loses it.
    fn recv_locked(
        &self,
        l: &NotifyFd,
        timeout: std::time::Duration,
        mine: &dyn Fn() -> bool,
    ) -> bool {
        if !matches!(l.pending_within(timeout), Ok(true)) {
            return false;
        }
        let lock = self.word(CX_RECV_LOCK);
        let mut tries = 0;
        while lock
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            tries += 1;
            if tries > 100 {
                lock.store(1, Ordering::Release);
                break;
            }
            let _ = futex::wait(lock, 1, std::time::Duration::from_millis(1));
        }
        let pending = matches!(l.pending_within(std::time::Duration::ZERO), Ok(true));
        let got = if mine() && pending {
            l.recv().ok()
        } else {
            None
        };
        if let Some(n) = &got {
            self.qword(CX_NOTIF_ID).store(n.id, Ordering::Release);
        }
        lock.store(0, Ordering::Release);
        got.is_some()
    }

    /// The notification just received came with no report: go again if
    /// the context was posted and not picked up, else it is the user code's
    /// own report call, which fails with `ENOSYS`.
    pub(super) fn answer_stray(&self) {
        if self.word(CX_STATE).load(Ordering::Acquire) == STATE_GO {
            self.go();
        } else if let Some(l) = &self.listener {
            let id = self.qword(CX_NOTIF_ID).load(Ordering::Acquire);
            let _ = l.respond(id, Err(Errno::ENOSYS));
        }
    }

    /// Wait up to `timeout` for the context's next report notification;
    /// its id is kept for the next "go". False if none came (or the
    /// listener has no task left).
    pub(super) fn recv_report(
        &self,
        timeout: std::time::Duration,
        mine: &dyn Fn() -> bool,
    ) -> bool {
        let Some(l) = &self.listener else {
            return false;
        };
        match l.pending_within(timeout) {
            Ok(true) => self.recv_locked(l, std::time::Duration::ZERO, mine),
            Ok(false) => false,
            Err(_) => {
                // No task left on the filter: its stub is dying. Do not
                // spin until the tracer has seen it.
                let seq = self.word(CX_SEQ).load(Ordering::Acquire);
                let _ = futex::wait(self.word(CX_SEQ), seq, std::time::Duration::from_millis(10));
                false
            }
        }
    }
}
