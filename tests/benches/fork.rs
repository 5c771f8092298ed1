//! fork in the minikernel against a native fork and User-Mode Linux's, in
//! the same bench run: `tests/benches/forkbench.c` (built here with
//! `gcc -static`) measures, from inside each system, the median of
//!
//! - `forkexec`: fork, execv of a small static program (`return 0`),
//!   waitpid;
//! - `forktouch`: fork of a process with 64 MiB touched, the child exits at
//!   once, waitpid;
//! - `forkwrite`: the same, but the child writes one byte in every page
//!   first (every page copied on write).
//!
//! Each runs natively, inside `vkrun -- minikernel`, and inside User-Mode
//! Linux (`/usr/bin/linux`, booted with the host's root as hostfs and an
//! init script that runs the workload and powers off; skipped with a note
//! when UML is not installed), once pinned (the bench pins itself to CPU 0
//! and everything it starts inherits that) and once unpinned; each figure
//! is the median of a few runs. Then one pinned run inside with
//! `MINIKERNEL_STATS=1` and `vkrun --stats` says where a fork's time goes
//! (address space, host fork, vmspace, exec, copy-on-write faults).
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench fork`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vkrun_tests::bench::{median, pin, unpin};
use vkrun_tests::uml::Uml;
use vkrun_tests::{bin, skip, text, wait_output};

/// Runs of each figure (the median is printed).
const REPEATS: usize = 3;
/// How long one run may take before the bench fails.
const DEADLINE: Duration = Duration::from_secs(300);

/// Run `cmd`, failing the bench if it fails or outlives [`DEADLINE`].
fn output(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = wait_output(child, DEADLINE);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// The number after `key ` on a line of `out`.
fn figure(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {key} N in {out:?}"))
}

/// Build `source` (C) with `gcc -static -O2` into `dir/name`.
fn build(source: &Path, dir: &Path, name: &str) -> Option<PathBuf> {
    let Ok(out) = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join(name))
        .arg(source)
        .output()
    else {
        skip("gcc is not installed: no fork figures");
        return None;
    };
    assert!(out.status.success(), "gcc: {}", text(&out.stderr));
    Some(dir.join(name))
}

/// One workload: `forkbench MODE N ARG`.
struct Workload {
    mode: &'static str,
    /// Iterations natively, inside the minikernel and in UML.
    n: [u32; 3],
    arg: String,
    label: &'static str,
}

/// The systems a workload runs on.
#[derive(Clone, Copy)]
enum System {
    Native,
    Inside,
    Uml,
}

/// The workload's median ns, printed by `forkbench` under `system`.
fn run(system: System, bench: &Path, w: &Workload, uml: Option<&Uml>) -> f64 {
    let key = format!("{}_ns", w.mode);
    match system {
        System::Native => {
            let n = w.n[0].to_string();
            let out = output(Command::new(bench).args([w.mode, &n, &w.arg]));
            figure(&text(&out.stdout), &key)
        }
        System::Inside => {
            let n = w.n[1].to_string();
            let out = output(
                Command::new(bin("vkrun"))
                    .args(["-q", "-m", "512M", "--"])
                    .arg(bin("minikernel"))
                    .arg(bench)
                    .args([w.mode, &n, &w.arg]),
            );
            figure(&text(&out.stdout), &key)
        }
        System::Uml => {
            let n = w.n[2].to_string();
            let uml = uml.expect("UML figures only when it is installed");
            let printed = uml.run(bench, &[w.mode, &n, &w.arg], DEADLINE);
            figure(&printed, &key)
        }
    }
}

fn measure(label: &str, bench: &Path, work: &[Workload], uml: Option<&Uml>) {
    println!("== {label} ==");
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "workload (median)", "native", "minikernel", "UML", "mk/native", "mk/UML"
    );
    for w in work {
        let med = |s| median((0..REPEATS).map(|_| run(s, bench, w, uml)).collect());
        let native = med(System::Native);
        let inside = med(System::Inside);
        let (uml_s, ratio) = if uml.is_some() {
            let u = med(System::Uml);
            (
                format!("{:>9.3} ms", u / 1e6),
                format!("{:>9.2}x", inside / u),
            )
        } else {
            ("(no UML)".into(), "-".into())
        };
        println!(
            "{:<34} {:>9.3} ms {:>9.3} ms {uml_s:>12} {:>9.1}x {ratio:>10}",
            w.label,
            native / 1e6,
            inside / 1e6,
            inside / native
        );
    }
}

/// One pinned run of each workload inside with the counters on.
fn where_the_time_goes(bench: &Path, work: &[Workload]) {
    println!(
        "== where a fork's time goes (pinned, one run each, MINIKERNEL_STATS=1, vkrun --stats) =="
    );
    for w in work {
        let n = w.n[1].to_string();
        let out = output(
            Command::new(bin("vkrun"))
                .args(["--stats", "-q", "-m", "512M", "--"])
                .arg(bin("minikernel"))
                .arg(bench)
                .args([w.mode, &n, &w.arg])
                .env("MINIKERNEL_STATS", "1"),
        );
        let err = text(&out.stderr);
        // The first process's lines come last (it exits last); each child
        // prints its own (what it cost to start: the vmspace, its exec).
        let forks: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("minikernel: ") && l.contains(" forks "))
            .collect();
        let parent = forks.last().copied().unwrap_or("(no counters)");
        let children = &forks[..forks.len().saturating_sub(1)];
        let vmspace: Vec<f64> = children
            .iter()
            .filter_map(|l| after(l, "vmspace "))
            .collect();
        let exec: Vec<f64> = children
            .iter()
            .filter(|l| !l.contains(" 0 execs"))
            .filter_map(|l| after(l, "execs ("))
            .collect();
        let med = |v: Vec<f64>| if v.is_empty() { 0.0 } else { median(v) };
        let n = f64::from(w.n[1]);
        let per = |name: &str| vkrun_tests::counter(&err, name) as f64 / n;
        println!(
            "{}:\n    parent: {parent}\n    children (median): vmspace {:.0} µs (the first: {:.0} µs, a new one), exec {:.0} µs\n    \
             the run's totals / forks (with the first touch of the 64 MiB, where there is one): \
             {:.1} RUNs, {:.1} page faults RUN returned, {:.1} faults vkrun resolved, {:.1} vmspaces created",
            w.label,
            med(vmspace.clone()),
            vmspace.first().copied().unwrap_or(0.0),
            med(exec),
            per("vkrun.runs"),
            per("vkrun.run_exits.pagefault"),
            per("vm.vpagetable_faults"),
            per("vkrun.vmspaces_created"),
        );
    }
}

/// The number (µs) right after `key` in `line`.
fn after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = vkrun_tests::workspace_root().join("tests/benches/forkbench.c");
    let Some(bench) = build(&src, dir.path(), "forkbench") else {
        return;
    };
    let truec = dir.path().join("true.c");
    std::fs::write(&truec, "int main(void) { return 0; }\n").expect("write true.c");
    let Some(small) = build(&truec, dir.path(), "true") else {
        return;
    };
    let uml = Uml::new("512M");
    if uml.is_none() {
        println!("note: User-Mode Linux (/usr/bin/linux) is not installed: no UML figures");
    }
    let work = [
        Workload {
            mode: "forkexec",
            n: [400, 100, 200],
            arg: small.display().to_string(),
            label: "fork+exec+wait of a static true",
        },
        Workload {
            mode: "forktouch",
            n: [100, 30, 30],
            arg: "64".into(),
            label: "fork+exit+wait, 64 MiB touched",
        },
        Workload {
            mode: "forkwrite",
            n: [20, 5, 5],
            arg: "64".into(),
            label: "fork, child writes 64 MiB, wait",
        },
    ];
    pin(&[0]);
    measure(
        "pinned: bench, vkrun, minikernel, stubs, UML and native programs on CPU 0",
        &bench,
        &work,
        uml.as_ref(),
    );
    let ncpu = unpin();
    measure(
        &format!("unpinned: {ncpu} CPUs"),
        &bench,
        &work,
        uml.as_ref(),
    );
    pin(&[0]);
    where_the_time_goes(&bench, &work);
}
