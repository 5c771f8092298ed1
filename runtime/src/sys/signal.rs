//! The signal that interrupts a supervisor thread blocked in a system call.

use nix::errno::Errno;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// The signal vkrun sends to its own threads to interrupt a blocking call
/// (`SECCOMP_IOCTL_NOTIF_RECV`); never forwarded to the guest.
pub const WAKE_SIGNAL: Signal = Signal::SIGURG;

extern "C" fn ignore(_: libc::c_int) {}

/// Install a handler for [`WAKE_SIGNAL`] that does nothing, without
/// `SA_RESTART`, so a blocked call returns `EINTR`. The guest does not
/// inherit it: `execve` resets caught signals to their default.
pub fn install_wake_handler() -> Result<(), Errno> {
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler is async-signal-safe (it does nothing), and no
    // other code in vkrun handles WAKE_SIGNAL.
    unsafe { sigaction(WAKE_SIGNAL, &action) }.map(drop)
}

/// Send `sig` to thread `tid` of process `tgid` (`tgkill(2)`: a thread id
/// reused by another process is never hit).
pub fn tgkill(tgid: nix::unistd::Pid, tid: nix::unistd::Pid, sig: i32) -> Result<(), Errno> {
    // SAFETY: tgkill takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), sig) };
    Errno::result(r).map(drop)
}

/// End the process at once with `code` (`_exit(2)`): no destructors, no
/// flushing of buffered output that might block on a full pipe. The
/// kernel then kills every tracee (`PTRACE_O_EXITKILL`) and every stub
/// (its parent-death signal).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes an integer and never returns.
    unsafe { libc::_exit(code) }
}
