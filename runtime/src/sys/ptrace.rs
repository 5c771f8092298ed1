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
