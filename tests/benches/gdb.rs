//! What `--gdb` costs, against the same guest under plain vkrun measured in
//! the same run:
//!
//! - the RUN round trip (`vmspace-demo bench N`) with the stub listening
//!   and no gdb (`--gdb 127.0.0.1:0 --gdb-wait=no`), and with gdb attached
//!   and continuing: RUN's path never passes the tracer, so both should be
//!   1.0x;
//! - a signal the guest takes by design (`gdb_target segv N`: `mprotect`
//!   then a write that faults, a handler that makes the page writable) with
//!   gdb attached and `handle SIGSEGV nostop noprint`: each one is a stop
//!   reported to gdb and a resume from it (with all-stop), the price of a
//!   debugger that sees signals.
//!
//! Pinned (the bench, vkrun, gdb and the guest on CPU 0) and unpinned;
//! medians of several runs. Without gdb or gcc it skips loudly (fails in
//! CI). Run with `cargo build --release --workspace && cargo bench -p
//! vkrun-tests --bench gdb`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vkrun_tests::bench::{median, pin};
use vkrun_tests::{bin, compile_c, require, text, wait_output, workspace_root};

const REPEATS: usize = 5;
const RUN_CALLS: &str = "10000";
const FAULTS: &str = "2000";
const DEADLINE: Duration = Duration::from_secs(120);

/// How the guest runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Listening,
    Attached,
}

/// Run `guest args` under vkrun in `mode`; the value of its `key VALUE`
/// line (nanoseconds).
fn sample(mode: Mode, guest: &Path, args: &[&str], gdb_cmds: &[&str], key: &str) -> f64 {
    let mut cmd = Command::new(bin("vkrun"));
    if mode != Mode::Plain {
        cmd.args(["--gdb", "127.0.0.1:0"]);
    }
    if mode == Mode::Listening {
        cmd.arg("--gdb-wait=no");
    }
    let mut child = cmd
        .arg("--")
        .arg(guest)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vkrun");
    let mut gdb = None;
    if mode != Mode::Plain {
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let addr = first
            .strip_prefix("vkrun: gdb: listening on ")
            .unwrap_or_else(|| panic!("vkrun said {first:?}"))
            .to_owned();
        std::thread::spawn(move || lines.for_each(drop));
        if mode == Mode::Attached {
            let mut g = Command::new("gdb");
            g.args(["-nx", "-batch", "-ex", "set debuginfod enabled off"]);
            g.args(["-ex", &format!("target remote {addr}")]);
            for c in gdb_cmds.iter().chain(&["continue"]) {
                g.args(["-ex", c]);
            }
            let g = g
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn gdb");
            gdb = Some(g);
        }
    }
    let out = wait_output(child, DEADLINE);
    if let Some(g) = gdb {
        wait_output(g, DEADLINE);
    }
    let stdout = text(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {stdout}"))
}

fn row(name: &str, guest: &Path, args: &[&str], gdb_cmds: &[&str], key: &str) {
    let m = |mode| {
        median(
            (0..REPEATS)
                .map(|_| sample(mode, guest, args, gdb_cmds, key))
                .collect(),
        )
    };
    let plain = m(Mode::Plain);
    let listening = m(Mode::Listening);
    let attached = m(Mode::Attached);
    println!(
        "  {name:<34} vkrun {:>8.1} µs | --gdb, none attached {:>8.1} µs ({:.2}x) | gdb attached {:>8.1} µs ({:.2}x)",
        plain / 1e3,
        listening / 1e3,
        listening / plain,
        attached / 1e3,
        attached / plain
    );
}

fn main() {
    if require("gdb").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(target) = compile_c(
        &workspace_root().join("tests/programs/gdb_target.c"),
        dir.path(),
        &["-g", "-pthread"],
    ) else {
        return;
    };
    let demo = bin("vmspace-demo");
    for (label, cpus) in [("pinned (CPU 0)", vec![0]), ("unpinned", vec![0, 1])] {
        pin(&cpus);
        println!("gdb stub, {label}, medians of {REPEATS}:");
        row(
            "RUN round trip",
            &demo,
            &["bench", RUN_CALLS],
            &[],
            "run_ns_per_call",
        );
        row(
            "SIGSEGV taken by a handler",
            &target,
            &["segv", FAULTS],
            &["handle SIGSEGV nostop noprint"],
            "segv_ns_per_fault",
        );
    }
}
