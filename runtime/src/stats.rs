//! Counters printed by `--stats` (ABI section 8): DragonFly's
//! `vm.vpagetable_*` sysctls and vkrun's own.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use vkabi::Hypercall;

/// The supervisor's counters; every one is printed, 0 until its feature runs.
/// Shared by the supervisor's threads; relaxed atomics (each counter is
/// independent and read only at exit).
#[derive(Debug, Default)]
pub struct Stats {
    /// `vm.vpagetable_mmap`: VPAGETABLE mappings created.
    pub vpagetable_mmap: AtomicU64,
    /// `vm.vpagetable_setmap`: `MADV_SETMAP` calls.
    pub vpagetable_setmap: AtomicU64,
    /// `vm.vpagetable_inval`: `MADV_INVAL` calls.
    pub vpagetable_inval: AtomicU64,
    /// `vm.vpagetable_faults`: faults resolved by a walk.
    pub vpagetable_faults: AtomicU64,
    /// Calls per hypercall, indexed like `Hypercall::ALL`.
    pub hypercalls: [AtomicU64; Hypercall::ALL.len()],
    /// Calls with a number in the range that names no hypercall.
    pub hypercalls_unknown: AtomicU64,
    /// Hypercalls that returned an error.
    pub hypercall_errors: AtomicU64,
    /// vmspaces created.
    pub vmspaces_created: AtomicU64,
    /// vmspaces destroyed.
    pub vmspaces_destroyed: AtomicU64,
    /// `vmspace_ctl(RUN)` calls.
    pub runs: AtomicU64,
    /// RUN exits by `syscall`.
    pub run_exits_syscall: AtomicU64,
    /// RUN exits by page fault.
    pub run_exits_pagefault: AtomicU64,
    /// RUN exits by another trap.
    pub run_exits_trap: AtomicU64,
    /// RUN exits by a signal for the caller.
    pub run_exits_signal: AtomicU64,
    /// Host mappings installed for VPAGETABLE pages.
    pub host_mappings_installed: AtomicU64,
    /// Host mappings evicted to stay under the VMA budget.
    pub host_mappings_evicted: AtomicU64,
    /// Host VMAs currently used by installed translations (an upper bound:
    /// two per installed run).
    pub host_vmas: AtomicU64,
    /// The highest `host_vmas` reached.
    pub host_vmas_peak: AtomicU64,
}

impl Stats {
    /// Count one hypercall (`None`: an unknown number) and its outcome.
    pub fn count_hypercall(&self, h: Option<Hypercall>, failed: bool) {
        match h.and_then(|h| Hypercall::ALL.iter().position(|x| *x == h)) {
            Some(i) => self.hypercalls[i].fetch_add(1, Relaxed),
            None => self.hypercalls_unknown.fetch_add(1, Relaxed),
        };
        if failed {
            self.hypercall_errors.fetch_add(1, Relaxed);
        }
    }

    /// What happened, in one line for a newcomer, before the counters:
    /// `vkrun: 159 RUNs in 1 vmspace (...), 152 page faults resolved by vkrun, 12 hypercalls`.
    pub fn summary(&self) -> String {
        let n = |c: &AtomicU64| c.load(Relaxed);
        let plural =
            |k: u64, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
        let hypercalls: u64 =
            self.hypercalls.iter().map(n).sum::<u64>() + n(&self.hypercalls_unknown);
        let mut text = format!("vkrun: {}", plural(hypercalls, "hypercall", "hypercalls"));
        if n(&self.runs) > 0 {
            let _ = write!(
                text,
                ", {} in {} (ended by {} system calls, {} page faults, {} other traps, {} signals)",
                plural(n(&self.runs), "RUN", "RUNs"),
                plural(n(&self.vmspaces_created), "vmspace", "vmspaces"),
                n(&self.run_exits_syscall),
                n(&self.run_exits_pagefault),
                n(&self.run_exits_trap),
                n(&self.run_exits_signal),
            );
        }
        let _ = write!(
            text,
            ", {} resolved by vkrun",
            plural(
                n(&self.vpagetable_faults),
                "page-table fault",
                "page-table faults"
            )
        );
        if n(&self.host_mappings_evicted) > 0 {
            let _ = write!(
                text,
                " ({} host mappings evicted)",
                n(&self.host_mappings_evicted)
            );
        }
        text
    }

    /// The one-line summary, then the `name: value` lines, DragonFly's
    /// sysctls first: those that stayed zero only when `zeros` (`-v`).
    pub fn render(&self, zeros: bool) -> String {
        let mut out = format!("{}\n", self.summary());
        let mut line = |name: &str, value: &AtomicU64| {
            let v = value.load(Relaxed);
            if v != 0 || zeros {
                let _ = writeln!(out, "{name}: {v}");
            }
        };
        line("vm.vpagetable_mmap", &self.vpagetable_mmap);
        line("vm.vpagetable_setmap", &self.vpagetable_setmap);
        line("vm.vpagetable_inval", &self.vpagetable_inval);
        line("vm.vpagetable_faults", &self.vpagetable_faults);
        let total: u64 = self.hypercalls.iter().map(|c| c.load(Relaxed)).sum::<u64>()
            + self.hypercalls_unknown.load(Relaxed);
        line("vkrun.hypercalls", &AtomicU64::new(total));
        line("vkrun.hypercall_errors", &self.hypercall_errors);
        for (h, n) in Hypercall::ALL.iter().zip(&self.hypercalls) {
            line(&format!("vkrun.hypercalls.{}", h.name()), n);
        }
        line("vkrun.hypercalls.unknown", &self.hypercalls_unknown);
        line("vkrun.vmspaces_created", &self.vmspaces_created);
        line("vkrun.vmspaces_destroyed", &self.vmspaces_destroyed);
        line("vkrun.runs", &self.runs);
        line("vkrun.run_exits.syscall", &self.run_exits_syscall);
        line("vkrun.run_exits.pagefault", &self.run_exits_pagefault);
        line("vkrun.run_exits.trap", &self.run_exits_trap);
        line("vkrun.run_exits.signal", &self.run_exits_signal);
        line(
            "vkrun.host_mappings_installed",
            &self.host_mappings_installed,
        );
        line("vkrun.host_mappings_evicted", &self.host_mappings_evicted);
        line("vkrun.host_vmas", &self.host_vmas);
        line("vkrun.host_vmas_peak", &self.host_vmas_peak);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered() {
        let s = Stats::default();
        s.count_hypercall(Some(Hypercall::VkInfo), false);
        s.count_hypercall(None, true);
        let text = s.render(true);
        assert_eq!(
            text.lines().next(),
            Some("vkrun: 2 hypercalls, 0 page-table faults resolved by vkrun")
        );
        s.runs.fetch_add(3, Relaxed);
        s.vmspaces_created.fetch_add(1, Relaxed);
        s.run_exits_syscall.fetch_add(2, Relaxed);
        s.run_exits_pagefault.fetch_add(1, Relaxed);
        s.vpagetable_faults.fetch_add(1, Relaxed);
        assert_eq!(
            s.summary(),
            "vkrun: 2 hypercalls, 3 RUNs in 1 vmspace (ended by 2 system calls, 1 page faults, \
             0 other traps, 0 signals), 1 page-table fault resolved by vkrun"
        );
        assert!(text.lines().nth(1) == Some("vm.vpagetable_mmap: 0"));
        assert!(text.contains("vkrun.hypercalls: 2\n"));
        assert!(text.contains("vkrun.hypercalls.vk_info: 1\n"));
        assert!(text.contains("vkrun.hypercalls.unknown: 1\n"));
        assert!(text.contains("vkrun.hypercall_errors: 1\n"));
        // The summary, then every counter.
        assert_eq!(text.lines().count(), 1 + 6 + Hypercall::ALL.len() + 1 + 11);
        // Without zeros: the summary and the five that moved by then.
        let moved = s.render(false);
        assert!(!moved.contains(": 0\n"), "{moved}");
        assert!(
            moved.contains("vkrun.runs: 3\n") && moved.contains("vkrun.hypercalls.unknown: 1\n")
        );
        assert!(text.lines().all(|l| l.split_once(": ").is_some()));
    }
}
