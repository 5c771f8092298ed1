//! MAP_VPAGETABLE against native memfd access, measured in the same guest
//! process and the same run (`guest-samples/c/vpt_bench.c`, compiled here):
//! first-touch write faults with random targets, sequential touch of
//! contiguous frames whose entries carry A|M (prefault batching), and
//! `MADV_INVAL` of one page and of 4096 scattered pages. Once pinned (the
//! bench pins itself to CPU 0; vkrun, its threads and the guest inherit it)
//! and once unpinned; medians of several runs.
//!
//! Run with `cargo build --release --workspace && cargo bench -p vkrun-tests --bench vpagetable`.

use std::collections::BTreeMap;
use std::process::Command;

use vkrun_tests::bench::{pin, unpin};
use vkrun_tests::{bin, compile_c, run, text, workspace_root};

const REPEATS: usize = 5;

/// Medians of the `name value` lines of `REPEATS` runs of `vpt_bench args`.
fn figures(bench: &std::path::Path, ram: &str, args: &[&str]) -> BTreeMap<String, f64> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..REPEATS {
        let out = run(Command::new(bin("vkrun"))
            .args(["-q", "-m", ram, "--"])
            .arg(bench)
            .args(args));
        assert!(
            out.status.success(),
            "vpt_bench {args:?}: {}",
            text(&out.stderr)
        );
        for line in text(&out.stdout).lines() {
            let (name, value) = line.split_once(' ').expect("name value");
            all.entry(name.to_owned())
                .or_default()
                .push(value.parse().expect("number"));
        }
    }
    all.into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, v[v.len() / 2])
        })
        .collect()
}

fn measure(bench: &std::path::Path, label: &str) {
    let w = figures(bench, "512M", &["write", "4096"]);
    let s = figures(bench, "512M", &["seq", "8192"]);
    let i = figures(bench, "512M", &["inval", "2000"]);
    println!("== {label} ==");
    let (native, window) = (w["native_write_fault_us"], w["window_write_fault_us"]);
    println!(
        "first-touch write fault, random target  {window:7.2} us vs native memfd minor write fault {native:5.2} us: {:5.1}x (target <= 12x)",
        window / native
    );
    for kind in ["read", "write"] {
        let native = s[&format!("native_seq_{kind}_us")];
        let window = s[&format!("window_seq_{kind}_us")];
        println!(
            "sequential {kind:5}, contiguous A|M         {window:7.2} us/page vs native {native:5.2} us/page: {:5.2}x (target <= 1.5x)",
            window / native
        );
    }
    let (inval, dontneed) = (i["inval_1_page_us"], i["native_dontneed_1_page_us"]);
    println!(
        "MADV_INVAL 1 page                       {inval:7.2} us per call vs native MADV_DONTNEED {dontneed:5.2} us: {:5.1}x",
        inval / dontneed
    );
    let (inval, dontneed) = (
        i["inval_4096_scattered_us"],
        i["native_dontneed_4096_scattered_us"],
    );
    println!(
        "MADV_INVAL 4096 scattered pages         {inval:7.0} us per call ({:.2} us a page) vs native MADV_DONTNEED {dontneed:5.0} us: {:5.1}x",
        i["inval_4096_scattered_per_page_us"],
        inval / dontneed
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = workspace_root().join("guest-samples/c/vpt_bench.c");
    let Some(bench) = compile_c(&src, dir.path(), &[]) else {
        return;
    };
    pin(&[0]);
    measure(
        &bench,
        "pinned: bench, vkrun (all threads) and guest on CPU 0",
    );
    let ncpu = unpin();
    measure(
        &bench,
        &format!("unpinned: {ncpu} CPUs, scheduler's choice"),
    );
}
