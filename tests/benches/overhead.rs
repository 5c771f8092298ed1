//! Supervisor overhead against a native baseline measured in the same run:
//! an ordinary syscall (getpid loop) natively, under vkrun and under
//! `strace -f`; a `vk_info` round trip against native getpid; and the start-up
//! cost of `vkrun -- /bin/true`. Each figure is the median of several runs,
//! once with everything pinned to CPU 0 (the bench process pins itself; the
//! supervisor and guests inherit it) and once unpinned.
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench overhead`.

use std::process::Command;
use std::time::Instant;

use vkrun_tests::bench::{median, pin, unpin};
use vkrun_tests::{bin, run, text};

const REPEATS: usize = 5;

/// ns per call printed by `vkcall loop WHAT N`, optionally under a wrapper.
fn loop_ns(wrapper: &[&str], what: &str, n: u64) -> f64 {
    let vkcall = bin("vkcall");
    let samples = (0..REPEATS)
        .map(|_| {
            let mut cmd = match wrapper.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest);
                    c.arg(&vkcall);
                    c
                }
                None => Command::new(&vkcall),
            };
            let out = run(cmd.args(["loop", what, &n.to_string()]));
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stdout)
                .trim()
                .parse::<f64>()
                .expect("ns per call")
        })
        .collect();
    median(samples)
}

/// Median wall-clock milliseconds of running `cmd` to completion.
fn start_ms(cmd: &[&str], runs: usize) -> f64 {
    let samples = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let status = Command::new(cmd[0])
                .args(&cmd[1..])
                .status()
                .expect("spawn");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            assert!(status.success(), "{cmd:?}");
            ms
        })
        .collect();
    median(samples)
}

fn measure(label: &str) {
    let vkrun = bin("vkrun");
    let vkrun = vkrun.to_str().expect("utf-8 path");
    let native = loop_ns(&[], "getpid", 2_000_000);
    let under = loop_ns(&[vkrun, "-q", "--"], "getpid", 2_000_000);
    let strace =
        which("strace").map(|s| loop_ns(&[&s, "-f", "-qq", "-o", "/dev/null"], "getpid", 100_000));
    let info = loop_ns(&[vkrun, "-q", "--"], "vk_info", 200_000);
    let bare = loop_ns(&[vkrun, "-q", "--"], "bare", 200_000);
    let t_native = start_ms(&["/bin/true"], 21);
    let t_vkrun = start_ms(&[vkrun, "--", "/bin/true"], 21);

    println!("== {label} ==");
    println!("getpid native            {native:8.1} ns   1.00x");
    println!(
        "getpid under vkrun       {under:8.1} ns   {:.2}x   (target <= 1.5x)",
        under / native
    );
    match strace {
        Some(s) => println!(
            "getpid under strace -f   {s:8.1} ns   {:.1}x   (for scale)",
            s / native
        ),
        None => println!("getpid under strace -f   (strace not installed)"),
    }
    println!(
        "bare hypercall (ENOSYS)  {bare:8.1} ns   {:.1}x native getpid",
        bare / native
    );
    println!(
        "vk_info round trip       {info:8.1} ns   {:.1}x native getpid   (target <= 40x)",
        info / native
    );
    println!(
        "/bin/true                {t_native:8.2} ms native, {t_vkrun:.2} ms under vkrun: +{:.2} ms",
        t_vkrun - t_native
    );
}

fn which(tool: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .and_then(|p| p.to_str().map(str::to_owned))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
    pin(&[0]);
    measure("pinned: bench, vkrun and guest all on CPU 0");
    let ncpu = unpin();
    measure(&format!("unpinned: {ncpu} CPUs, scheduler's choice"));
}
