//! Signals: those sent to vkrun (forwarded to the guest), and the delivery
//! of a guest thread's own, through RUN's semantics when the thread is
//! inside RUN; the trace line of each.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use vkabi::Hypercall;

use super::Supervisor;
use crate::error::Error;
use crate::gdb::Gdb;
use crate::sys::abi::SI_KERNEL;
use crate::sys::{lock, proc};
use crate::trace::TraceWriter;
use crate::trace::format::format_signal;
use crate::tracee::Tracer;
use crate::vmspace::Interrupted;

impl Supervisor {
    /// Drain the signalfd. Returns true when no tracee is left.
    pub(super) fn on_signals(&mut self) -> Result<bool, Error> {
        let mut reap = false;
        loop {
            match self.sigfd.read_signal() {
                Ok(Some(info)) => {
                    let sig = Signal::try_from(info.ssi_signo as i32).ok();
                    if sig.is_some_and(|s| s != Signal::SIGCHLD) {
                        // ^C or kill of vkrun while the guest waits for gdb.
                        self.with_gdb(Gdb::on_signal_to_vkrun);
                    }
                    match sig {
                        Some(Signal::SIGCHLD) => reap = true,
                        Some(sig) if info.ssi_code != SI_KERNEL => self.forward(sig),
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(self.abort(Error::sys("reading signalfd")(errno))),
            }
        }
        if reap { self.reap() } else { Ok(false) }
    }

    /// Pass a signal sent to vkrun on to the guest's main process, or, once
    /// that has exited, to every remaining guest process.
    fn forward(&mut self, sig: Signal) {
        tracing::debug!(?sig, "forwarding signal to the guest");
        if self.outcome.is_none() {
            let _ = signal::kill(self.main, sig);
            return;
        }
        let groups: HashSet<Pid> = self
            .tracees
            .iter()
            .filter_map(|t| proc::tgid_of(*t))
            .collect();
        for pid in groups {
            let _ = signal::kill(pid, sig);
        }
    }

    /// A signal-delivery-stop of guest thread `pid` for `sig`: deliver it,
    /// after making an interrupted RUN return what RUN says (0 with
    /// `tf_trapno = 0`, or `EINTR`) so that the handler runs. A signal
    /// without a handler (ignored, stopping, fatal) leaves the call to
    /// restart, as it would natively: the restarted RUN takes over the run
    /// in flight. When the RUN's user code must first be kicked out, the
    /// thread stays stopped and is resumed by a job once the context has
    /// reported: the tracer does not wait for it.
    pub(super) fn deliver_signal(&self, pid: Pid, sig: Signal) {
        let trace = Arc::clone(&self.out);
        let deliver = move |value: Option<i64>| {
            if let Some(value) = value
                && let Ok(mut regs) = ptrace::getregs(pid)
            {
                regs.rax = value as u64;
                if let Err(errno) = ptrace::setregs(pid, regs) {
                    tracing::debug!(%pid, %errno, "setting RUN's result failed");
                }
            }
            trace_signal(&trace, pid);
            resume(pid, Some(sig));
        };
        if !self.vmspaces().is_empty()
            && proc::catches(pid, sig as i32)
            && self.vmspaces().hold_for_fast_run(&self.tracer, pid)
        {
            // Inside a fast RUN: the signal waits (blocked) until RUN has
            // returned; the kernel queues it again now. It is traced when
            // it stops the thread again, at its delivery.
            resume(pid, Some(sig));
            return;
        }
        let rax = match ptrace::getregs(pid) {
            Ok(regs)
                if !self.vmspaces().is_empty()
                    && regs.orig_rax == Hypercall::VmspaceCtl.nr()
                    && proc::catches(pid, sig as i32) =>
            {
                regs.rax as i64
            }
            _ => return deliver(None),
        };
        let later = deliver.clone();
        match self
            .vmspaces()
            .on_guest_signal(pid, rax, move |_: &Tracer, v| later(Some(v)))
        {
            Interrupted::NotConcerned => deliver(None),
            Interrupted::Now(v) => deliver(Some(v)),
            Interrupted::Later => {}
        }
    }
}

/// Continue a stopped tracee, delivering `sig`. A tracee can die at any
/// moment (ESRCH), which the next wait reports.
pub(super) fn resume(pid: Pid, sig: Option<Signal>) {
    if let Err(errno) = ptrace::cont(pid, sig)
        && errno != Errno::ESRCH
    {
        tracing::warn!(%pid, %errno, "PTRACE_CONT failed");
    }
}

pub(super) fn is_stop_signal(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

/// Trace the signal `pid` is about to receive, when tracing.
pub(super) fn trace_signal(trace: &Mutex<TraceWriter>, pid: Pid) {
    let mut out = lock(trace);
    if out.set().is_empty() {
        return;
    }
    if let Ok(info) = crate::sys::ptrace::signal_info(pid) {
        out.line(pid.as_raw(), SystemTime::now(), &format_signal(&info), None);
    }
}
