//! What every bench does: take medians, and run pinned to CPU 0 or on every
//! CPU (processes a bench starts inherit its affinity, so pinning the bench
//! pins vkrun, its threads, the guest and the native baselines with it).

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// The median of `v` (the upper one of an even count). Panics if empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run this process (and what it starts from now on) on `cpus` only.
pub fn pin(cpus: &[usize]) {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).expect("cpu index");
    }
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// The CPUs this machine has.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Let this process run on every CPU again; returns how many there are.
pub fn unpin() -> usize {
    let n = cpus();
    pin(&(0..n).collect::<Vec<_>>());
    n
}
