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
    if t.writable && !t.leaf.entry.is_modified() {
        // A write through a master leaf, which never gets M: only the
        // faulting page itself may be installed writable.
        return PrefaultRun { count: 1, ..empty };
    }
    // Where neighbours may come from: the superpage itself, or for an L1 leaf
    // the 512 pages of its L1 table (the region of the L2 entry above it).
    let region = if t.level() == Level::L1 {
        Level::L2
    } else {
        t.level()
    };
    let region_first = region.region_start(t.pindex).0;
    let region_end = region_first.saturating_add(region.pages());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{FrameAllocator, PageSize, PageTableBuilder};
    use crate::mem::AtomicRam;
    use crate::reference::CountingMem;
    use crate::walk::{Access, walk};
    use vkabi::{VPTE_NX, VPTE_PS};

    const RAM: u64 = 64 * 4096;
    /// Page 500 of an L1 table (so the table ends 12 pages later).
    const BASE: PageIndex = PageIndex((1 << 27) | 500);

    /// Pages `BASE + k` for `k < bits.len()` mapped to RAM page `32 + k` with
    /// `bits[k]`.
    fn mapped(bits: &[u64]) -> (AtomicRam, Vpte) {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(16 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("room");
        for (k, &bits) in bits.iter().enumerate() {
            let frame = GuestPhysAddr((32 + k as u64) * 4096);
            b.map_page(PageIndex(BASE.0 + k as u64), frame, bits)
                .expect("maps");
        }
        let master = b.master();
        (ram, master)
    }

    fn run(ram: &AtomicRam, master: Vpte, k: u64, access: Access, max: u64) -> PrefaultRun {
        let mem = CountingMem::new(ram);
        let t = walk(&mem, master, PageIndex(BASE.0 + k), access, RAM).expect("walks");
        mem.reset();
        let r = prefault_run(&mem, &t, PageIndex(0)..PageIndex(u64::MAX), max, RAM);
        assert!(mem.cas().is_empty(), "the query writes nothing");
        r
    }

    const ARW: u64 = VPTE_A | VPTE_RW;
    const ARWM: u64 = VPTE_A | VPTE_RW | VPTE_M;

    #[test]
    fn accessed_contiguous_neighbours_form_the_run() {
        let (ram, master) = mapped(&[ARW; 8]);
        let r = run(&ram, master, 2, Access::Read, 16);
        assert_eq!((r.first, r.count), (BASE, 8));
        assert_eq!(r.first_pa, GuestPhysAddr(32 * 4096));
        assert_eq!(
            r.pa_of(PageIndex(BASE.0 + 5)),
            Some(GuestPhysAddr(37 * 4096))
        );
        assert!(!r.writable && r.executable);
        // Forward first, then backward, within the limit.
        let r = run(&ram, master, 2, Access::Read, 4);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 2), 4));
        let r = run(&ram, master, 6, Access::Read, 4);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 4), 4));
    }

    #[test]
    fn a_neighbour_without_a_ends_the_run() {
        let (ram, master) = mapped(&[ARW, ARW, VPTE_RW, ARW, ARW, VPTE_RW, ARW]);
        let r = run(&ram, master, 3, Access::Read, 16);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 3), 2));
    }

    #[test]
    fn a_writable_run_needs_m_on_every_page() {
        let (ram, master) = mapped(&[ARWM, ARW, ARWM, ARWM, ARWM]);
        let r = run(&ram, master, 3, Access::Write, 16);
        assert!(r.writable);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 2), 3));
        // A read of a page without M installs read-only: M is not needed.
        let (ram, master) = mapped(&[ARWM, ARW, ARWM, VPTE_A, ARWM]);
        let r = run(&ram, master, 1, Access::Read, 16);
        assert!(!r.writable);
        assert_eq!((r.first, r.count), (BASE, 5));
    }

    #[test]
    fn nx_neighbours_end_an_executable_run() {
        let (ram, master) = mapped(&[ARW | VPTE_NX, ARW, ARW, ARW | VPTE_NX]);
        let r = run(&ram, master, 1, Access::Execute, 16);
        assert!(r.executable);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 1), 2));
        let r = run(&ram, master, 0, Access::Read, 16);
        assert!(!r.executable);
        assert_eq!((r.first, r.count), (BASE, 4));
    }

    #[test]
    fn non_contiguous_frames_and_invalid_entries_end_the_run() {
        let (ram, master) = mapped(&[ARW; 6]);
        let alloc = FrameAllocator::new(GuestPhysAddr(60 * 4096)..GuestPhysAddr(RAM));
        let mut b = PageTableBuilder::with_root(&ram, alloc, master.frame());
        b.map_page(PageIndex(BASE.0 + 4), GuestPhysAddr(60 * 4096), ARW)
            .expect("remaps");
        b.unmap(PageIndex(BASE.0 + 1)).expect("unmaps");
        let r = run(&ram, master, 2, Access::Read, 16);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 2), 2));
    }

    #[test]
    fn the_run_stays_in_the_l1_table_the_window_and_ram() {
        // Pages 500..524 cross into the next L1 table at 512.
        let (ram, master) = mapped(&[ARW; 24]);
        let r = run(&ram, master, 5, Access::Read, 64);
        assert_eq!((r.first, r.count), (BASE, 12));
        let t = walk(&ram, master, PageIndex(BASE.0 + 5), Access::Read, RAM).expect("walks");
        let window = PageIndex(BASE.0 + 3)..PageIndex(BASE.0 + 7);
        let r = prefault_run(&ram, &t, window, 64, RAM);
        assert_eq!((r.first, r.count), (PageIndex(BASE.0 + 3), 4));
        let window = PageIndex(0)..PageIndex(BASE.0 + 5);
        assert_eq!(prefault_run(&ram, &t, window, 64, RAM).count, 0);
        let all = PageIndex(0)..PageIndex(u64::MAX);
        assert_eq!(prefault_run(&ram, &t, all.clone(), 0, RAM).count, 0);
        assert_eq!(prefault_run(&ram, &t, all.clone(), 1, RAM).count, 1);
        // Frames beyond a smaller RAM end the run.
        let r = prefault_run(&ram, &t, all, 64, 40 * 4096);
        assert_eq!((r.first, r.count), (BASE, 8));
    }

    #[test]
    fn a_superpage_run_covers_the_superpage_inside_ram() {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(16 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("room");
        let first = PageIndex(3 << 9);
        b.map(first, GuestPhysAddr(0), PageSize::Size2M, VPTE_RW)
            .expect("maps");
        let mem = CountingMem::new(&ram);
        let t = walk(
            &mem,
            b.master(),
            PageIndex(first.0 + 10),
            Access::Write,
            RAM,
        )
        .expect("w");
        mem.reset();
        let all = PageIndex(0)..PageIndex(u64::MAX);
        let r = prefault_run(&mem, &t, all.clone(), 1000, RAM);
        assert!(mem.loads().is_empty() && mem.cas().is_empty());
        assert_eq!(
            (r.first, r.count, r.first_pa),
            (first, 64, GuestPhysAddr(0))
        );
        assert!(r.writable);
        let r = prefault_run(&ram, &t, all, 16, RAM);
        assert_eq!((r.first, r.count), (PageIndex(first.0 + 10), 16));
        // A linear master: bounded by the limit, not by the 2^36-page region.
        let linear = Vpte::leaf(GuestPhysAddr(0), VPTE_PS | VPTE_RW);
        let t = walk(&ram, linear, PageIndex(7), Access::Read, RAM).expect("linear");
        let r = prefault_run(&ram, &t, PageIndex(0)..PageIndex(u64::MAX), u64::MAX, RAM);
        assert_eq!((r.first, r.count), (PageIndex(0), 64));
    }
}
