//! vmspaces (ABI section 7) against native baselines measured in the same
//! run, with the `vmspace-demo` guest's bench subcommands:
//!
//! - the RUN round trip (`vmspace-demo bench N`: the user program loops on
//!   `syscall`, the vkernel answers each at once) against a 2-process futex
//!   round trip (two processes ping-ponging over a word in a `MAP_SHARED`
//!   page), the floor of any hand-off between two address spaces;
//! - a `T_PAGEFLT` the vkernel serves by filling a VPTE (`bench-fault N`:
//!   one RUN round trip plus the host's walk per page) and a fault the host
//!   resolves through a prefilled VPTE without RUN returning (`bench-vpt N`),
//!   both against a native first-touch write fault on fresh anonymous memory
//!   (transparent huge pages off, so each 4 KiB page faults).
//!
//! RUN is measured both ways: through `vmspace_ctl()` of the guest library
//! (the fast RUN, vkrun off the path: the target is 1.8x the futex
//! round trip pinned and 3x the same-CPU futex round trip unpinned) and as
//! the raw hypercall (`vkrun --run=hypercall`). Beside them it runs
//! `run_floor.c` (built here with `gcc`): the hypercall's four hand-offs,
//! signal and two copies with none of vkrun's bookkeeping, and once more
//! without the copies: the floor of the hypercall's design on the machine.
//!
//! Everything is measured once pinned (the bench pins itself to CPU 0; the
//! futex partner, vkrun with all its threads, the guest and the vmspace's
//! stub inherit it) and once unpinned; each figure is the median of several
//! runs. If a vmspace figure cannot be had (the guest fails, e.g. before
//! vmspace RUN exists), its row says so and the bench skips it loudly (in CI,
//! `CI=true`, that is a failure).
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench vmspace`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vkrun_tests::bench::{median, pin, unpin};
use vkrun_tests::{bin, require, skip, text, wait_output};

const REPEATS: usize = 5;
/// Round trips per futex sample.
const FUTEX_ROUND_TRIPS: u32 = 5_000;
/// RUN round trips per `vmspace-demo bench` run.
const RUN_CALLS: u64 = 10_000;
/// Pages per `bench-fault` / `bench-vpt` run (16 MiB of guest RAM).
const FAULT_PAGES: u64 = 4_000;
/// Pages per native fault sample.
const NATIVE_PAGES: usize = 20_000;
/// Guest RAM for the vmspace runs.
const RAM: &str = "256M";
/// How long one guest run may take before the bench fails.
const GUEST_DEADLINE: Duration = Duration::from_secs(60);

const PAGE: usize = 4096;

/// `futex(word, op, val)` with no timeout (FUTEX_WAIT and FUTEX_WAKE, not
/// private: the word is shared between processes).
fn futex(word: &AtomicU32, op: i32, val: u32) {
    // SAFETY: `word` is a live, aligned 32-bit word; FUTEX_WAIT only reads
    // it and FUTEX_WAKE touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

/// Wait until `word` holds `want`, sleeping in the kernel while it holds
/// `was`.
fn futex_await(word: &AtomicU32, was: u32, want: u32) {
    while word.load(Ordering::Acquire) != want {
        futex(word, libc::FUTEX_WAIT, was);
    }
}

/// Store `value` in `word` and wake its waiter.
fn futex_post(word: &AtomicU32, value: u32) {
    word.store(value, Ordering::Release);
    futex(word, libc::FUTEX_WAKE, 1);
}

/// Nanoseconds per round trip of two processes ping-ponging over a futex
/// word in a MAP_SHARED page: the parent posts 2i+1, the child answers
/// 2i+2.
fn futex_round_trip_ns() -> f64 {
    // SAFETY: a new shared anonymous page where the kernel chooses.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED, "mmap");
    // SAFETY: the page is live, zeroed and 4-aligned until the munmap below,
    // and shared with the child, which only uses it through atomics.
    let word = unsafe { AtomicU32::from_ptr(page.cast()) };
    // SAFETY: the child only runs futex calls and atomics on the shared
    // page, then _exit(2)s: nothing that is unsafe after fork.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        for i in 0..FUTEX_ROUND_TRIPS {
            futex_await(word, 2 * i, 2 * i + 1);
            futex_post(word, 2 * i + 2);
        }
        // SAFETY: _exit ends the child without running the parent's
        // destructors or atexit handlers.
        unsafe { libc::_exit(0) };
    }
    let start = Instant::now();
    for i in 0..FUTEX_ROUND_TRIPS {
        futex_post(word, 2 * i + 1);
        futex_await(word, 2 * i + 1, 2 * i + 2);
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(FUTEX_ROUND_TRIPS);
    let mut status = 0;
    // SAFETY: `child` is our child; then the page is used by nobody.
    unsafe {
        assert_eq!(libc::waitpid(child, &mut status, 0), child);
        libc::munmap(page, PAGE);
    }
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    ns
}

/// Nanoseconds per first-touch write fault on fresh anonymous memory, 4 KiB
/// pages (no transparent huge pages).
fn native_fault_ns() -> f64 {
    let len = NATIVE_PAGES * PAGE;
    // SAFETY: a new private anonymous mapping where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: madvise on our own mapping; a kernel without THP ignores it.
    unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
    let base = p.cast::<u8>();
    let start = Instant::now();
    for i in 0..NATIVE_PAGES {
        // SAFETY: byte i * PAGE lies inside the mapping, which is writable.
        unsafe { base.add(i * PAGE).write_volatile(1) };
    }
    let ns = start.elapsed().as_nanos() as f64 / NATIVE_PAGES as f64;
    // SAFETY: our own mapping, used by nobody now.
    unsafe { libc::munmap(p, len) };
    ns
}

/// The median over [`REPEATS`] runs of the value that `program ARGS` prints
/// as `name VALUE`, or `None` (after a loud skip) if a run fails.
fn median_printed(program: &Path, args: &[&str], name: &str) -> Option<f64> {
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let out = wait_output(child, GUEST_DEADLINE);
        let stdout = text(&out.stdout);
        let value = stdout
            .trim()
            .strip_prefix(name)
            .and_then(|v| v.trim().parse::<f64>().ok());
        match value {
            Some(v) if out.status.success() => samples.push(v),
            _ => {
                let why = format!(
                    "{} {}: {}\n{stdout}{}",
                    program.display(),
                    args.join(" "),
                    out.status,
                    text(&out.stderr)
                );
                skip(why.trim_end());
                return None;
            }
        }
    }
    Some(median(samples))
}

/// The median of `name` printed by `vkrun -q -m RAM -- vmspace-demo ARGS`.
fn demo_ns(args: &[&str], name: &str) -> Option<f64> {
    demo_ns_with(&[], args, name)
}

/// The same, with `options` for vkrun (`--run=hypercall`).
fn demo_ns_with(options: &[&str], args: &[&str], name: &str) -> Option<f64> {
    let demo = bin("vmspace-demo");
    let demo = demo.to_str().expect("a UTF-8 path");
    let mut all = vec!["-q", "-m", RAM];
    all.extend_from_slice(options);
    all.extend_from_slice(&["--", demo]);
    all.extend_from_slice(args);
    median_printed(&bin("vkrun"), &all, name)
}

/// Build `run_floor.c` next to the bench's other outputs, or `None` (after a
/// loud skip) without gcc.
fn build_floor() -> Option<PathBuf> {
    let gcc = require("gcc")?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/run_floor.c");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run_floor");
    let out = Command::new(gcc)
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("run gcc");
    if !out.status.success() {
        skip(&format!("building run_floor.c: {}", text(&out.stderr)));
        return None;
    }
    Some(exe)
}

/// Microseconds from nanoseconds, or `n/a`.
fn us(ns: Option<f64>) -> String {
    ns.map_or_else(|| "n/a".to_owned(), |ns| format!("{:.2}", ns / 1e3))
}

/// `a / b` as `N.NNx`, or `n/a`.
fn ratio(a: Option<f64>, b: f64) -> String {
    a.map_or_else(|| "n/a".to_owned(), |a| format!("{:.2}x", a / b))
}

/// One pass of every figure; `same_cpu` is the pinned pass's futex round
/// trip, which the unpinned RUN is also compared with (the target:
/// a RUN placement-independent, as a same-CPU hand-off). Returns this
/// pass's futex round trip.
fn measure(label: &str, floor: Option<&Path>, same_cpu: Option<f64>) -> f64 {
    let futex = median((0..REPEATS).map(|_| futex_round_trip_ns()).collect());
    let calls = RUN_CALLS.to_string();
    let raw_run = demo_ns_with(&["--run=hypercall"], &["bench", &calls], "run_ns_per_call");
    let floor_copies = floor.and_then(|exe| median_printed(exe, &[], "run_floor_ns"));
    let floor_bare = floor.and_then(|exe| median_printed(exe, &["nocopy"], "run_floor_ns"));
    let native = median((0..REPEATS).map(|_| native_fault_ns()).collect());
    let run = demo_ns(&["bench", &calls], "run_ns_per_call");
    let pages = FAULT_PAGES.to_string();
    let fault = demo_ns(&["bench-fault", &pages], "fault_ns_per_page");
    let vpt = demo_ns(&["bench-vpt", &pages], "vpt_fault_ns_per_page");

    println!("== {label} ==");
    println!(
        "futex round trip, 2 processes          {:>8} us",
        us(Some(futex))
    );
    let target = if same_cpu.is_none() { 1.8 } else { 3.0 };
    let base = same_cpu.unwrap_or(futex);
    println!(
        "RUN round trip through vmspace_ctl()   {:>8} us   {} the futex round trip, {} the same-CPU one (target <= {target}x)",
        us(run),
        ratio(run, futex),
        ratio(run, base)
    );
    println!(
        "  raw hypercall (--run=hypercall)      {:>8} us   {} the futex round trip, fast path {} of it",
        us(raw_run),
        ratio(raw_run, futex),
        raw_run.map_or_else(|| "n/a".to_owned(), |r| ratio(run, r))
    );
    println!(
        "  floor: the same path in plain C      {:>8} us   {}",
        us(floor_copies),
        ratio(floor_copies, futex)
    );
    println!(
        "  floor without the two copies         {:>8} us   {}",
        us(floor_bare),
        ratio(floor_bare, futex)
    );
    println!(
        "native first-touch write fault (anon)  {:>8} us",
        us(Some(native))
    );
    println!(
        "T_PAGEFLT served by the vkernel        {:>8} us   {} native, {} a RUN round trip",
        us(fault),
        ratio(fault, native),
        run.map_or_else(|| "n/a".to_owned(), |r| ratio(fault, r))
    );
    println!(
        "fault through a prefilled VPTE (host)  {:>8} us   {} native",
        us(vpt),
        ratio(vpt, native)
    );
    futex
}

fn main() {
    let floor = build_floor();
    pin(&[0]);
    let same_cpu = measure(
        "pinned: bench, futex partner, vkrun (all threads), guest and stub on CPU 0",
        floor.as_deref(),
        None,
    );
    let ncpu = unpin();
    measure(
        &format!("unpinned: {ncpu} CPUs, scheduler's choice"),
        floor.as_deref(),
        Some(same_cpu),
    );
}
