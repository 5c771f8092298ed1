//! Running system calls inside a stopped guest thread (ptrace(2) syscall
//! injection), used to set up vkrun's agent in a guest process and to
//! execute hypercalls that must act on the caller's own address space.
//!
//! The injector starts at a `PTRACE_EVENT_SECCOMP` stop of a hypercall
//! (`SECCOMP_RET_TRACE`): the hypercall itself is skipped, the thread is
//! brought to its syscall-exit stop, and each injected call rewinds `rip` to
//! the hypercall's `syscall` instruction and runs it with other registers.
//! [`Injector::finish`] restores every register, with `rax` = the
//! hypercall's result (RAII: dropping an unfinished injector restores too).
//!
//! Only the tracer thread may use it. While it waits for the thread's stops
//! it may see other stops of that thread: signals are kept and delivered at
//! the end; an exit is handed back to the caller (`Gone`) so the event loop
//! can account for it.

use nix::errno::Errno;
use nix::libc::user_regs_struct;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Tracer;
use crate::error::{TraceeError as InjectError, TraceeGone};

/// Whether a stop for `sig` while injected code runs is that code faulting
/// (its gadget is not mapped in this address space, say) rather than a
/// signal that arrived meanwhile: continuing without the signal would run
/// the faulting instruction again, forever.
fn faulted(tid: Pid, sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
    ) && ptrace::getsiginfo(tid).is_ok_and(|info| info.si_code > 0)
}

/// Registers for a `clone` gadget (`clone(flags, stack, 0, 0, 0)`, with `r15`
/// the value the new thread starts with: vkrun's code finds its page there).
pub fn clone_args(flags: u64, stack: u64, r15: u64) -> impl FnOnce(&mut user_regs_struct) {
    move |r| {
        r.rdi = flags;
        r.rsi = stack;
        r.rdx = 0;
        r.r10 = 0;
        r.r8 = 0;
        r.r15 = r15;
    }
}

/// The x86-64 `syscall` instruction is two bytes long.
const SYSCALL_LEN: u64 = 2;

/// A guest thread held at a syscall stop for injection.
#[derive(Debug)]
pub struct Injector {
    tid: Pid,
    saved: user_regs_struct,
    /// A signal that arrived meanwhile, delivered at the end.
    pending: Option<Signal>,
    /// Child threads auto-attached during injection (to be tracked).
    pub new_threads: Vec<Pid>,
    finished: bool,
    /// A `syscall; int3` gadget to run calls through, for a thread stopped
    /// outside any system call (a vmspace stub's main thread); `None` at a
    /// seccomp stop (calls rerun the hypercall's own instruction).
    gadget: Option<u64>,
}

impl Injector {
    /// Take over `tid`, stopped at `PTRACE_EVENT_SECCOMP`: skip the
    /// hypercall and stop at its syscall exit.
    pub fn at_seccomp_stop(_: &Tracer, tid: Pid) -> Result<Self, InjectError> {
        let fail = |errno| InjectError::Ptrace { tid, errno };
        let saved = ptrace::getregs(tid).map_err(fail)?;
        let mut regs = saved;
        regs.orig_rax = u64::MAX; // skip the hypercall
        ptrace::setregs(tid, regs).map_err(fail)?;
        let mut inj = Self {
            tid,
            saved,
            pending: None,
            new_threads: Vec::new(),
            finished: false,
            gadget: None,
        };
        inj.resume_to_syscall_stop()?;
        Ok(inj)
    }

    /// Take over `tid`, stopped (not in a system call) with a `syscall;
    /// int3` gadget at `gadget` in its address space. The thread is left
    /// stopped, registers restored, when the injector finishes.
    pub fn at_trap_stop(_: &Tracer, tid: Pid, gadget: u64) -> Result<Self, InjectError> {
        let saved = ptrace::getregs(tid).map_err(|errno| InjectError::Ptrace { tid, errno })?;
        Ok(Self {
            tid,
            saved,
            pending: None,
            new_threads: Vec::new(),
            finished: false,
            gadget: Some(gadget),
        })
    }

    /// The registers of the hypercall (its arguments).
    pub fn regs(&self) -> &user_regs_struct {
        &self.saved
    }

    /// The thread.
    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Run system call `nr` with `args` in the thread; returns its raw result
    /// (`-errno` on failure).
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        if let Some(gadget) = self.gadget {
            let mut regs = self.saved;
            regs.rip = gadget;
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX; // not inside a system call: no restart
            [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = args;
            self.setregs(regs)?;
            self.cont_to_trap()?;
            let out = ptrace::getregs(self.tid).map_err(|errno| self.err(errno))?;
            return Ok(out.rax as i64);
        }
        let mut regs = self.saved;
        regs.rip = self.saved.rip - SYSCALL_LEN;
        regs.rax = nr as u64;
        regs.orig_rax = nr as u64;
        [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = args;
        self.setregs(regs)?;
        self.resume_to_syscall_stop()?; // entry
        self.resume_to_syscall_stop()?; // exit
        let out = ptrace::getregs(self.tid).map_err(|errno| self.err(errno))?;
        Ok(out.rax as i64)
    }

    /// Run `clone` through the gadget at `gadget` (`syscall; test; jz child;
    /// int3`) with `regs_fn` setting up the registers; returns the new
    /// thread's id. The child is auto-attached (`PTRACE_O_TRACECLONE`); it is
    /// released from its initial stop here.
    pub fn clone_at(
        &mut self,
        gadget: u64,
        setup: impl FnOnce(&mut user_regs_struct),
    ) -> Result<Pid, InjectError> {
        let mut regs = self.saved;
        regs.rip = gadget;
        regs.rax = libc::SYS_clone as u64;
        setup(&mut regs);
        self.setregs(regs)?;
        let child = self.cont_to_trap()?;
        let out = ptrace::getregs(self.tid).map_err(|errno| self.err(errno))?;
        let child = match child {
            Some(c) => c,
            None if (out.rax as i64) > 0 => Pid::from_raw(out.rax as i32),
            None => {
                return Err(self.err(Errno::from_raw(-(out.rax as i64) as i32)));
            }
        };
        // The child's first stop (PTRACE_EVENT_STOP for an auto-attached task).
        loop {
            match waitpid(child, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::Stopped(..)) => {
                    let _ = ptrace::cont(child, None);
                    break;
                }
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(InjectError::Ptrace { tid: child, errno }),
            }
        }
        self.new_threads.push(child);
        Ok(child)
    }

    /// Run `clone` through the gadget at `gadget` (as [`Injector::clone_at`])
    /// for a child that is not traced (`CLONE_UNTRACED` in the flags):
    /// returns its thread id, or the error of `clone`.
    pub fn clone_untraced_at(
        &mut self,
        gadget: u64,
        setup: impl FnOnce(&mut user_regs_struct),
    ) -> Result<Result<Pid, Errno>, InjectError> {
        let mut regs = self.saved;
        regs.rip = gadget;
        regs.rax = libc::SYS_clone as u64;
        regs.orig_rax = u64::MAX;
        setup(&mut regs);
        self.setregs(regs)?;
        self.cont_to_trap()?;
        let out = ptrace::getregs(self.tid).map_err(|errno| self.err(errno))?;
        let ret = out.rax as i64;
        Ok(if ret > 0 {
            Ok(Pid::from_raw(ret as i32))
        } else {
            Err(Errno::from_raw(-ret as i32))
        })
    }

    /// Continue until the gadget's `int3`, keeping other signals; returns
    /// the thread a `clone` on the way created (auto-attached), if any.
    fn cont_to_trap(&mut self) -> Result<Option<Pid>, InjectError> {
        ptrace::cont(self.tid, None).map_err(|errno| self.err(errno))?;
        let mut child = None;
        loop {
            match self.wait()? {
                WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_CLONE => {
                    let new = ptrace::getevent(self.tid).map_err(|errno| self.err(errno))?;
                    child = Some(Pid::from_raw(new as i32));
                }
                WaitStatus::Stopped(_, Signal::SIGTRAP) => return Ok(child),
                WaitStatus::Stopped(_, sig) if faulted(self.tid, sig) => {
                    return Err(self.err(Errno::EFAULT));
                }
                WaitStatus::Stopped(_, sig) => self.pending = Some(sig),
                _ => {}
            }
            ptrace::cont(self.tid, None).map_err(|errno| self.err(errno))?;
        }
    }

    /// Restore the thread's registers with `result` as the hypercall's return
    /// value and let it run (at a trap stop: leave it stopped).
    pub fn finish(mut self, result: i64) -> Result<(), InjectError> {
        self.finished = true;
        self.restore(result)
    }

    fn restore(&mut self, result: i64) -> Result<(), InjectError> {
        let mut regs = self.saved;
        if self.gadget.is_some() {
            return self.setregs(regs);
        }
        regs.rax = result as u64;
        self.setregs(regs)?;
        ptrace::cont(self.tid, self.pending.take()).map_err(|errno| self.err(errno))
    }

    fn setregs(&self, regs: user_regs_struct) -> Result<(), InjectError> {
        ptrace::setregs(self.tid, regs).map_err(|errno| self.err(errno))
    }

    fn err(&self, errno: Errno) -> InjectError {
        InjectError::Ptrace {
            tid: self.tid,
            errno,
        }
    }

    fn wait(&self) -> Result<WaitStatus, InjectError> {
        loop {
            match waitpid(self.tid, Some(WaitPidFlag::__WALL)) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    return Err(TraceeGone {
                        pid: self.tid,
                        status,
                    }
                    .into());
                }
                Ok(status) => return Ok(status),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(self.err(errno)),
            }
        }
    }

    /// `PTRACE_SYSCALL` until the next syscall stop, keeping signals.
    fn resume_to_syscall_stop(&mut self) -> Result<(), InjectError> {
        ptrace::syscall(self.tid, None).map_err(|errno| self.err(errno))?;
        loop {
            match self.wait()? {
                WaitStatus::PtraceSyscall(_) => return Ok(()),
                WaitStatus::Stopped(_, sig) => {
                    self.pending = Some(sig);
                    ptrace::syscall(self.tid, None).map_err(|errno| self.err(errno))?;
                }
                _ => ptrace::syscall(self.tid, None).map_err(|errno| self.err(errno))?,
            }
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if !self.finished {
            // An error path: give the thread back as it was, failing the
            // hypercall with EFAULT-free ENOMEM so the guest sees an error.
            let _ = self.restore(-(libc::ENOMEM as i64));
        }
    }
}

/// Run `calls` in `tid`, stopped at any ptrace stop (not a syscall stop),
/// through a `syscall; int3` gadget at `gadget` in its address space; then
/// restore its registers and let it run. Results are not returned: callers
/// use it for clean-up that may fail harmlessly.
pub fn run_at_stop(
    _: &Tracer,
    tid: Pid,
    gadget: u64,
    calls: &[(i64, [u64; 6])],
) -> Result<(), InjectError> {
    let fail = |errno| InjectError::Ptrace { tid, errno };
    let saved = ptrace::getregs(tid).map_err(fail)?;
    let mut pending = None;
    for &(nr, args) in calls {
        let mut regs = saved;
        regs.rip = gadget;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // not inside a system call: no restart
        [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = args;
        ptrace::setregs(tid, regs).map_err(fail)?;
        ptrace::cont(tid, None).map_err(fail)?;
        loop {
            match waitpid(tid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
                Ok(WaitStatus::Stopped(_, sig)) if faulted(tid, sig) => {
                    // Give the thread back as it was.
                    ptrace::setregs(tid, saved).map_err(fail)?;
                    ptrace::cont(tid, pending).map_err(fail)?;
                    return Err(fail(Errno::EFAULT));
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    pending = Some(sig);
                    ptrace::cont(tid, None).map_err(fail)?;
                }
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    return Err(TraceeGone { pid: tid, status }.into());
                }
                Ok(_) => ptrace::cont(tid, None).map_err(fail)?,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(fail(errno)),
            }
        }
    }
    ptrace::setregs(tid, saved).map_err(fail)?;
    ptrace::cont(tid, pending).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::kill;

    /// A gadget that is not mapped in the tracee makes the injection fail
    /// (before: it faulted, the fault was suppressed and the instruction
    /// ran again, forever), and the tracee carries on as it was.
    #[test]
    fn a_missing_gadget_is_an_error_not_a_loop() {
        let child = crate::sys::ptrace::fork_traced_pausing_child().expect("fork");
        let stopped = waitpid(child, Some(WaitPidFlag::__WALL)).expect("waitpid");
        // It dies with this test process, whatever happens.
        ptrace::setoptions(child, ptrace::Options::PTRACE_O_EXITKILL).expect("setoptions");
        assert!(matches!(stopped, WaitStatus::Stopped(_, Signal::SIGSTOP)));
        let nothing_there = 0x1000;
        let tracer = Tracer::this_thread();
        let result = run_at_stop(&tracer, child, nothing_there, &[(libc::SYS_getpid, [0; 6])]);
        assert!(
            matches!(
                result,
                Err(InjectError::Ptrace {
                    errno: Errno::EFAULT,
                    ..
                })
            ),
            "{result:?}"
        );
        // It runs on (in pause), not stopped in a fault.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, Some(WaitPidFlag::__WALL));
        assert!(
            state.split(") ").nth(1).is_some_and(|s| s.starts_with('S')),
            "{state}"
        );
    }
}
