//! Hypercalls: the ONE table of every hypercall, saying how it arrives and
//! who serves it, and the two ways in: the notification server ([`server`],
//! its threads and their pool) and the calls served at the caller's
//! seccomp stop on the tracer thread ([`StopCalls`]).
//!
//! The guest's seccomp filter is built from [`TABLE`] ([`filter`]), so the
//! table is what the kernel does: a `Notification` hypercall wakes a
//! hypercall thread, a `TracerStop` one stops the caller for the tracer.
//! A hypercall is served at a stop when it must ptrace: `vk_mmap` runs
//! system calls in the caller's own process (and may set vkrun's agent up
//! there); `vmspace_create`, `destroy`, `mmap` and `munmap` fork, reap or
//! drive traced stubs. Every other hypercall is a notification. Numbers
//! in the hypercall range that name none arrive as notifications and
//! answer `ENOSYS`.

mod server;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use vkabi::Hypercall;

use crate::error::{CallError, TraceeError, raw_result};
use crate::stats::Stats;
use crate::sys::{kcmp, lock, proc};
use crate::trace::TraceWriter;
use crate::trace::format::{format_call_result, format_result, returns_address};
use crate::tracee::Tracer;
use crate::tracee::inject::Injector;
use crate::vmspace::Vmspaces;
use crate::vpt::{StopDone, Vpt};

pub use server::{Pool, Server};

/// How a hypercall reaches vkrun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// `SECCOMP_RET_USER_NOTIF`: a hypercall thread receives it; the caller
    /// does not stop.
    Notification,
    /// `SECCOMP_RET_TRACE`: the caller stops at `PTRACE_EVENT_SECCOMP` and
    /// the tracer thread serves it there.
    TracerStop,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub call: Hypercall,
    pub arrives: Arrival,
    /// Who serves it (the function [`Server::call`] or [`StopCalls::serve`]
    /// dispatches it to).
    pub served_by: &'static str,
}

/// Every hypercall, how it arrives, who serves it.
pub const TABLE: [Entry; Hypercall::ALL.len()] = {
    use Arrival::{Notification, TracerStop};
    const fn e(call: Hypercall, arrives: Arrival, served_by: &'static str) -> Entry {
        Entry {
            call,
            arrives,
            served_by,
        }
    }
    [
        e(
            Hypercall::VkInfo,
            Notification,
            "hypercall::Server::vk_info",
        ),
        e(Hypercall::VkMmap, TracerStop, "vpt::Vpt::vk_mmap"),
        e(Hypercall::Mcontrol, Notification, "vpt::Vpt::mcontrol"),
        e(
            Hypercall::VmspaceCreate,
            TracerStop,
            "vmspace::Vmspaces::create",
        ),
        e(
            Hypercall::VmspaceDestroy,
            TracerStop,
            "vmspace::Vmspaces::destroy",
        ),
        e(
            Hypercall::VmspaceCtl,
            Notification,
            "vmspace::Vmspaces::ctl",
        ),
        e(
            Hypercall::VmspaceMmap,
            TracerStop,
            "vmspace::Vmspaces::mmap",
        ),
        e(
            Hypercall::VmspaceMunmap,
            TracerStop,
            "vmspace::Vmspaces::munmap",
        ),
        e(
            Hypercall::VmspaceMcontrol,
            Notification,
            "vmspace::Vmspaces::mcontrol",
        ),
        e(
            Hypercall::VmspacePread,
            Notification,
            "vmspace::Vmspaces::prw",
        ),
        e(
            Hypercall::VmspacePwrite,
            Notification,
            "vmspace::Vmspaces::prw",
        ),
    ]
};

/// How `h` arrives (an unknown number: as a notification).
pub fn arrival(h: Option<Hypercall>) -> Arrival {
    h.and_then(|h| TABLE.iter().find(|e| e.call == h))
        .map_or(Arrival::Notification, |e| e.arrives)
}

/// The guest's seccomp program, built from [`TABLE`].
pub fn filter() -> Vec<libc::sock_filter> {
    for e in &TABLE {
        tracing::debug!(call = e.call.name(), arrives = ?e.arrives, served_by = e.served_by, "hypercall");
    }
    let stops: Vec<u32> = TABLE
        .iter()
        .filter(|e| e.arrives == Arrival::TracerStop)
        .map(|e| e.call.nr() as u32)
        .collect();
    crate::sys::seccomp::hypercall_filter(&stops)
}

/// Count a hypercall and trace it if it is traced and `when` (when it was
/// received) is known: every call, whichever way it arrived, is accounted
/// here. A caller that knows the call is not traced passes no time, and the
/// trace's lock is not taken.
#[allow(clippy::too_many_arguments)]
fn account(
    trace: &Mutex<TraceWriter>,
    stats: &Stats,
    tid: i32,
    h: Option<Hypercall>,
    nr: u64,
    args: [u64; 6],
    result: Result<i64, Errno>,
    when: Option<SystemTime>,
    took: Option<std::time::Duration>,
    shown: Option<&str>,
) {
    stats.count_hypercall(h, result.is_err());
    let Some(when) = when else {
        return;
    };
    let mut trace = lock(trace);
    if trace.set().hypercall(h) {
        let text = match shown {
            Some(call) => format!("{call} {}", format_result(result, returns_address(h))),
            None => format_call_result(h, nr, args, result),
        };
        trace.line(tid, when, &text, took);
    }
}

/// A hypercall a thread is stopped at, as the trace and the answer need it.
#[derive(Clone, Copy, Debug)]
struct AtStop {
    pid: Pid,
    h: Option<Hypercall>,
    nr: u64,
    args: [u64; 6],
    when: SystemTime,
    /// gdb single-steps over the call: it must stop again as it returns.
    then_stop: bool,
}

/// Account the call `at` (counters, trace line) and answer it with
/// `result`, resuming the thread through `inj`.
fn answer(
    trace: &Mutex<TraceWriter>,
    stats: &Stats,
    inj: Injector,
    at: AtStop,
    result: Result<i64, Errno>,
) -> Result<(), TraceeError> {
    let AtStop {
        pid,
        h,
        nr,
        args,
        when,
        then_stop,
    } = at;
    account(
        trace,
        stats,
        pid.as_raw(),
        h,
        nr,
        args,
        result,
        Some(when),
        None,
        None,
    );
    if then_stop && let Err(errno) = nix::sys::ptrace::interrupt(pid) {
        tracing::debug!(%pid, %errno, "PTRACE_INTERRUPT after a stepped hypercall failed");
    }
    inj.finish(raw_result(result))
}

/// Outcome of a hypercall served at a seccomp stop.
#[derive(Debug)]
pub struct StopOutcome {
    /// Threads created meanwhile (the agent), to be tracked.
    pub new_threads: Vec<Pid>,
    /// The thread's exit, if it died during the call.
    pub gone: Option<WaitStatus>,
}

/// The hypercalls served at the caller's seccomp stop (tracer thread).
#[derive(Debug)]
pub struct StopCalls {
    pub vpt: Arc<Vpt>,
    pub vmspaces: Arc<Vmspaces>,
    pub stats: Arc<Stats>,
    pub trace: Arc<Mutex<TraceWriter>>,
}

impl StopCalls {
    /// Serve the hypercall `pid` is stopped at (`PTRACE_EVENT_SECCOMP`) and
    /// resume it with the result.
    ///
    /// With `then_stop` (gdb single-steps the thread over the call) the
    /// thread is interrupted before it is resumed: it stops
    /// (`PTRACE_EVENT_STOP`) right after the `syscall`, as the step would.
    pub fn at_stop(&self, tracer: &Tracer, pid: Pid, then_stop: bool) -> StopOutcome {
        let outcome = |e: TraceeError, new_threads| match e {
            TraceeError::Gone(gone) => StopOutcome {
                new_threads,
                gone: Some(gone.status),
            },
            TraceeError::Ptrace { tid, errno } => {
                tracing::warn!(%tid, %errno, "serving a hypercall at its stop failed");
                StopOutcome {
                    new_threads,
                    gone: None,
                }
            }
        };
        let inj = match Injector::at_seccomp_stop(tracer, pid) {
            Ok(inj) => inj,
            Err(e) => return outcome(e, Vec::new()),
        };
        let r = *inj.regs();
        let args = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        let h = Hypercall::from_nr(r.orig_rax);
        let when = SystemTime::now();
        let Some(mut inj) = self.defer_window(pid, inj, h, args, when, then_stop) else {
            return StopOutcome {
                new_threads: Vec::new(),
                gone: None,
            };
        };
        let served = self.serve(tracer, &mut inj, h, args);
        let new_threads = std::mem::take(&mut inj.new_threads);
        let result = match served {
            Ok(v) => Ok(v),
            Err(CallError::Guest(e)) => Err(e),
            Err(CallError::Tracee(e)) => return outcome(e, new_threads),
        };
        let at = AtStop {
            pid,
            h,
            nr: r.orig_rax,
            args,
            when,
            then_stop,
        };
        match answer(&self.trace, &self.stats, inj, at, result) {
            Ok(()) => StopOutcome {
                new_threads,
                gone: None,
            },
            Err(e) => outcome(e, new_threads),
        }
    }

    /// A `vk_mmap` of a window in a process whose agent is set up: the
    /// agent makes it, on the process's stop worker, and the tracer only
    /// answers the stopped caller once it is done (the wait on the agent
    /// and on the lock shared with the resolver is not the tracer's).
    /// Gives `inj` back if the call is not such a one (`None`: deferred).
    fn defer_window(
        &self,
        pid: Pid,
        inj: Injector,
        h: Option<Hypercall>,
        args: [u64; 6],
        when: SystemTime,
        then_stop: bool,
    ) -> Option<Injector> {
        let tgid = proc::tgid_of(pid).unwrap_or(pid);
        let window = args[3] as i32 & vkabi::MAP_VPAGETABLE != 0;
        if h != Some(Hypercall::VkMmap) || !window || !self.vpt.has_agent(tgid) {
            return Some(inj);
        }
        // The descriptor check is the kernel's (kcmp), so it stays here.
        let fd = args[4] as i32;
        if fd < 0 || kcmp::same_file(self.vpt.ram_descriptor(), pid, fd) != Ok(true) {
            return Some(inj);
        }
        let (vpt, trace, stats) = (
            Arc::clone(&self.vpt),
            Arc::clone(&self.trace),
            Arc::clone(&self.stats),
        );
        let at = AtStop {
            pid,
            h,
            nr: inj.regs().orig_rax,
            args,
            when,
            then_stop,
        };
        self.vpt.defer(
            tgid,
            pid,
            Box::new(move || {
                let result = vpt
                    .vk_mmap_by_agent(tgid, args)
                    .unwrap_or(Err(Errno::EINVAL));
                Box::new(move |_: &Tracer| {
                    match answer(&trace, &stats, inj, at, result) {
                        Ok(()) => StopDone::Resumed,
                        Err(TraceeError::Gone(gone)) => StopDone::Gone(gone.status),
                        Err(TraceeError::Ptrace { tid, errno }) => {
                            tracing::warn!(%tid, %errno, "answering a hypercall at its stop failed");
                            StopDone::Resumed
                        }
                    }
                })
            }),
        );
        None
    }

    /// The dispatch of the `TracerStop` rows of [`TABLE`].
    fn serve(
        &self,
        tracer: &Tracer,
        inj: &mut Injector,
        h: Option<Hypercall>,
        args: [u64; 6],
    ) -> Result<i64, CallError> {
        let pid = inj.tid();
        let vms = &self.vmspaces;
        match h {
            Some(Hypercall::VkMmap) => {
                let tgid = proc::tgid_of(pid).unwrap_or(pid);
                self.vpt.vk_mmap(inj, tgid, args)
            }
            Some(Hypercall::VmspaceCreate) => Ok(vms.create(tracer, args[0])?),
            Some(Hypercall::VmspaceDestroy) => Ok(vms.destroy(tracer, args[0])?),
            Some(Hypercall::VmspaceMmap) => Ok(vms.mmap(tracer, pid, args)?),
            Some(Hypercall::VmspaceMunmap) => Ok(vms.munmap(tracer, args)?),
            _ => Err(Errno::ENOSYS.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::abi::AUDIT_ARCH_X86_64;
    use crate::sys::seccomp::evaluate;

    #[test]
    fn the_table_names_every_hypercall_once() {
        for h in Hypercall::ALL {
            assert_eq!(TABLE.iter().filter(|e| e.call == h).count(), 1, "{h:?}");
        }
    }

    #[test]
    fn the_filter_does_what_the_table_says() {
        let f = filter();
        for e in TABLE {
            let want = match e.arrives {
                Arrival::Notification => libc::SECCOMP_RET_USER_NOTIF,
                Arrival::TracerStop => libc::SECCOMP_RET_TRACE,
            };
            let nr = e.call.nr() as u32;
            assert_eq!(evaluate(&f, AUDIT_ARCH_X86_64, nr), want, "{:?}", e.call);
            // Not an x86-64 call: never the supervisor's.
            assert_eq!(evaluate(&f, 0x4000_0003, nr), libc::SECCOMP_RET_ALLOW);
        }
        let base = vkabi::VK_SYS_BASE as u32;
        let end = base + vkabi::VK_SYS_COUNT as u32;
        // Unknown numbers in the range notify (and answer ENOSYS).
        assert_eq!(arrival(None), Arrival::Notification);
        assert_eq!(
            evaluate(&f, AUDIT_ARCH_X86_64, end - 1),
            libc::SECCOMP_RET_USER_NOTIF
        );
        for nr in [0, 1, 59, base - 1, end] {
            assert_eq!(evaluate(&f, AUDIT_ARCH_X86_64, nr), libc::SECCOMP_RET_ALLOW);
        }
    }
}
