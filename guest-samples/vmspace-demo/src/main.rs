//! `vmspace-demo`: a small vkernel that runs a user program in a vmspace
//! through page tables it builds in guest RAM (ABI section 7), the way
//! DragonFly's vkernel runs its processes.
//!
//! ```text
//! vmspace-demo                  run the demo program, print what it writes and a summary
//! vmspace-demo bench N          N getpid round trips through RUN: run_ns_per_call
//! vmspace-demo bench-fault N    N fresh pages, each a T_PAGEFLT the vkernel serves: fault_ns_per_page
//! vmspace-demo bench-vpt N      N pages with prefilled leaves, resolved by the host: vpt_fault_ns_per_page
//! ```
//!
//! The vkernel ([`kernel`]) creates a vmspace, maps one
//! `MAP_SHARED|MAP_VPAGETABLE` window of guest RAM over the user range,
//! points it at a 4-level table in RAM with `MADV_SETMAP`, copies the user
//! program ([`user`], assembly in `user.s`) into RAM frames and maps only its
//! code; then it loops on `vmspace_ctl(RUN)`, mapping a fresh frame for each
//! `T_PAGEFLT` in the heap or the stack and serving `write`, `getpid` and
//! `exit` for each `T_FAST_SYSCALL`. The demo program computes primes, a
//! Fibonacci table and a deep recursion over demand-paged memory, so the
//! output is:
//!
//! ```text
//! primes below 100000: 9592, sum 454396537
//! fib(90): 2880067194370816120
//! sum(1..1000) by recursion: 500500
//! vmspace-demo: 43 page faults served, 4 syscalls, exit 0
//! ```
//!
//! The benches time from the program's first system call (a marker) to its
//! `exit` and print one `name value` line (nanoseconds); `bench-fault` and
//! `bench-vpt` then check through the direct map that every page holds what
//! the program stored and that the host set A and M on its leaf.
//!
//! Exit status ([`Status`]): the user program's exit code; 128 + signal when
//! a trap killed it (the message names the trap); 1 when the vkernel fails
//! (`vk_info: Function not implemented` on stderr without vkrun, or
//! `vmspace-demo: <hypercall>: <error>`); 2 for a bad command line.
//! `guest-samples/c/vmspace_demo.c` is the C twin of the demo.

mod kernel;
mod user;

#[cfg(test)]
mod native;

use std::process::ExitCode;

use vkabi::{PAGE_SIZE, VkInfo, hypercall};
use vkguest::strerror;

use crate::kernel::{HEAP_BASE, HEAP_SIZE, Kernel, KernelError, UserExit, signal_name};
use crate::user::Program;

const USAGE: &str = "usage: vmspace-demo [bench N | bench-fault N | bench-vpt N]";

/// What the command line asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    /// Run the demo program.
    Demo,
    /// `bench N`: RUN round trips.
    Bench(u64),
    /// `bench-fault N`: T_PAGEFLT served by the vkernel.
    BenchFault(u64),
    /// `bench-vpt N`: faults the host resolves through prefilled leaves.
    BenchVpt(u64),
}

/// Every way `vmspace-demo` ends, and its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// The user program called `exit(code)`: the low 8 bits of `code`.
    User(i32),
    /// A trap killed the user program: 128 + the signal.
    Killed(i32),
    /// The vkernel failed (a hypercall, guest RAM, a check): 1.
    Failure,
    /// Bad command line: 2.
    Usage,
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        ExitCode::from(match s {
            Status::User(code) => code as u8,
            Status::Killed(signal) => 128u8.saturating_add(signal as u8),
            Status::Failure => 1,
            Status::Usage => 2,
        })
    }
}

fn parse(args: &[String]) -> Option<Command> {
    let count = |n: &String| n.parse::<u64>().ok().filter(|n| *n > 0);
    match args {
        [] => Some(Command::Demo),
        [cmd, n] if cmd == "bench" => count(n).map(Command::Bench),
        [cmd, n] if cmd == "bench-fault" => count(n).map(Command::BenchFault),
        [cmd, n] if cmd == "bench-vpt" => count(n).map(Command::BenchVpt),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = parse(&args) else {
        eprintln!("{USAGE}");
        return Status::Usage.into();
    };
    if let Command::BenchFault(n) | Command::BenchVpt(n) = command
        && n > HEAP_SIZE / PAGE_SIZE
    {
        eprintln!("vmspace-demo: at most {} pages", HEAP_SIZE / PAGE_SIZE);
        return Status::Usage.into();
    }
    let info = match hypercall::vk_info() {
        Ok(info) => info,
        Err(e) => {
            eprintln!("vk_info: {}", strerror(e.0));
            return Status::Failure.into();
        }
    };
    let status = match command {
        Command::Demo => demo(info),
        Command::Bench(n) => bench_run(info, n),
        Command::BenchFault(n) => bench_fault(info, n, false),
        Command::BenchVpt(n) => bench_fault(info, n, true),
    };
    status
        .unwrap_or_else(|e| {
            eprintln!("vmspace-demo: {e}");
            Status::Failure
        })
        .into()
}

/// Boot, load `program` and run it with `args`.
fn boot_and_run(
    info: VkInfo,
    program: Program,
    args: [u64; 2],
    prefill: u64,
) -> Result<(Kernel, UserExit), KernelError> {
    let mut k = Kernel::boot(info)?;
    k.prefill(HEAP_BASE, prefill)?;
    let entry = k.load(program)?;
    let mut tf = k.start_frame(entry, args);
    let exit = k.run(&mut tf)?;
    Ok((k, exit))
}

/// The status for a killed user program, after saying why on stderr.
fn killed(signal: i32, why: &str) -> Status {
    eprintln!(
        "vmspace-demo: user program killed by {}: {why}",
        signal_name(signal)
    );
    Status::Killed(signal)
}

/// The demo: run [`Program::Demo`] with its heap at [`HEAP_BASE`]; its
/// output, then the summary line.
fn demo(info: VkInfo) -> Result<Status, KernelError> {
    let (k, exit) = boot_and_run(info, Program::Demo, [HEAP_BASE, 0], 0)?;
    let s = k.stats;
    let (end, status) = match exit {
        UserExit::Exited(code) => (format!("exit {code}"), Status::User(code)),
        UserExit::Killed { signal, why } => (
            format!("killed by {}", signal_name(signal)),
            killed(signal, &why),
        ),
    };
    println!(
        "vmspace-demo: {} page faults served, {} syscalls, {end}",
        s.page_faults, s.syscalls
    );
    Ok(status)
}

/// The status of a bench run that did not exit 0, after saying why.
fn bench_failed(exit: UserExit) -> Status {
    match exit {
        UserExit::Exited(code) => {
            eprintln!("vmspace-demo: the bench program exited {code}");
            Status::User(code)
        }
        UserExit::Killed { signal, why } => killed(signal, &why),
    }
}

/// `bench N`: [`Program::SyscallLoop`]; nanoseconds per RUN round trip.
fn bench_run(info: VkInfo, n: u64) -> Result<Status, KernelError> {
    let (k, exit) = boot_and_run(info, Program::SyscallLoop, [n, 0], 0)?;
    if exit != UserExit::Exited(0) {
        return Ok(bench_failed(exit));
    }
    let (elapsed, runs) = k.stats.timed().expect("the program made system calls");
    println!(
        "run_ns_per_call {:.1}",
        elapsed.as_nanos() as f64 / runs as f64
    );
    Ok(Status::User(0))
}

/// `bench-fault N` and `bench-vpt N` (`prefill`): [`Program::Touch`] over
/// `n` heap pages; nanoseconds per page.
fn bench_fault(info: VkInfo, n: u64, prefill: bool) -> Result<Status, KernelError> {
    let (k, exit) = boot_and_run(
        info,
        Program::Touch,
        [HEAP_BASE, n],
        if prefill { n } else { 0 },
    )?;
    if exit != UserExit::Exited(0) {
        return Ok(bench_failed(exit));
    }
    let expected = if prefill { 0 } else { n };
    if k.stats.page_faults != expected {
        return Err(KernelError::Check(format!(
            "{n} pages touched, {} T_PAGEFLT served, expected {expected}",
            k.stats.page_faults
        )));
    }
    k.check_touched(HEAP_BASE, n)?;
    let (elapsed, _) = k.stats.timed().expect("the program made system calls");
    let name = if prefill {
        "vpt_fault_ns_per_page"
    } else {
        "fault_ns_per_page"
    };
    println!("{name} {:.1}", elapsed.as_nanos() as f64 / n as f64);
    Ok(Status::User(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse(&args(&[])), Some(Command::Demo));
        assert_eq!(parse(&args(&["bench", "10"])), Some(Command::Bench(10)));
        assert_eq!(
            parse(&args(&["bench-fault", "3"])),
            Some(Command::BenchFault(3))
        );
        assert_eq!(
            parse(&args(&["bench-vpt", "7"])),
            Some(Command::BenchVpt(7))
        );
        for bad in [
            &["bench"][..],
            &["bench", "0"],
            &["bench", "x"],
            &["bench", "1", "2"],
            &["demo"],
        ] {
            assert_eq!(parse(&args(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn exit_statuses() {
        let code = |s| format!("{:?}", ExitCode::from(s));
        assert_eq!(code(Status::User(0)), format!("{:?}", ExitCode::from(0)));
        assert_eq!(
            code(Status::Killed(libc::SIGSEGV)),
            format!("{:?}", ExitCode::from(139))
        );
        assert_eq!(code(Status::Failure), format!("{:?}", ExitCode::from(1)));
        assert_eq!(code(Status::Usage), format!("{:?}", ExitCode::from(2)));
    }
}
