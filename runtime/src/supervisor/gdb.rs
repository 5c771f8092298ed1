//! The supervisor's side of the GDB stub (`--gdb`): it listens before the
//! guest runs, is offered the guest's stops, and what gdb asks for is
//! carried out here, through the supervisor's own paths.

use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::waitpid;

use super::{Supervisor, trace_signal};
use crate::error::Error;
use crate::gdb::{Gdb, GdbOptions, Order, Resumption, Verdict};
use crate::sys::spawn::Child;
use crate::tracee::Tracer;

/// Listen for gdb before the guest runs its first instruction; on failure
/// the guest (still held by vkrun) is killed.
pub(super) fn listen_for_gdb(
    opts: &GdbOptions,
    tracer: &Tracer,
    child: &Child,
    exe: PathBuf,
) -> Result<Gdb, Error> {
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    Gdb::listen(opts, tracer, child.pid, exe).map_err(|e| {
        let _ = signal::kill(child.pid, Signal::SIGKILL);
        let _ = waitpid(child.pid, None);
        Error::Sys {
            what: "listening for gdb",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
        }
    })
}

impl Supervisor {
    /// Run `f` on the GDB stub, if there is one, with its view of the guest
    /// threads brought up to date, then carry out what gdb asked for.
    pub(super) fn with_gdb<R: Default>(&mut self, f: impl FnOnce(&mut Gdb) -> R) -> R {
        let Some(gdb) = self.gdb.as_mut() else {
            return R::default();
        };
        let vpt = self.vpt.as_ref().expect("created before the event loop");
        gdb.set_threads(self.tracees.iter().copied().filter(|t| !vpt.is_agent(*t)));
        let r = f(gdb);
        let orders = gdb.take_orders();
        for order in orders {
            match order {
                Order::Resume(r) => self.gdb_resume(r),
                Order::KillAll => {
                    for tid in &self.tracees {
                        let _ = signal::kill(*tid, Signal::SIGKILL);
                    }
                }
            }
        }
        r
    }

    /// Whether the stub takes this stop (it keeps the thread stopped).
    pub(super) fn gdb_holds(&mut self, f: impl FnOnce(&mut Gdb) -> Verdict) -> bool {
        self.gdb.is_some() && self.with_gdb(|g| f(g) == Verdict::Held)
    }

    /// Resume a thread gdb held: a signal goes through the one delivery
    /// path (RUN's semantics, the trace).
    fn gdb_resume(&mut self, r: Resumption) {
        match r {
            Resumption {
                pid, listen: true, ..
            } => {
                // Back to its group-stop, as job control left it.
                if let Err(errno) = crate::sys::ptrace::listen(pid) {
                    tracing::debug!(%pid, %errno, "PTRACE_LISTEN failed");
                }
            }
            Resumption {
                pid,
                step: false,
                signal: Some(sig),
                at_signal: true,
                ..
            } => self.deliver_signal(pid, sig),
            Resumption {
                pid,
                step,
                signal,
                at_signal,
                ..
            } => {
                if signal.is_some() && at_signal {
                    trace_signal(&self.out, pid);
                }
                let result = if step {
                    ptrace::step(pid, signal)
                } else {
                    ptrace::cont(pid, signal)
                };
                if let Err(errno) = result
                    && errno != Errno::ESRCH
                {
                    tracing::warn!(%pid, %errno, "resuming for gdb failed");
                }
            }
        }
    }
}
