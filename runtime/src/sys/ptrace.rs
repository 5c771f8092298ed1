//! ptrace(2) requests that `nix` does not wrap.

use nix::errno::Errno;
use nix::unistd::Pid;

/// `PTRACE_LISTEN`: let a seized tracee in group-stop stay stopped while the
/// tracer goes on waiting; it reports again when it is continued or killed
/// (ptrace(2), "Group-stop").
pub fn listen(pid: Pid) -> Result<(), Errno> {
    // SAFETY: PTRACE_LISTEN takes no pointers (addr and data are 0).
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_LISTEN,
            pid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Errno::result(ret).map(drop)
}

/// The parts of a `SIGSEGV`'s siginfo vkrun reads and rewrites.
#[derive(Clone, Copy, Debug)]
pub struct FaultInfo {
    /// `si_addr`.
    pub addr: u64,
}

/// `PTRACE_GETSIGINFO` for a fault signal: its address.
pub fn fault_info(pid: Pid) -> Result<FaultInfo, Errno> {
    let info = nix::sys::ptrace::getsiginfo(pid)?;
    // SAFETY: for SIGSEGV/SIGBUS the kernel fills the si_addr union member.
    let addr = unsafe { info.si_addr() } as u64;
    Ok(FaultInfo { addr })
}

/// Rewrite the `si_code` of the signal `pid` is stopped for.
pub fn set_fault_code(pid: Pid, code: i32) -> Result<(), Errno> {
    let mut info = nix::sys::ptrace::getsiginfo(pid)?;
    info.si_code = code;
    nix::sys::ptrace::setsiginfo(pid, &info)
}
