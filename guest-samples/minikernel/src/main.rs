//! `minikernel`: a small virtual kernel, itself a guest of vkrun, that runs
//! unmodified x86-64 Linux programs, static or dynamically linked, in
//! vmspaces (ABI section 7).
//!
//! ```text
//! vkrun -m 512M -- target/release/minikernel PROGRAM [ARGS...]
//! ```
//!
//! It maps guest RAM as its direct map ([`ram`]), loads `PROGRAM` (an
//! `ET_EXEC` or `ET_DYN` ELF file, found in `$PATH` like `execvp`, and
//! the interpreter its `PT_INTERP` names, if any) into frames of RAM under
//! a 4-level page table of its own ([`exec`], [`mm`]), creates a vmspace whose one `MAP_VPAGETABLE` window
//! over the user range points at that table, and runs the program with
//! `vmspace_ctl(RUN)` ([`trap`]), serving its page faults (demand paging)
//! and its Linux system calls ([`syscall`]), mostly by forwarding them to
//! the host: the program's descriptors, working directory and environment
//! are the minikernel's own. Signals reach the program's handlers as on
//! Linux ([`signal`]); each of its threads is a host thread of the
//! minikernel RUNning the same vmspace ([`trap`]).
//!
//! Exit status: the program's exit code; 128 + signal when it is killed
//! (139 for a segmentation fault, with nothing printed); 127 when the
//! program cannot be loaded, 1 when the minikernel itself fails, 2 for a
//! bad command line. `--trace` (or `MINIKERNEL_TRACE=1`) lists unknown
//! system calls on stderr, `--trace=all` (`MINIKERNEL_TRACE=all`) every
//! system call; `--stats` (`MINIKERNEL_STATS=1`) prints the minikernel's
//! counters at exit. Options come before `PROGRAM`.

mod exec;
mod kernel;
mod mm;
mod process;
mod ram;
mod signal;
mod syscall;
mod trap;

use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;

use vkguest::strerror;

use crate::kernel::{Kernel, KernelError};

const USAGE: &str = "usage: minikernel [--trace[=all]] [--stats] [--] PROGRAM [ARGS...]";

fn main() -> ExitCode {
    let mut args: Vec<Vec<u8>> = std::env::args_os().skip(1).map(|a| a.into_vec()).collect();
    // Leading options: the same switches as the environment variables
    // (which forked minikernels inherit).
    let mut settings = Vec::new();
    while let Some(first) = args.first() {
        match first.as_slice() {
            b"--trace" => settings.push(("MINIKERNEL_TRACE", "1")),
            b"--trace=all" => settings.push(("MINIKERNEL_TRACE", "all")),
            b"--stats" => settings.push(("MINIKERNEL_STATS", "1")),
            b"--" => {
                args.remove(0);
                break;
            }
            o if o.starts_with(b"-") => {
                eprintln!(
                    "minikernel: unknown option {}\n{USAGE}",
                    String::from_utf8_lossy(o)
                );
                return ExitCode::from(2);
            }
            _ => break,
        }
        args.remove(0);
    }
    for (k, v) in settings {
        // SAFETY: the minikernel is single-threaded here, before anything
        // reads the environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    let Some(program) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let info = match vkabi::hypercall::vk_info() {
        Ok(info) => info,
        Err(e) => {
            eprintln!(
                "minikernel: vk_info: {} (run it under vkrun)",
                strerror(e.0)
            );
            return ExitCode::from(1);
        }
    };
    let path = exec::find_program(&String::from_utf8_lossy(program));
    let envp: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| k != "MINIKERNEL_TRACE" && k != "MINIKERNEL_STATS")
        .map(|(k, v)| {
            let mut e = k.into_vec();
            e.push(b'=');
            e.extend(v.into_vec());
            e
        })
        .collect();
    // Rust ignores SIGPIPE in its programs; the user program expects the
    // default it would inherit from a shell.
    // SAFETY: installs SIG_DFL, no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let result: Result<std::convert::Infallible, KernelError> =
        Kernel::boot(&info).and_then(|mut k| {
            let p = k.spawn(path, &args, &envp)?;
            trap::run(k, p)
        });
    match result {
        Err(e @ KernelError::Exec { .. }) => {
            eprintln!("minikernel: {e}");
            ExitCode::from(127)
        }
        Err(e) => {
            eprintln!("minikernel: {e}");
            ExitCode::from(1)
        }
    }
}
