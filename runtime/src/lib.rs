//! vkrun's supervisor: starts a guest program under ptrace with the
//! hypercall filter, owns its RAM, serves its hypercalls and reports how it
//! ended.
//!
//! The public entry point is [`run`]. The launcher (`vkrun`) parses the
//! command line into a [`Config`] and turns the [`Outcome`] or [`Error`] into
//! an exit status.

#![deny(unsafe_code)]

mod error;
mod gdb;
pub mod host;
mod hypercall;
pub mod ram;
pub mod stats;
mod supervisor;
#[allow(unsafe_code)]
mod sys;
pub mod trace;
mod tracee;
mod vmspace;
mod vpt;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use nix::sys::signal::Signal;

pub use error::Error;
pub use gdb::{GdbAddr, GdbOptions};
pub use supervisor::run;
pub use tracee::remote;

/// What to run and how.
pub struct Config {
    /// The guest program as given (a path, or a name to look up in `PATH`).
    pub program: OsString,
    /// Its arguments, without `argv[0]` (which is `program`).
    pub args: Vec<OsString>,
    /// Guest RAM size in bytes: positive, page-aligned, at most 2^48.
    pub ram_size: u64,
    /// The trace: what to show and how.
    pub trace: trace::TraceOptions,
    /// Where trace lines and `--stats` go.
    pub output: Box<dyn Write + Send>,
    /// Print the counters at exit.
    pub stats: bool,
    /// With `stats`: list the counters that stayed zero too (`-v`).
    pub stats_zeros: bool,
    /// Serve gdb (`--gdb`); `None` costs nothing.
    pub gdb: Option<GdbOptions>,
    /// Offer the fast RUN (the guest library hands off to its execution
    /// context directly) when RUNs are not traced.
    pub fast_run: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("ram_size", &self.ram_size)
            .field("trace", &self.trace)
            .field("stats", &self.stats)
            .field("gdb", &self.gdb)
            .field("fast_run", &self.fast_run)
            .finish_non_exhaustive()
    }
}

/// How the guest's main process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled { signal: Signal, core_dumped: bool },
}

/// Resolve `program` like `execvp`: a name with a `/` is used as is; a bare
/// name is looked up in `PATH`. A name found only without execute permission
/// is `CannotExecute`, one not found at all `NotFound`.
pub fn resolve_program(program: &OsString) -> Result<PathBuf, Error> {
    use std::os::unix::ffi::OsStrExt;
    let display = program.to_string_lossy().into_owned();
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Err(Error::CannotExecute {
                program: display,
                errno: nix::errno::Errno::EISDIR,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NoSuchFile { program: display })
            }
            // Anything else (no permission, a dangling link's other
            // troubles) is for execve to report.
            _ => Ok(path),
        };
    }
    if program.is_empty() {
        return Err(Error::NotFound { program: display });
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut denied = None;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() => {
                match nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK) {
                    Ok(()) => return Ok(candidate),
                    Err(errno) => denied = Some(errno),
                }
            }
            _ => {}
        }
    }
    match denied {
        Some(errno) => Err(Error::CannotExecute {
            program: display,
            errno,
        }),
        None => Err(Error::NotFound { program: display }),
    }
}
