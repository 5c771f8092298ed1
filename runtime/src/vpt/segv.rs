//! The ABI's `SIGSEGV` for a failed walk (ABI section 6): its `si_code`
//! and error bits, and its delivery with the ucontext a handler expects
//! (`REG_TRAPNO`, `REG_ERR`, `REG_CR2`). Tracer thread only.

use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use vkabi::PGEX_U;
use vpte::{Access, WalkError};

use super::Vpt;
use super::windows::Poison;
use crate::sys::abi::{
    REG_CR2, REG_ERR, REG_TRAPNO, SEGV_ACCERR, SEGV_MAPERR, UC_GREGS, X86_TRAP_PF,
};
use crate::sys::{lock, proc};
use crate::trace::format::format_signal;
use crate::tracee::Tracer;
use crate::tracee::remote::{self, RemoteAddr};

/// `si_code` and page-fault error bits for a failed walk (ABI section 6).
pub(super) fn poison_of(e: Option<&WalkError>, access: Access) -> (i32, u64) {
    match e {
        Some(e) => {
            let code = if e.is_protection() {
                SEGV_ACCERR
            } else {
                SEGV_MAPERR
            };
            (code, e.pgex(access) | PGEX_U)
        }
        None => (SEGV_MAPERR, access.pgex() | PGEX_U),
    }
}

/// Deliver the ABI's `SIGSEGV` for a failed walk to `tid` (stopped with that
/// signal): the right `si_code`, and, if the guest handles `SIGSEGV`, the
/// `REG_TRAPNO`/`REG_ERR`/`REG_CR2` of its ucontext. Returns the thread's
/// wait status if it died instead.
pub(super) fn deliver_page_fault(
    _: &Tracer,
    tid: Pid,
    addr: u64,
    poison: Poison,
) -> Option<WaitStatus> {
    let _ = crate::sys::ptrace::set_fault_code(tid, poison.si_code);
    if !proc::catches(tid, libc::SIGSEGV) {
        let _ = ptrace::cont(tid, Signal::SIGSEGV);
        return None;
    }
    // Deliver by single-stepping: the thread stops at the handler's first
    // instruction with the frame built; rdx is the ucontext.
    if ptrace::step(tid, Signal::SIGSEGV).is_err() {
        return None;
    }
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Some(s),
            Ok(_) => {
                let _ = ptrace::cont(tid, None);
                return None;
            }
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
    if let Ok(regs) = ptrace::getregs(tid) {
        let gregs = regs.rdx + UC_GREGS;
        let put = |reg: usize, v: u64| {
            let at = RemoteAddr(gregs + 8 * reg as u64);
            let _ = remote::write_bytes(tid, at, &v.to_ne_bytes());
        };
        put(REG_ERR, poison.pgex);
        put(REG_TRAPNO, X86_TRAP_PF);
        put(REG_CR2, addr);
    }
    let _ = ptrace::cont(tid, None);
    None
}

impl Vpt {
    /// Trace the `SIGSEGV` a failed walk delivers (when tracing).
    pub(super) fn trace_segv(&self, tid: Pid, addr: u64, si_code: i32) {
        let mut trace = lock(&self.trace);
        if trace.set().is_empty() {
            return;
        }
        let info = crate::sys::ptrace::SignalInfo {
            signo: libc::SIGSEGV,
            code: si_code,
            addr: Some(addr),
            sender: None,
            status: None,
        };
        trace.line(tid.as_raw(), SystemTime::now(), &format_signal(&info), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_walk_without_an_error_is_a_user_mapping_fault() {
        let (code, pgex) = poison_of(None, Access::Write);
        assert_eq!(code, SEGV_MAPERR);
        assert_eq!(pgex, Access::Write.pgex() | PGEX_U);
    }
}
