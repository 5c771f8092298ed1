//! The prefault query (ABI section 3, "Prefault"): which neighbours of a
//! translated page the host may install before they are touched, without
//! making A and M inexact.

use core::ops::Range;

use vkabi::{PAGE_SIZE, VPTE_A, VPTE_M, VPTE_RW, VPTE_V};

use crate::addr::{GuestPhysAddr, PageIndex};
use crate::entry::{Level, Vpte};
use crate::mem::PhysMem;
use crate::walk::Translation;

/// A run of contiguous pages that may be installed together, all with the
/// same protection as the faulting page: page `first + k` (for `k < count`)
/// maps to `first_pa + k * 4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefaultRun {
    /// The first page index of the run.
    pub first: PageIndex,
    /// Number of pages; 0 only when the query's window or limit excluded the
    /// faulting page itself.
    pub count: u64,
    /// The RAM page of `first`.
    pub first_pa: GuestPhysAddr,
    /// Install writable (as the faulting page).
    pub writable: bool,
    /// Install executable (as the faulting page).
    pub executable: bool,
}

impl PrefaultRun {
    /// Whether `pindex` is in the run.
    pub fn contains(&self, pindex: PageIndex) -> bool {
        pindex.0 >= self.first.0 && pindex.0 - self.first.0 < self.count
    }

    /// The RAM page of `pindex`, if it is in the run.
    pub fn pa_of(&self, pindex: PageIndex) -> Option<GuestPhysAddr> {
        self.contains(pindex)
            .then(|| GuestPhysAddr(self.first_pa.0 + (pindex.0 - self.first.0) * PAGE_SIZE))
    }
}

/// The contiguous run of pages around `t.pindex`, inside `window` (the page
/// indexes the caller's mapping covers) and at most `max_pages` long, that may
/// be installed now with `t`'s protection. Reads entries, never writes.
///
/// `t` must come from [`walk`](crate::walk) over the same `mem` and
/// `ram_size`. The run always holds `t.pindex` (unless `window` does not, or
/// `max_pages` is 0: then it is empty). It grows forward first, then backward,
/// and stops at the first page that does not qualify:
///
/// - **L1 leaf**: the neighbour must be an entry of the same L1 table that is
///   V and already has A (and RW and M when `t.writable`; no NX when
///   `t.executable`), whose frame continues `t.pa` contiguously and lies
///   inside RAM. The levels above are shared with `t`, whose walk set their A
///   (and M) and checked their RW/NX.
/// - **superpage** (PS at L2, L3, L4 or the master): every page inside the
///   leaf's region shares the leaf entry, whose A (and M, when writable) this
///   walk set; the run is the part of the region inside RAM.
///
/// An entry the guest changes after this query is the guest's to invalidate
/// (`MADV_INVAL`, ABI section 5), as for any installed translation. A memory
/// error while reading a neighbour ends the run there.
pub fn prefault_run<M: PhysMem + ?Sized>(
    mem: &M,
    t: &Translation,
    window: Range<PageIndex>,
    max_pages: u64,
    ram_size: u64,
) -> PrefaultRun {
    let empty = PrefaultRun {
        first: t.pindex,
        count: 0,
        first_pa: t.pa,
        writable: t.writable,
        executable: t.executable,
    };
    if !window.contains(&t.pindex) || max_pages == 0 {
        return empty;
    }
    let region_first = t.first_pindex().0;
    let region_end = region_first.saturating_add(t.pages());
    let lo = region_first.max(window.start.0);
    let hi = region_end.min(window.end.0);
    // Pages available after and before the faulting page, by position alone.
    let after_room = hi.saturating_sub(t.pindex.0).saturating_sub(1);
    let before_room = t.pindex.0.saturating_sub(lo);
    let budget = max_pages - 1;

    let (after, before) = if t.level() == Level::L1 {
        let ok = |p: u64| neighbour_qualifies(mem, t, PageIndex(p), ram_size);
        let after = (1..=after_room.min(budget))
            .take_while(|&k| ok(t.pindex.0 + k))
            .count() as u64;
        let before = (1..=before_room.min(budget - after))
            .take_while(|&k| ok(t.pindex.0 - k))
            .count() as u64;
        (after, before)
    } else {
        // Pages of the superpage still inside RAM after t.pa (t.pa itself is).
        let ram_after = (ram_size.saturating_sub(t.pa.0) / PAGE_SIZE).saturating_sub(1);
        let after = after_room.min(budget).min(ram_after);
        let before = before_room.min(budget - after);
        (after, before)
    };
    PrefaultRun {
        first: PageIndex(t.pindex.0 - before),
        count: before + 1 + after,
        first_pa: GuestPhysAddr(t.pa.0 - before * PAGE_SIZE),
        ..empty
    }
}

/// Whether the L1 entry for `p` (a neighbour of `t.pindex` in the same L1
/// table) may be installed with `t`'s protection.
fn neighbour_qualifies<M: PhysMem + ?Sized>(
    mem: &M,
    t: &Translation,
    p: PageIndex,
    ram_size: u64,
) -> bool {
    let Some(leaf_pa) = t.leaf.entry_pa else {
        return false;
    };
    let table = leaf_pa.0 & !(PAGE_SIZE - 1);
    let entry_pa = GuestPhysAddr(table + 8 * Level::L1.index(p) as u64);
    let Ok(raw) = mem.load(entry_pa) else {
        return false;
    };
    let e = Vpte(raw);
    let mut need = VPTE_V | VPTE_A;
    if t.writable {
        need |= VPTE_RW | VPTE_M;
    }
    if !e.has(need) || (t.executable && e.is_no_exec()) {
        return false;
    }
    // Contiguous with the faulting page: frame == t.pa + (p - t.pindex) pages.
    let expected = if p.0 >= t.pindex.0 {
        (p.0 - t.pindex.0)
            .checked_mul(PAGE_SIZE)
            .and_then(|d| t.pa.0.checked_add(d))
    } else {
        (t.pindex.0 - p.0)
            .checked_mul(PAGE_SIZE)
            .and_then(|d| t.pa.0.checked_sub(d))
    };
    expected == Some(e.frame().0) && e.frame().page_in_ram(ram_size)
}
