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

/// What strace prints of a signal's siginfo.
#[derive(Clone, Copy, Debug)]
pub struct SignalInfo {
    pub signo: i32,
    pub code: i32,
    /// `si_addr`, for faults (`SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`,
    /// `SIGTRAP` raised by the kernel).
    pub addr: Option<u64>,
    /// `si_pid` and `si_uid`, for signals sent by a process or `SIGCHLD`.
    pub sender: Option<(i32, u32)>,
    /// `si_status` of `SIGCHLD`: the exit code or the signal.
    pub status: Option<i32>,
}

/// `PTRACE_GETSIGINFO`, with the union member that applies decoded.
pub fn signal_info(pid: Pid) -> Result<SignalInfo, Errno> {
    let info = nix::sys::ptrace::getsiginfo(pid)?;
    let fault = matches!(
        info.si_signo,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
    ) && info.si_code > 0
        && info.si_code != 0x80;
    let from_process = info.si_code <= 0 || info.si_signo == libc::SIGCHLD;
    // SAFETY: each union member is read only for the signals and codes for
    // which the kernel fills it (siginfo.h: fault signals with a kernel
    // code carry si_addr; user-sent signals and SIGCHLD carry si_pid/si_uid).
    let (addr, sender, status) = unsafe {
        (
            fault.then(|| info.si_addr() as u64),
            from_process.then(|| (info.si_pid(), info.si_uid())),
            (info.si_signo == libc::SIGCHLD).then(|| info.si_status()),
        )
    };
    Ok(SignalInfo {
        signo: info.si_signo,
        code: info.si_code,
        addr,
        sender,
        status,
    })
}

/// An all-zero `user_fpregs_struct` (libc gives it a private padding
/// field, so it cannot be written as a literal).
pub fn zeroed_fpregs() -> libc::user_fpregs_struct {
    // SAFETY: the struct holds only integers and integer arrays, for
    // which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// For tests: fork a child that asks to be traced by this process, stops
/// itself with `SIGSTOP` and then pauses for ever.
#[cfg(test)]
pub fn fork_traced_pausing_child() -> Result<Pid, Errno> {
    // SAFETY: the child makes only async-signal-safe calls, then waits.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: raw calls on integers; the child never returns.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                loop {
                    libc::pause();
                }
            }
        }
        -1 => Err(Errno::last()),
        pid => Ok(Pid::from_raw(pid)),
    }
}

/// `PTRACE_GETSIGMASK`: the signal mask of stopped tracee `pid`.
pub fn get_sigmask(pid: Pid) -> Result<u64, Errno> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes (the size passed in addr) to `mask`.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            pid.as_raw(),
            size_of::<u64>(),
            &mut mask as *mut u64,
        )
    };
    Errno::result(ret).map(|_| mask)
}

/// `PTRACE_SETSIGMASK`: set the signal mask of stopped tracee `pid`
/// (`SIGKILL` and `SIGSTOP` stay unblockable).
pub fn set_sigmask(pid: Pid, mask: u64) -> Result<(), Errno> {
    // SAFETY: the kernel reads 8 bytes (the size passed in addr) from `mask`.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            pid.as_raw(),
            size_of::<u64>(),
            &mask as *const u64,
        )
    };
    Errno::result(ret).map(drop)
}
