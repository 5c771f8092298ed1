//! The crate's errors: what ends a supervision ([`Error`]), what a stopped
//! tracee can do to an operation ([`TraceeError`]), and the two together
//! for calls served inside a tracee ([`CallError`]).

use nix::errno::Errno;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::ram::RamError;

/// Why vkrun could not run the guest to its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// the program was not found
    #[error("{program}: command not found")]
    NotFound { program: String },
    /// a path (a name with a `/`) that does not exist
    #[error("{program}: No such file or directory")]
    NoSuchFile { program: String },
    /// the program exists but cannot be executed
    #[error("{program}: cannot execute: {errno}", errno = .errno.desc())]
    CannotExecute { program: String, errno: Errno },
    /// guest RAM could not be created
    #[error(transparent)]
    Ram(#[from] RamError),
    /// a system call the supervisor depends on failed
    #[error("{what}: {errno}", errno = .errno.desc())]
    Sys { what: &'static str, errno: Errno },
    /// the guest's start-up failed before it could run
    #[error("guest set-up failed ({step}): {errno}", errno = .errno.desc())]
    Setup { step: &'static str, errno: Errno },
}

impl Error {
    /// A closure mapping an errno to [`Error::Sys`] for `what`.
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(Errno) -> Error {
        move |errno| Error::Sys { what, errno }
    }
}

/// A traced thread exited or was killed while vkrun worked on it; its wait
/// status is kept so that the event loop accounts for it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("traced thread {pid} went away")]
pub struct TraceeGone {
    pub pid: Pid,
    pub status: WaitStatus,
}

/// Why an operation on a stopped tracee could not complete.
#[derive(Debug, thiserror::Error)]
pub enum TraceeError {
    /// the thread exited or was killed; its wait status is not lost
    #[error(transparent)]
    Gone(#[from] TraceeGone),
    /// a ptrace request failed
    #[error("ptrace on guest thread {tid}: {errno}")]
    Ptrace { tid: Pid, errno: Errno },
}

/// A call served by running code in a stopped tracee: either it failed with
/// an errno the guest sees, or the tracee itself failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// the call's result for the guest
    #[error("{}", .0.desc())]
    Guest(#[from] Errno),
    /// the tracee went away or could not be driven
    #[error(transparent)]
    Tracee(#[from] TraceeError),
}

impl From<TraceeGone> for CallError {
    fn from(g: TraceeGone) -> Self {
        CallError::Tracee(TraceeError::Gone(g))
    }
}

/// A raw system call result (`-errno` on failure, as the kernel returns it
/// in `rax`) as a `Result`.
pub fn errno_or(ret: i64) -> Result<i64, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno::from_raw(-ret as i32))
    } else {
        Ok(ret)
    }
}

/// A `Result` as the raw value a system call returns (`-errno` on failure).
pub fn raw_result(result: Result<i64, Errno>) -> i64 {
    result.unwrap_or_else(|e| -(e as i64))
}
