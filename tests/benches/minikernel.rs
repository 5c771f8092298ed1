//! The minikernel (unmodified static programs in vmspaces) against native
//! runs of the same programs in the same bench run:
//!
//! - syscall-heavy: `hello-vmspace bench-getpid N` (a `getpid` loop; it
//!   prints ns per call) inside the minikernel, natively, and natively under
//!   `strace -f -qq` (for scale; skipped if strace is missing);
//! - fault-heavy: `hello-vmspace bench-touch 256` (one write per 4 KiB page
//!   of a fresh 256 MiB mapping; it prints ns per page) inside and natively;
//! - `busybox sha256sum` of a 64 MiB file, wall clock, inside and natively
//!   (skipped loudly, failing in CI, without a static busybox);
//! - the same three under User-Mode Linux when Debian's `user-mode-linux` is
//!   installed (`/usr/bin/linux`, booted with the host's root over hostfs and
//!   `init=` a script that runs them and powers off; the hash is timed inside
//!   UML, without its boot), with the ratios the RUN fast-path issue aims
//!   at; without UML a note says the rows are skipped.
//!
//! `hello-vmspace` is built by `cargo build --release --workspace`, so no
//! compiler is needed here. Everything is measured once pinned (the bench
//! pins itself to CPU 0; vkrun with all its threads, the minikernel, its
//! vmspace's stub and the native programs inherit it) and once unpinned;
//! each figure is the median of a few runs. Then one more run of each
//! workload inside with `vkrun --stats` and `MINIKERNEL_STATS=1` shows where
//! the time goes: RUNs and their exits, VPTE faults, what the minikernel
//! served, and the wall-clock time per RUN.
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench minikernel`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vkrun_tests::bench::{median, pin, unpin};
use vkrun_tests::{bin, skip, text, wait_output};

const REPEATS: usize = 5;
/// getpid calls per native sample.
const NATIVE_CALLS: u64 = 2_000_000;
/// getpid calls per sample inside the minikernel (each is a RUN round trip).
const INSIDE_CALLS: u64 = 20_000;
/// getpid calls per sample under strace.
const STRACE_CALLS: u64 = 100_000;
/// MiB touched by the fault-heavy program.
const TOUCH_MIB: u64 = 256;
/// Size of the file `sha256sum` reads.
const HASH_BYTES: usize = 64 << 20;
/// Guest RAM.
const RAM: &str = "512M";
/// How long one run may take before the bench fails.
const DEADLINE: Duration = Duration::from_secs(120);

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `vkrun -q -m RAM -- minikernel PROGRAM ARGS` (with `--stats` and
/// `MINIKERNEL_STATS=1` when `stats`).
fn inside(program: &Path, args: &[&str], stats: bool) -> Command {
    let mut cmd = Command::new(bin("vkrun"));
    if stats {
        cmd.arg("--stats").env("MINIKERNEL_STATS", "1");
    }
    cmd.args(["-q", "-m", RAM, "--"])
        .arg(bin("minikernel"))
        .arg(program)
        .args(args);
    cmd
}

/// Runs `cmd` to completion; its output and wall-clock seconds. Panics if
/// it fails.
fn timed(cmd: &mut Command) -> (Output, f64) {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = wait_output(child, DEADLINE);
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    (out, secs)
}

/// The number after `key` in what `cmd` printed.
fn printed(cmd: &mut Command, key: &str) -> f64 {
    let (out, _) = timed(cmd);
    let stdout = text(&out.stdout);
    stdout
        .trim()
        .strip_prefix(key)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{cmd:?} printed {stdout:?}, not {key} N"))
}

/// Median of `key` printed by `make()`'s command over [`REPEATS`] runs.
fn median_printed(make: impl Fn() -> Command, key: &str) -> f64 {
    median((0..REPEATS).map(|_| printed(&mut make(), key)).collect())
}

/// Median wall-clock seconds of `make()`'s command over [`REPEATS`] runs.
fn median_secs(make: impl Fn() -> Command) -> f64 {
    median((0..REPEATS).map(|_| timed(&mut make()).1).collect())
}

/// A static busybox, or `None` after a loud skip.
fn busybox() -> Option<PathBuf> {
    let Some(bb) = which("busybox") else {
        skip("busybox is not installed: no sha256sum figures");
        return None;
    };
    if !is_static(&bb) {
        skip("busybox is not statically linked (install busybox-static)");
        return None;
    }
    Some(bb)
}

/// Whether the ELF file at `path` has no `PT_INTERP` program header.
fn is_static(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    let at = |off: usize, n: usize| -> u64 {
        b.get(off..off + n)
            .map_or(0, |s| s.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x)))
    };
    let (phoff, phentsize, phnum) = (at(32, 8) as usize, at(54, 2) as usize, at(56, 2) as usize);
    b.starts_with(b"\x7fELF") && (0..phnum).all(|i| at(phoff + i * phentsize, 4) != 3)
}

/// A 64 MiB file of pseudo-random bytes.
fn hash_input(dir: &Path) -> PathBuf {
    let path = dir.join("input");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut body = Vec::with_capacity(HASH_BYTES);
    while body.len() < HASH_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&path, body).expect("write the 64 MiB input");
    path
}

/// What the same workloads measure under User-Mode Linux (Debian's
/// `user-mode-linux`, `/usr/bin/linux`): ns per getpid, ns per page
/// touched, ms for the hash; the medians of [`UML_BOOTS`] boots, each with
/// the host's root over hostfs and `init=` a script that runs the three
/// workloads, prints `VKUML key value` lines and powers off. `None` (and a
/// printed note) without UML or when a boot fails.
fn uml(dir: &Path, hello: &Path, busybox: Option<&Path>, input: &Path) -> Option<[f64; 3]> {
    let Some(linux) = which("linux").filter(|p| p.starts_with("/usr/bin")) else {
        println!(
            "(User-Mode Linux is not installed: apt-get install user-mode-linux; UML rows skipped)"
        );
        return None;
    };
    let hello = hello.display();
    let hash = match busybox {
        Some(bb) => format!(
            "s=$(date +%s%N); {} sha256sum {} >/dev/null; e=$(date +%s%N)\necho VKUML hash_ms $(( (e - s) / 1000000 ))",
            bb.display(),
            input.display()
        ),
        None => String::new(),
    };
    let script = dir.join("uml-init.sh");
    let body = format!(
        "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\n\
         echo VKUML $({hello} bench-getpid {INSIDE_CALLS})\n\
         echo VKUML $({hello} bench-touch {TOUCH_MIB})\n{hash}\n\
         echo o > /proc/sysrq-trigger\n"
    );
    std::fs::write(&script, body).expect("write the UML init script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the UML init script");
    let mut runs: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..UML_BOOTS {
        let child = Command::new(&linux)
            .args([
                "mem=768M",
                "root=/dev/root",
                "rootfstype=hostfs",
                "rootflags=/",
                "rw",
                "quiet",
                "con=null",
                "con0=fd:0,fd:1",
            ])
            .arg(format!("init={}", script.display()))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let out = wait_output(child, DEADLINE);
        let stdout = text(&out.stdout);
        let value = |key: &str| {
            stdout.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("VKUML ")?
                    .strip_prefix(key)?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        let (Some(g), Some(t)) = (value("getpid_ns_per_call"), value("touch_ns_per_page")) else {
            println!("(User-Mode Linux did not run the workloads; UML rows skipped)");
            return None;
        };
        runs[0].push(g);
        runs[1].push(t);
        runs[2].push(value("hash_ms").unwrap_or(f64::NAN));
    }
    Some(runs.map(median))
}

/// UML boots per figure.
const UML_BOOTS: usize = 3;

fn measure(label: &str, hello: &Path, busybox: Option<&Path>, input: &Path) {
    let n = |v: u64| v.to_string();
    let getpid_native = median_printed(
        || {
            let mut c = Command::new(hello);
            c.args(["bench-getpid", &n(NATIVE_CALLS)]);
            c
        },
        "getpid_ns_per_call",
    );
    let getpid_inside = median_printed(
        || inside(hello, &["bench-getpid", &n(INSIDE_CALLS)], false),
        "getpid_ns_per_call",
    );
    let getpid_strace = which("strace").map(|strace| {
        median_printed(
            || {
                let mut c = Command::new(&strace);
                c.args(["-f", "-qq", "-o", "/dev/null"])
                    .arg(hello)
                    .args(["bench-getpid", &n(STRACE_CALLS)]);
                c
            },
            "getpid_ns_per_call",
        )
    });
    let touch_native = median_printed(
        || {
            let mut c = Command::new(hello);
            c.args(["bench-touch", &n(TOUCH_MIB)]);
            c
        },
        "touch_ns_per_page",
    );
    let touch_inside = median_printed(
        || inside(hello, &["bench-touch", &n(TOUCH_MIB)], false),
        "touch_ns_per_page",
    );
    let start_native = median_secs(|| {
        let mut c = Command::new(hello);
        c.args(["bench-getpid", "1"]);
        c
    });
    let start_inside = median_secs(|| inside(hello, &["bench-getpid", "1"], false));
    let input_arg = input.to_str().expect("utf-8 path");
    let hash = busybox.map(|bb| {
        let native = median_secs(|| {
            let mut c = Command::new(bb);
            c.args(["sha256sum", input_arg]);
            c
        });
        let under = median_secs(|| inside(bb, &["sha256sum", input_arg], false));
        (native, under)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let uml = uml(dir.path(), hello, busybox, input);

    println!("== {label} ==");
    println!("getpid native                    {getpid_native:>10.1} ns   1.00x");
    println!(
        "getpid inside the minikernel     {getpid_inside:>10.1} ns   {:.0}x native (one RUN round trip each)",
        getpid_inside / getpid_native
    );
    match getpid_strace {
        Some(s) => println!(
            "getpid under strace -f           {s:>10.1} ns   {:.0}x native, inside is {:.1}x strace",
            s / getpid_native,
            getpid_inside / s
        ),
        None => println!("getpid under strace -f           (strace not installed)"),
    }
    println!("touch 256 MiB native             {touch_native:>10.1} ns a page   1.00x");
    println!(
        "touch 256 MiB inside             {touch_inside:>10.1} ns a page   {:.2}x native",
        touch_inside / touch_native
    );
    match hash {
        Some((native, under)) => {
            println!(
                "sha256sum 64 MiB native          {:>10.1} ms   1.00x",
                native * 1e3
            );
            println!(
                "sha256sum 64 MiB inside          {:>10.1} ms   {:.2}x native ({:.2}x after start-up)",
                under * 1e3,
                under / native,
                (under - start_inside) / (native - start_native).max(1e-6)
            );
        }
        None => println!("sha256sum 64 MiB                 (no static busybox)"),
    }
    println!(
        "start-up (bench-getpid 1)        {:>10.2} ms native, {:.2} ms inside (vkrun + minikernel + load)",
        start_native * 1e3,
        start_inside * 1e3
    );
    if let Some([g, t, h]) = uml {
        println!(
            "getpid under UML 6.1             {g:>10.1} ns   inside is {:.2}x UML (target <= 0.6x)",
            getpid_inside / g
        );
        println!(
            "touch 256 MiB under UML          {t:>10.1} ns a page   inside is {:.2}x UML (target <= 0.2x)",
            touch_inside / t
        );
        if let Some((_, under)) = hash
            && h.is_finite()
        {
            println!(
                "sha256sum 64 MiB under UML       {h:>10.1} ms   inside is {:.2}x UML (target <= 0.8x; UML timed inside, without its boot)",
                under * 1e3 / h
            );
        }
    }
}

/// One run of each workload inside with the counters on.
fn where_the_time_goes(hello: &Path, busybox: Option<&Path>, input: &Path) {
    println!("== where the time goes (pinned, one run each, vkrun --stats, MINIKERNEL_STATS=1) ==");
    let calls = INSIDE_CALLS.to_string();
    let mib = TOUCH_MIB.to_string();
    let input = input.to_str().expect("utf-8 path");
    let mut runs: Vec<(&str, &Path, Vec<&str>)> = vec![
        (
            "hello-vmspace bench-getpid",
            hello,
            vec!["bench-getpid", &calls],
        ),
        (
            "hello-vmspace bench-touch",
            hello,
            vec!["bench-touch", &mib],
        ),
        ("hello-vmspace (README)", hello, vec![]),
    ];
    if let Some(bb) = busybox {
        runs.push(("busybox sha256sum 64 MiB", bb, vec!["sha256sum", input]));
    }
    for (name, program, args) in runs {
        let (out, secs) = timed(&mut inside(program, &args, true));
        let stderr = text(&out.stderr);
        let mk = stderr
            .lines()
            .find(|l| l.starts_with("minikernel: "))
            .unwrap_or("minikernel: (no counters)");
        let runs = vkrun_tests::counter(&stderr, "vkrun.runs");
        println!(
            "{name}: {:.1} ms; {runs} RUNs ({:.1} us of wall clock per RUN): {} syscall exits, {} page-fault exits, {} trap, {} signal; {} vpagetable faults, {} host mappings installed\n    {mk}",
            secs * 1e3,
            secs * 1e6 / runs.max(1) as f64,
            vkrun_tests::counter(&stderr, "vkrun.run_exits.syscall"),
            vkrun_tests::counter(&stderr, "vkrun.run_exits.pagefault"),
            vkrun_tests::counter(&stderr, "vkrun.run_exits.trap"),
            vkrun_tests::counter(&stderr, "vkrun.run_exits.signal"),
            vkrun_tests::counter(&stderr, "vm.vpagetable_faults"),
            vkrun_tests::counter(&stderr, "vkrun.host_mappings_installed"),
        );
    }
}

fn main() {
    let hello = bin("hello-vmspace");
    let bb = busybox();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = hash_input(dir.path());
    pin(&[0]);
    measure(
        "pinned: bench, vkrun (all threads), minikernel, stub and native programs on CPU 0",
        &hello,
        bb.as_deref(),
        &input,
    );
    where_the_time_goes(&hello, bb.as_deref(), &input);
    let ncpu = unpin();
    measure(
        &format!("unpinned: {ncpu} CPUs, scheduler's choice"),
        &hello,
        bb.as_deref(),
        &input,
    );
}
