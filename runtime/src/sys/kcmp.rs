//! `kcmp(2)`: does a descriptor in another process name our file?

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::unistd::Pid;

const KCMP_FILE: libc::c_long = 0;

/// Whether descriptor `their_fd` of task `tid` refers to the same open file
/// description as our `ours` (kcmp(2), `KCMP_FILE`). Needs ptrace access to
/// `tid`, which the tracer has.
pub fn same_file(ours: BorrowedFd<'_>, tid: Pid, their_fd: i32) -> Result<bool, Errno> {
    // SAFETY: kcmp takes only integers and does not touch our memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(std::process::id() as i32),
            libc::c_long::from(tid.as_raw()),
            KCMP_FILE,
            libc::c_long::from(ours.as_raw_fd()),
            libc::c_long::from(their_fd),
        )
    };
    match ret {
        0 => Ok(true),
        r if r > 0 => Ok(false),
        _ => Err(Errno::last()),
    }
}

const KCMP_VM: libc::c_long = 1;

/// Whether tasks `a` and `b` share one address space (kcmp(2), `KCMP_VM`).
pub fn same_vm(a: Pid, b: Pid) -> bool {
    // SAFETY: kcmp takes only integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(a.as_raw()),
            libc::c_long::from(b.as_raw()),
            KCMP_VM,
            0,
            0,
        )
    };
    ret == 0
}
