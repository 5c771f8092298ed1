//! Threads inside the minikernel against native runs and User-Mode Linux,
//! measured in the same bench run:
//!
//! - `pingpong` (tests/programs/pingpong.c, `gcc -static -pthread`): two
//!   threads hand a turn back and forth through a pthreads mutex and
//!   condition variable, so every round trip is futex waits and wakes;
//! - `gopingpong` (tests/programs/gopingpong, a static Go binary): two
//!   goroutines hand a token back and forth over unbuffered channels; the
//!   Go scheduler decides whether a hand-off needs a futex at all.
//!
//! Each program prints its own ns per round trip, so the figures exclude
//! start-up (vkrun, the minikernel's load, UML's boot). Everything is
//! measured once pinned (the bench pins itself to CPU 0 and every process
//! it starts inherits that) and once unpinned; each figure is the median of
//! a few runs. UML is Debian's `user-mode-linux` booted over hostfs
//! (`vkrun_tests::uml`); without it the UML column says so.
//!
//! Inside, every futex wait and wake is a RUN round trip, and so is every
//! clock read: the minikernel maps no vDSO, so Go's scheduler pays a RUN
//! for each `clock_gettime` that natively never enters the kernel.
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench threads`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;
use vkrun_tests::uml::Uml;
use vkrun_tests::{bin, compile_c, require, text, wait_output, workspace_root};

const REPEATS: usize = 5;
/// Round trips per sample natively and in UML.
const NATIVE_TRIPS: &str = "200000";
/// Round trips per sample inside the minikernel.
const INSIDE_TRIPS: &str = "20000";
/// How long one run may take before the bench fails.
const DEADLINE: Duration = Duration::from_secs(120);
const KEY: &str = "round trip ns:";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pin(cpus: &[usize]) {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).expect("cpu index");
    }
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// The figure after [`KEY`] in what a program printed.
fn figure(printed: &str, what: &str) -> f64 {
    printed
        .lines()
        .find_map(|l| l.strip_prefix(KEY))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what} printed {printed:?}, not `{KEY} N`"))
}

/// Runs `cmd` to completion and returns its figure; panics if it failed.
fn run(mut cmd: Command) -> f64 {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = wait_output(child, DEADLINE);
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    figure(&text(&out.stdout), &what)
}

/// The three figures of one program: native, inside, UML (if installed).
struct Row {
    native: f64,
    inside: f64,
    uml: Option<f64>,
}

fn measure(program: &Path, uml: Option<&Uml>) -> Row {
    let native = median(
        (0..REPEATS)
            .map(|_| {
                let mut c = Command::new(program);
                c.arg(NATIVE_TRIPS);
                run(c)
            })
            .collect(),
    );
    let inside = median(
        (0..REPEATS)
            .map(|_| {
                let mut c = Command::new(bin("vkrun"));
                c.args(["-q", "-m", "256M", "--"])
                    .arg(bin("minikernel"))
                    .arg(program)
                    .arg(INSIDE_TRIPS);
                run(c)
            })
            .collect(),
    );
    let uml = uml.map(|u| {
        median(
            (0..REPEATS)
                .map(|_| {
                    let what = format!("{} in UML", program.display());
                    figure(&u.run(program, &[NATIVE_TRIPS], DEADLINE), &what)
                })
                .collect(),
        )
    });
    Row {
        native,
        inside,
        uml,
    }
}

fn report(label: &str, programs: &[(&str, PathBuf)], uml: Option<&Uml>) {
    println!("== {label} ==");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "ns per round trip", "native", "inside", "UML", "in/nat", "in/UML"
    );
    for (name, program) in programs {
        let row = measure(program, uml);
        let (uml_ns, vs_uml) = match row.uml {
            Some(u) => (format!("{u:.0}"), format!("{:.2}x", row.inside / u)),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{name:<34} {:>10.0} {:>10.0} {uml_ns:>10} {:>8.2}x {vs_uml:>9}",
            row.native,
            row.inside,
            row.inside / row.native
        );
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut programs = Vec::new();
    let src = workspace_root().join("tests/programs");
    match compile_c(
        &src.join("pingpong.c"),
        dir.path(),
        &["-static", "-pthread"],
    ) {
        Some(p) => programs.push(("pthreads mutex+condvar ping-pong", p)),
        None => println!("(no gcc: no pthreads figures)"),
    }
    if let Some(go) = require("go") {
        let out = dir.path().join("gopingpong");
        let status = Command::new(go)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", dir.path().join("gocache"))
            .args(["build", "-o"])
            .arg(&out)
            .arg(src.join("gopingpong/main.go"))
            .status()
            .expect("run go build");
        assert!(status.success(), "go build gopingpong: {status}");
        programs.push(("Go channel ping-pong", out));
    }
    let uml = Uml::new("256M");
    if uml.is_none() {
        println!("(user-mode-linux is not installed: no UML column; apt install user-mode-linux)");
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin(&[0]);
    report(
        "pinned: bench, vkrun (all threads), minikernel, stub, UML and native programs on CPU 0",
        &programs,
        uml.as_ref(),
    );
    pin(&(0..ncpu).collect::<Vec<_>>());
    report(
        &format!("unpinned: {ncpu} CPUs, scheduler's choice"),
        &programs,
        uml.as_ref(),
    );
}
