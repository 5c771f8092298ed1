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

/// The CPUs this machine has online (`/sys/devices/system/cpu/online`),
/// whatever this process is pinned to (`available_parallelism` counts
/// only the CPUs it may run on, so after [`pin`] it says 1).
pub fn cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpus(&list))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The number of CPUs in a list such as `0-1` or `0,2-3`.
fn count_cpus(list: &str) -> Option<usize> {
    list.trim().split(',').try_fold(0, |n, range| {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
        Some(n + b.checked_sub(a)? + 1)
    })
}

/// Let this process run on every CPU again; returns how many there are.
pub fn unpin() -> usize {
    let n = cpus();
    pin(&(0..n).collect::<Vec<_>>());
    n
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(super::count_cpus("0-1\n"), Some(2));
        assert_eq!(super::count_cpus("0,2-3"), Some(3));
        assert_eq!(super::count_cpus("x"), None);
    }
}
