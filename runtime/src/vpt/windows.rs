//! The pure bookkeeping of one address space's windows: where they are,
//! which pages are poisoned, which runs of RAM are installed, and the host
//! VMA budget that decides which runs to evict. No system calls: the
//! callers ([`super::install`]) carry out what these decide, under the
//! process's `mm` lock.

use std::collections::{BTreeMap, HashMap, VecDeque};

use vkabi::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE;

/// Pages installed ahead of access around a fault, at most (ABI section 3,
/// Prefault). A run never leaves the faulting page's last-level table (512
/// pages); whole-table runs made sequential touch of A|M-carrying entries
/// cheaper than native (0.27 vs 0.33 µs a page), where 16-page runs cost
/// 1.3 µs a page.
pub const PREFAULT_MAX: u64 = 512;
/// Host VMAs vkrun lets one guest process's installs reach, below
/// `vm.max_map_count` (65530 here) with room for the guest's own mappings.
const VMA_BUDGET: u64 = 60_000;
/// VMAs one installed run may cost: it splits the window's anonymous VMA.
pub const VMAS_PER_RUN: u64 = 2;

/// Installed runs one process may hold before the oldest are evicted, for
/// a host whose `vm.max_map_count` is `max_map_count`: a tenth of the limit
/// (at least 4096) stays free for the guest's own VMAs.
pub fn max_runs(max_map_count: u64) -> u64 {
    let budget = VMA_BUDGET.min(max_map_count.saturating_sub((max_map_count / 10).max(4096)));
    (budget / VMAS_PER_RUN).max(16)
}

/// One VPAGETABLE mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub len: u64,
    /// Page-table offset of `start` (`vk_mmap`'s `off`).
    pub off: u64,
    /// The master PDE (`MADV_SETMAP`).
    pub master: u64,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Why a page is mapped `PROT_NONE`: the walk that failed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Poison {
    pub si_code: i32,
    pub pgex: u64,
}

/// Mutable per-process state, under the process's `mm` lock.
#[derive(Debug, Default)]
pub struct MmState {
    pub windows: BTreeMap<u64, Window>,
    pub poisoned: HashMap<u64, Poison>,
    /// Installed runs: start → (length, install sequence number).
    installed: BTreeMap<u64, (u64, u64)>,
    /// Install order, oldest first; entries whose sequence number no longer
    /// matches `installed` are stale and skipped.
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// VMAs this process's installs are counted for in `host_vmas`.
    pub counted_vmas: u64,
    /// The resolver's fault count already added to the counters.
    pub resolved_seen: u64,
}

impl MmState {
    /// The window containing `page`, if any.
    pub fn window_at(&self, page: u64) -> Option<Window> {
        self.windows
            .range(..=page)
            .next_back()
            .map(|(_, w)| *w)
            .filter(|w| page < w.end())
    }

    /// The pieces of windows inside `[s, e)`.
    pub fn pieces(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        self.windows
            .values()
            .filter(|w| w.start < e && s < w.end())
            .map(|w| (w.start.max(s), w.end().min(e)))
            .collect()
    }

    /// Whether `page` lies in an installed run.
    pub fn is_installed(&self, page: u64) -> bool {
        self.installed
            .range(..=page)
            .next_back()
            .is_some_and(|(&k, &(l, _))| page < k + l)
    }

    /// Installed runs.
    pub fn runs(&self) -> usize {
        self.installed.len()
    }

    /// Remove windows (or their parts) in `[s, e)`, cutting those that
    /// straddle it, and the poison marks there: the range was unmapped or
    /// replaced.
    pub fn forget_range(&mut self, s: u64, e: u64) {
        let hit: Vec<Window> = self
            .windows
            .values()
            .filter(|w| w.start < e && s < w.end())
            .copied()
            .collect();
        for w in hit {
            self.windows.remove(&w.start);
            if w.start < s {
                let left = Window {
                    len: s - w.start,
                    ..w
                };
                self.windows.insert(w.start, left);
            }
            if w.end() > e {
                let right = Window {
                    start: e,
                    len: w.end() - e,
                    off: w.off + (e - w.start),
                    master: w.master,
                };
                self.windows.insert(e, right);
            }
        }
        self.poisoned.retain(|&page, _| page < s || page >= e);
    }

    /// Note an installed run `[va, va + len)` for the VMA budget; runs it
    /// wholly replaces are gone.
    pub fn record_install(&mut self, va: u64, len: u64) {
        self.remove_runs_inside(va, va.saturating_add(len));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.installed.insert(va, (len, seq));
        self.order.push_back((va, seq));
    }

    /// Forget the installed runs wholly inside `[s, e)`.
    fn remove_runs_inside(&mut self, s: u64, e: u64) {
        let inside: Vec<u64> = self
            .installed
            .range(s..e)
            .filter(|&(&k, &(l, _))| k + l <= e)
            .map(|(&k, _)| k)
            .collect();
        for k in inside {
            self.installed.remove(&k);
        }
    }

    /// Take up to `count` of the least recently installed runs out of the
    /// books, oldest first; the caller maps fresh memory over them.
    pub fn take_oldest(&mut self, count: u64) -> Vec<(u64, u64)> {
        let mut victims = Vec::new();
        while (victims.len() as u64) < count {
            let Some((va, seq)) = self.order.pop_front() else {
                break;
            };
            if let Some(&(len, s)) = self.installed.get(&va)
                && s == seq
            {
                self.installed.remove(&va);
                victims.push((va, len));
            }
        }
        victims
    }

    /// How many runs to evict before one more install, for a budget of
    /// `max_runs` runs: an eighth of the budget once it is reached.
    pub fn room_needed(&self, max_runs: u64) -> u64 {
        if self.installed.len() as u64 >= max_runs {
            (max_runs / 8).max(1)
        } else {
            0
        }
    }

    /// The span of `[s, e)` that holds installed or poisoned pages (what a
    /// drop of translations must cover), if any.
    pub fn translated_span(&self, s: u64, e: u64) -> Option<(u64, u64)> {
        let before = self
            .installed
            .range(..s)
            .next_back()
            .filter(|&(&k, &(l, _))| k + l > s)
            .map(|(&k, &(l, _))| (k, k + l));
        let runs = self.installed.range(s..e).map(|(&k, &(l, _))| (k, k + l));
        let poisoned = self
            .poisoned
            .keys()
            .filter(|&&pg| s <= pg && pg < e)
            .map(|&pg| (pg, pg + PAGE));
        let (lo, hi) = before
            .into_iter()
            .chain(runs)
            .chain(poisoned)
            .reduce(|(lo, hi), (a, b)| (lo.min(a), hi.max(b)))?;
        Some((lo.max(s), hi.min(e)))
    }

    /// `[s, e)` was dropped: forget its poison marks and the installed runs
    /// inside it; a run that straddles an end keeps only its part outside
    /// (the drop replaced the rest: left in the books, those pages would
    /// count as installed, so a later fault there installed a run over part
    /// of another, and the older run's eviction dropped the newer pages).
    pub fn forget_translations(&mut self, s: u64, e: u64) {
        self.poisoned.retain(|&page, _| page < s || page >= e);
        self.remove_runs_inside(s, e);
        let straddling: Vec<(u64, u64, u64)> = self
            .installed
            .range(..e)
            .rev()
            .take_while(|&(&k, &(l, _))| k + l > s || k >= s)
            .filter(|&(&k, &(l, _))| k < e && s < k + l)
            .map(|(&k, &(l, q))| (k, l, q))
            .collect();
        for (k, l, seq) in straddling {
            self.installed.remove(&k);
            if k < s {
                self.installed.insert(k, (s - k, seq));
            }
            if k + l > e {
                self.installed.insert(e, (k + l - e, seq));
                // Its age is the run's: evicted right after its left part.
                let at = self.order.partition_point(|&(_, q)| q <= seq);
                self.order.insert(at, (e, seq));
            }
        }
        if self.installed.is_empty() {
            self.order.clear();
        }
    }

    /// Forget every installed run (the process is gone).
    pub fn clear_installed(&mut self) {
        self.installed.clear();
        self.order.clear();
    }

    /// The VMAs the installed runs may cost (an upper bound).
    pub fn vmas(&self) -> u64 {
        self.installed.len() as u64 * VMAS_PER_RUN
    }

    /// The uninstalled stretch around `page` within `[start, end)`: the
    /// part of a prefault run that needs installing (neighbours already
    /// installed stay as they are, or each fault would cost a run).
    pub fn uninstalled_around(&self, page: u64, start: u64, end: u64) -> (u64, u64) {
        let mut lo = page;
        while lo > start && !self.is_installed(lo - PAGE) {
            lo -= PAGE;
        }
        let mut hi = page + PAGE;
        while hi < end && !self.is_installed(hi) {
            hi += PAGE;
        }
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(start: u64, pages: u64, off: u64) -> Window {
        Window {
            start,
            len: pages * PAGE,
            off,
            master: 7,
        }
    }

    #[test]
    fn budget_leaves_room_for_the_guest() {
        // This machine: 65530 - 6553 = 58977 VMAs, two per run.
        assert_eq!(max_runs(65530), 29_488);
        // A tenth of the limit, at least 4096, stays free.
        assert_eq!(max_runs(20_000), (20_000 - 4096) / 2);
        assert_eq!(max_runs(0), 16);
    }

    #[test]
    fn cutting_a_window_keeps_both_ends_and_their_offsets() {
        let mut mm = MmState::default();
        mm.windows.insert(0x10000, window(0x10000, 8, 0x40000));
        mm.poisoned.insert(
            0x12000,
            Poison {
                si_code: 1,
                pgex: 4,
            },
        );
        mm.poisoned.insert(
            0x16000,
            Poison {
                si_code: 1,
                pgex: 4,
            },
        );
        mm.forget_range(0x12000, 0x14000);
        assert_eq!(mm.window_at(0x10000), Some(window(0x10000, 2, 0x40000)));
        assert_eq!(mm.window_at(0x12000), None);
        assert_eq!(mm.window_at(0x13fff), None);
        assert_eq!(mm.window_at(0x14000), Some(window(0x14000, 4, 0x44000)));
        assert!(!mm.poisoned.contains_key(&0x12000));
        assert!(mm.poisoned.contains_key(&0x16000));
        assert_eq!(
            mm.pieces(0x11000, 0x15000),
            [(0x11000, 0x12000), (0x14000, 0x15000)]
        );
    }

    #[test]
    fn the_oldest_runs_are_evicted_first_and_replaced_runs_are_skipped() {
        let mut mm = MmState::default();
        mm.record_install(0x1000, PAGE);
        mm.record_install(0x5000, PAGE);
        mm.record_install(0x9000, PAGE);
        // Re-installing 0x1000 makes it the newest.
        mm.record_install(0x1000, PAGE);
        assert_eq!(mm.runs(), 3);
        assert_eq!(mm.take_oldest(2), [(0x5000, PAGE), (0x9000, PAGE)]);
        assert_eq!(mm.take_oldest(5), [(0x1000, PAGE)]);
        assert_eq!(mm.runs(), 0);
        assert_eq!(mm.room_needed(16), 0);
        for i in 0..16 {
            mm.record_install(i * 0x10000, PAGE);
        }
        assert_eq!(mm.room_needed(16), 2);
    }

    #[test]
    fn a_run_replaces_the_runs_inside_it() {
        let mut mm = MmState::default();
        mm.record_install(0x2000, PAGE);
        mm.record_install(0x3000, 2 * PAGE);
        mm.record_install(0x1000, 8 * PAGE);
        assert_eq!(mm.runs(), 1);
        assert!(mm.is_installed(0x8000));
        assert!(!mm.is_installed(0x9000));
        assert_eq!(mm.uninstalled_around(0xa000, 0, 0x10000), (0x9000, 0x10000));
    }

    #[test]
    fn translated_span_covers_runs_and_poison() {
        let mut mm = MmState::default();
        assert_eq!(mm.translated_span(0, 0x10000), None);
        mm.record_install(0x1000, 4 * PAGE);
        mm.poisoned.insert(
            0x8000,
            Poison {
                si_code: 2,
                pgex: 7,
            },
        );
        // A run that starts before the range counts from the range's start.
        assert_eq!(mm.translated_span(0x3000, 0x10000), Some((0x3000, 0x9000)));
        mm.forget_translations(0x1000, 0x9000);
        assert_eq!(mm.translated_span(0, 0x10000), None);
        assert_eq!(mm.vmas(), 0);
    }

    /// The books against a naive model: a map of every installed page to
    /// the sequence number of its install. Eviction takes the oldest runs
    /// (whole), and a page is installed exactly when the model says so.
    #[derive(Debug, Clone)]
    enum Op {
        Install { page: u64, pages: u64 },
        Evict { count: u64 },
        Drop { page: u64, pages: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64, 1u64..6).prop_map(|(page, pages)| Op::Install { page, pages }),
            (1u64..4).prop_map(|count| Op::Evict { count }),
            (0u64..64, 1u64..16).prop_map(|(page, pages)| Op::Drop { page, pages }),
        ]
    }

    proptest! {
        #[test]
        fn books_match_a_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut mm = MmState::default();
            // Runs as the model keeps them: (start, pages, seq), live only.
            let mut model: Vec<(u64, u64, u64)> = Vec::new();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Install { page, pages } => {
                        let (s, e) = (page, page + pages);
                        // The resolver never installs over part of a run:
                        // only over uninstalled pages or whole runs.
                        if model.iter().any(|&(a, n, _)| a < e && s < a + n && (a < s || a + n > e)) {
                            continue;
                        }
                        model.retain(|&(a, n, _)| !(s <= a && a + n <= e));
                        model.push((s, pages, seq));
                        seq += 1;
                        mm.record_install(s * PAGE, pages * PAGE);
                    }
                    Op::Evict { count } => {
                        model.sort_by_key(|&(_, _, q)| q);
                        let gone: Vec<(u64, u64)> = model
                            .iter()
                            .take(count as usize)
                            .map(|&(a, n, _)| (a * PAGE, n * PAGE))
                            .collect();
                        model.drain(..gone.len());
                        prop_assert_eq!(mm.take_oldest(count), gone);
                    }
                    Op::Drop { page, pages } => {
                        let (s, e) = (page, page + pages);
                        // Runs lose their pages in [s, e): what is left of
                        // each on either side stays, with its age.
                        let mut left = Vec::new();
                        for &(a, n, q) in &model {
                            if a < s {
                                left.push((a, n.min(s - a), q));
                            }
                            if a + n > e {
                                let b = a.max(e);
                                left.push((b, a + n - b, q));
                            }
                        }
                        model = left;
                        mm.forget_translations(s * PAGE, e * PAGE);
                    }
                }
                prop_assert_eq!(mm.runs(), model.len());
                for pg in 0..80 {
                    let want = model.iter().any(|&(a, n, _)| a <= pg && pg < a + n);
                    prop_assert_eq!(mm.is_installed(pg * PAGE), want, "page {}", pg);
                }
            }
        }
    }
}
