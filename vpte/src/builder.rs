//! Building page tables in guest RAM: a [`FrameAllocator`] for table pages and
//! a [`PageTableBuilder`] that maps 4 KiB pages and 2 MiB / 1 GiB superpages,
//! unmaps them and changes their protection. For guests and tests.

use core::fmt;
use core::ops::Range;

use vkabi::{PAGE_SIZE, VPTE_ENTRIES, VPTE_FRAME, VPTE_NX, VPTE_PS, VPTE_RW, VPTE_U, VPTE_V};

use crate::addr::{GuestPhysAddr, PageIndex};
use crate::entry::{Level, Vpte};
use crate::mem::{PhysMem, PhysMemError};

/// Why a builder operation failed. Nothing is changed by a failed operation,
/// except that tables created on the way down stay (empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The frame allocator has no page left for a table.
    #[error("out of frames for page tables")]
    OutOfFrames,
    /// The page index is not aligned to the page size asked for.
    #[error("{pindex} is not aligned to a {size} page")]
    Misaligned {
        /// The page index.
        pindex: PageIndex,
        /// The size asked for.
        size: PageSize,
    },
    /// The frame is not page aligned.
    #[error("frame {frame} is not page aligned")]
    FrameMisaligned {
        /// The frame.
        frame: GuestPhysAddr,
    },
    /// The entry bits include frame bits, V or PS (the builder sets those), or,
    /// for [`PageTableBuilder::protect`], anything but RW, U and NX.
    #[error("entry bits {bits:#x} are not allowed here")]
    BadBits {
        /// The bits given.
        bits: u64,
    },
    /// The mapping would overlap one of another size: a superpage already
    /// covers the page, or a table already exists where a superpage was asked.
    #[error("{pindex}: conflicts with the {level} entry {entry}")]
    Conflict {
        /// The page index asked for.
        pindex: PageIndex,
        /// The level of the entry in the way.
        level: Level,
        /// The entry in the way.
        entry: Vpte,
    },
    /// The memory refused an access (a table outside it).
    #[error("memory: {0}")]
    Memory(#[from] PhysMemError),
}

/// The sizes of page the builder maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB, an L1 entry.
    Size4K,
    /// 2 MiB, an L2 entry with PS.
    Size2M,
    /// 1 GiB, an L3 entry with PS.
    Size1G,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// The level whose entry maps a page of this size.
    pub const fn level(self) -> Level {
        match self {
            PageSize::Size4K => Level::L1,
            PageSize::Size2M => Level::L2,
            PageSize::Size1G => Level::L3,
        }
    }

    /// Number of 4 KiB pages.
    pub const fn pages(self) -> u64 {
        self.level().pages()
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level().reach())
    }
}

/// A leaf found by the builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The first page index the leaf covers.
    pub first: PageIndex,
    /// The leaf's level ([`Level::L1`] for a 4 KiB page).
    pub level: Level,
    /// The leaf's value.
    pub entry: Vpte,
    /// Where the leaf lives.
    pub entry_pa: GuestPhysAddr,
}

impl Mapping {
    /// The RAM page the leaf maps `pindex` to (not checked against RAM),
    /// `None` if the leaf does not cover `pindex`.
    pub fn pa_of(&self, pindex: PageIndex) -> Option<GuestPhysAddr> {
        let k = pindex.0.checked_sub(self.first.0)?;
        (k < self.level.pages()).then(|| GuestPhysAddr(self.entry.frame().0 + k * PAGE_SIZE))
    }
}

/// A simple allocator of 4 KiB frames of guest RAM: a bump pointer over a
/// range plus a free list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameAllocator {
    next: u64,
    end: u64,
    free: Vec<GuestPhysAddr>,
}

impl FrameAllocator {
    /// An allocator of the whole pages inside `range`.
    pub fn new(range: Range<GuestPhysAddr>) -> FrameAllocator {
        let next = range.start.0.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        let end = range.end.0 & !(PAGE_SIZE - 1);
        FrameAllocator {
            next,
            end: end.max(next),
            free: Vec::new(),
        }
    }

    /// One frame, or `None` when none is left.
    pub fn alloc(&mut self) -> Option<GuestPhysAddr> {
        if let Some(pa) = self.free.pop() {
            return Some(pa);
        }
        self.alloc_aligned(1, 1)
    }

    /// `pages` contiguous frames whose first frame is aligned to `align_pages`
    /// pages (e.g. 512 for a 2 MiB superpage), taken from the never-used part
    /// of the range; frames skipped for alignment go to the free list.
    pub fn alloc_aligned(&mut self, pages: u64, align_pages: u64) -> Option<GuestPhysAddr> {
        let align = align_pages.max(1).checked_mul(PAGE_SIZE)?;
        let start = self.next.div_ceil(align).checked_mul(align)?;
        let end = start.checked_add(pages.checked_mul(PAGE_SIZE)?)?;
        if end > self.end || pages == 0 {
            return None;
        }
        self.free.extend(
            (self.next..start)
                .step_by(PAGE_SIZE as usize)
                .map(GuestPhysAddr),
        );
        self.next = end;
        Some(GuestPhysAddr(start))
    }

    /// Give a frame back.
    pub fn free(&mut self, frame: GuestPhysAddr) {
        self.free.push(frame);
    }

    /// Frames left.
    pub fn remaining(&self) -> u64 {
        (self.end - self.next) / PAGE_SIZE + self.free.len() as u64
    }
}

/// Builds page tables in guest RAM through a [`PhysMem`], rooted at an L4
/// table it allocates; [`PageTableBuilder::master`] is the master PDE to pass
/// to `MADV_SETMAP` (or to [`walk`](crate::walk)).
///
/// Table entries are `V|RW|U` without NX, so the leaf alone decides the
/// protection. Tables are never freed. Updates of existing leaves are
/// compare-and-swap loops, so A/M bits that a concurrent walker sets are not
/// lost; new entries are plain stores of whole 64-bit words.
#[derive(Debug)]
pub struct PageTableBuilder<M> {
    mem: M,
    alloc: FrameAllocator,
    root: GuestPhysAddr,
}

impl<M: PhysMem> PageTableBuilder<M> {
    /// A builder with a new, empty L4 table taken from `alloc`.
    pub fn new(mem: M, mut alloc: FrameAllocator) -> Result<Self, BuildError> {
        let root = alloc.alloc().ok_or(BuildError::OutOfFrames)?;
        zero_page(&mem, root)?;
        Ok(PageTableBuilder { mem, alloc, root })
    }

    /// A builder over an existing L4 table at `root`.
    pub fn with_root(mem: M, alloc: FrameAllocator, root: GuestPhysAddr) -> Self {
        PageTableBuilder { mem, alloc, root }
    }

    /// The master PDE: `V|RW|U` pointing at the L4 table.
    pub fn master(&self) -> Vpte {
        Vpte::table(self.root)
    }

    /// The L4 table.
    pub fn root(&self) -> GuestPhysAddr {
        self.root
    }

    /// The memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// The frame allocator (e.g. to take data frames from it).
    pub fn allocator(&mut self) -> &mut FrameAllocator {
        &mut self.alloc
    }

    /// Give back the memory and the allocator.
    pub fn into_parts(self) -> (M, FrameAllocator) {
        (self.mem, self.alloc)
    }

    /// Map the 4 KiB page `pindex` to `frame` with the extra entry `bits`
    /// (RW, U, NX, A, M, G, ...). See [`PageTableBuilder::map`].
    pub fn map_page(
        &mut self,
        pindex: PageIndex,
        frame: GuestPhysAddr,
        bits: u64,
    ) -> Result<Option<Mapping>, BuildError> {
        self.map(pindex, frame, PageSize::Size4K, bits)
    }

    /// Map the page of `size` starting at `pindex` (aligned to `size`) to
    /// `frame` (page aligned; a superpage frame need not be aligned to the
    /// superpage: the walker adds the offset inside the superpage to it),
    /// with V, PS for a superpage, and the extra entry `bits`. Creates the
    /// tables on the way. A leaf of the same size already there is replaced
    /// and returned.
    ///
    /// Fails with [`BuildError::Conflict`] if a superpage covers `pindex`
    /// above `size`'s level, or if a table exists where a superpage is asked.
    pub fn map(
        &mut self,
        pindex: PageIndex,
        frame: GuestPhysAddr,
        size: PageSize,
        bits: u64,
    ) -> Result<Option<Mapping>, BuildError> {
        if bits & (VPTE_FRAME | VPTE_V | VPTE_PS) != 0 {
            return Err(BuildError::BadBits { bits });
        }
        if !frame.is_page_aligned() || frame.0 & !VPTE_FRAME != 0 {
            return Err(BuildError::FrameMisaligned { frame });
        }
        let level = size.level();
        if !pindex.0.is_multiple_of(size.pages()) {
            return Err(BuildError::Misaligned { pindex, size });
        }
        let entry_pa = self.entry_for(pindex, level)?;
        let ps = if level == Level::L1 { 0 } else { VPTE_PS };
        let new = Vpte::leaf(frame, bits | ps);
        let old = Vpte(self.mem.load(entry_pa)?);
        if old.is_valid() && !old.is_superpage() && level != Level::L1 {
            return Err(BuildError::Conflict {
                pindex,
                level,
                entry: old,
            });
        }
        let old = Vpte(self.update(entry_pa, |_| new.0)?);
        Ok(old.is_valid().then_some(Mapping {
            first: pindex,
            level,
            entry: old,
            entry_pa,
        }))
    }

    /// Remove the leaf that covers `pindex` (the whole superpage if it is
    /// one; the entry becomes 0) and return it; `Ok(None)` if nothing maps
    /// `pindex`.
    pub fn unmap(&mut self, pindex: PageIndex) -> Result<Option<Mapping>, BuildError> {
        let Some(found) = self.lookup(pindex)? else {
            return Ok(None);
        };
        let old = Vpte(self.update(found.entry_pa, |_| 0)?);
        Ok(Some(Mapping {
            entry: old,
            ..found
        }))
    }

    /// Set the protection bits (RW, U, NX; `prot` may hold only those) of the
    /// leaf that covers `pindex`, keeping its frame, A, M and other bits, and
    /// return it as it was; `Ok(None)` if nothing maps `pindex`.
    ///
    /// Remember that the host may keep a translation made before a downgrade
    /// until `MADV_INVAL` covers it (ABI section 5).
    pub fn protect(&mut self, pindex: PageIndex, prot: u64) -> Result<Option<Mapping>, BuildError> {
        const PROT: u64 = VPTE_RW | VPTE_U | VPTE_NX;
        if prot & !PROT != 0 {
            return Err(BuildError::BadBits { bits: prot });
        }
        let Some(found) = self.lookup(pindex)? else {
            return Ok(None);
        };
        let old = Vpte(self.update(found.entry_pa, |v| (v & !PROT) | prot)?);
        Ok(Some(Mapping {
            entry: old,
            ..found
        }))
    }

    /// The leaf that covers `pindex`, found by following V entries from the
    /// L4 table down to a PS entry or an L1 entry; `Ok(None)` if an entry on
    /// the way (or the leaf) is not valid. Reads only; sets no A/M.
    pub fn lookup(&self, pindex: PageIndex) -> Result<Option<Mapping>, BuildError> {
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            let entry_pa = entry_pa(table, level, pindex);
            let entry = Vpte(self.mem.load(entry_pa)?);
            if !entry.is_valid() {
                return Ok(None);
            }
            match level.below() {
                Some(next) if !entry.is_superpage() => {
                    table = entry.frame();
                    level = next;
                }
                _ => {
                    return Ok(Some(Mapping {
                        first: level.region_start(pindex),
                        level,
                        entry,
                        entry_pa,
                    }));
                }
            }
        }
    }

    /// The address of the entry for `pindex` at `target`, creating tables on
    /// the way down.
    fn entry_for(&mut self, pindex: PageIndex, target: Level) -> Result<GuestPhysAddr, BuildError> {
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            let pa = entry_pa(table, level, pindex);
            if level == target {
                return Ok(pa);
            }
            let Some(next) = level.below() else {
                return Ok(pa);
            };
            let entry = Vpte(self.mem.load(pa)?);
            table = if !entry.is_valid() {
                let new = self.alloc.alloc().ok_or(BuildError::OutOfFrames)?;
                zero_page(&self.mem, new)?;
                self.mem.store(pa, Vpte::table(new).0)?;
                new
            } else if entry.is_superpage() {
                return Err(BuildError::Conflict {
                    pindex,
                    level,
                    entry,
                });
            } else {
                entry.frame()
            };
            level = next;
        }
    }

    /// Replace the word at `pa` with `f(old)` by a compare-and-swap loop;
    /// returns the old value.
    fn update(&self, pa: GuestPhysAddr, f: impl Fn(u64) -> u64) -> Result<u64, BuildError> {
        let mut old = self.mem.load(pa)?;
        loop {
            match self.mem.compare_exchange(pa, old, f(old))? {
                Ok(_) => return Ok(old),
                Err(actual) => old = actual,
            }
        }
    }
}

/// The address of the entry for `pindex` in the `level` table at `table`.
fn entry_pa(table: GuestPhysAddr, level: Level, pindex: PageIndex) -> GuestPhysAddr {
    GuestPhysAddr(table.0 + 8 * level.index(pindex) as u64)
}

/// Zero the table page at `pa`.
fn zero_page<M: PhysMem + ?Sized>(mem: &M, pa: GuestPhysAddr) -> Result<(), PhysMemError> {
    (0..VPTE_ENTRIES as u64).try_for_each(|i| mem.store(GuestPhysAddr(pa.0 + 8 * i), 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{AtomicRam, CellRam};
    use crate::walk::{Access, walk};
    use vkabi::VPTE_A;

    const RAM: u64 = 64 * 4096;

    fn builder(ram: &AtomicRam) -> PageTableBuilder<&AtomicRam> {
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(16 * 4096));
        PageTableBuilder::new(ram, alloc).expect("room")
    }

    #[test]
    fn allocator_bumps_aligns_and_reuses() {
        let mut a = FrameAllocator::new(GuestPhysAddr(100)..GuestPhysAddr(10 * 4096 + 5));
        assert_eq!(a.remaining(), 9);
        assert_eq!(a.alloc(), Some(GuestPhysAddr(4096)));
        assert_eq!(a.alloc_aligned(2, 4), Some(GuestPhysAddr(4 * 4096)));
        assert_eq!(a.remaining(), 6, "pages 2 and 3 went to the free list");
        assert_eq!(a.alloc_aligned(4, 4), None);
        assert_eq!(a.alloc(), Some(GuestPhysAddr(3 * 4096)));
        a.free(GuestPhysAddr(4096));
        assert_eq!(a.alloc(), Some(GuestPhysAddr(4096)));
        let taken: Vec<_> = std::iter::from_fn(|| a.alloc()).collect();
        assert_eq!(taken.len(), 5);
        assert_eq!(a.remaining(), 0);
        let mut empty = FrameAllocator::new(GuestPhysAddr(4096)..GuestPhysAddr(100));
        assert_eq!(empty.alloc(), None);
    }

    #[test]
    fn map_lookup_protect_unmap() {
        let ram = AtomicRam::new(RAM as usize);
        let mut b = builder(&ram);
        let p = PageIndex(0x1234);
        let frame = GuestPhysAddr(40 * 4096);
        assert_eq!(b.lookup(p), Ok(None));
        assert_eq!(b.map_page(p, frame, VPTE_RW), Ok(None));
        let m = b.lookup(p).expect("reads").expect("mapped");
        assert_eq!(
            (m.first, m.level, m.entry),
            (p, Level::L1, Vpte::leaf(frame, VPTE_RW))
        );
        assert_eq!(m.pa_of(p), Some(frame));
        assert_eq!(m.pa_of(PageIndex(p.0 + 1)), None);
        walk(&ram, b.master(), p, Access::Write, RAM).expect("walks");
        // Protect keeps frame, A and M.
        let old = b.protect(p, VPTE_NX).expect("reads").expect("mapped");
        assert!(old.entry.has(VPTE_RW | VPTE_A | vkabi::VPTE_M));
        let now = b.lookup(p).expect("reads").expect("mapped").entry;
        assert_eq!(now, Vpte::leaf(frame, VPTE_NX | VPTE_A | vkabi::VPTE_M));
        assert!(walk(&ram, b.master(), p, Access::Write, RAM).is_err());
        assert_eq!(
            b.protect(p, VPTE_A),
            Err(BuildError::BadBits { bits: VPTE_A })
        );
        // Replacing returns the old leaf.
        let old = b
            .map_page(p, GuestPhysAddr(41 * 4096), VPTE_RW)
            .expect("remaps");
        assert_eq!(old.map(|m| m.entry), Some(now));
        let gone = b.unmap(p).expect("reads").expect("was mapped");
        assert_eq!(gone.entry.frame(), GuestPhysAddr(41 * 4096));
        assert_eq!(b.lookup(p), Ok(None));
        assert_eq!(b.unmap(p), Ok(None));
        assert_eq!(b.protect(p, 0), Ok(None));
    }

    #[test]
    fn superpages_and_conflicts() {
        let ram = AtomicRam::new(RAM as usize);
        let mut b = builder(&ram);
        let g = PageIndex(1 << 18);
        b.map(g, GuestPhysAddr(0), PageSize::Size1G, VPTE_RW)
            .expect("maps 1G");
        let m = b
            .lookup(PageIndex(g.0 + 12345))
            .expect("reads")
            .expect("mapped");
        assert_eq!((m.first, m.level), (g, Level::L3));
        assert!(m.entry.is_superpage());
        // A 4 KiB or 2 MiB page inside the 1 GiB one conflicts.
        for size in [PageSize::Size4K, PageSize::Size2M] {
            let e = b.map(PageIndex(g.0 + 512), GuestPhysAddr(0), size, 0);
            assert!(
                matches!(
                    e,
                    Err(BuildError::Conflict {
                        level: Level::L3,
                        ..
                    })
                ),
                "{e:?}"
            );
        }
        // A 2 MiB page over an L1 table conflicts, and a 1 GiB over an L2 table.
        let two = PageIndex(2 << 18);
        b.map_page(two, GuestPhysAddr(0), 0).expect("maps");
        let e = b.map(two, GuestPhysAddr(0), PageSize::Size2M, 0);
        assert!(matches!(
            e,
            Err(BuildError::Conflict {
                level: Level::L2,
                ..
            })
        ));
        let e = b.map(two, GuestPhysAddr(0), PageSize::Size1G, 0);
        assert!(matches!(
            e,
            Err(BuildError::Conflict {
                level: Level::L3,
                ..
            })
        ));
        // Superpage over superpage of the same size replaces it.
        let old = b
            .map(g, GuestPhysAddr(4096), PageSize::Size1G, 0)
            .expect("remaps");
        assert_eq!(old.map(|m| m.level), Some(Level::L3));
        // Unmapping a superpage removes all of it.
        let gone = b
            .unmap(PageIndex(g.0 + 99))
            .expect("reads")
            .expect("mapped");
        assert_eq!(gone.first, g);
        assert_eq!(b.lookup(g), Ok(None));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let ram = AtomicRam::new(RAM as usize);
        let mut b = builder(&ram);
        let f = GuestPhysAddr(0);
        let p = PageIndex(512);
        assert!(matches!(
            b.map(PageIndex(513), f, PageSize::Size2M, 0),
            Err(BuildError::Misaligned { .. })
        ));
        assert!(matches!(
            b.map(p, GuestPhysAddr(100), PageSize::Size4K, 0),
            Err(BuildError::FrameMisaligned { .. })
        ));
        assert!(matches!(
            b.map(p, GuestPhysAddr(1 << 52), PageSize::Size4K, 0),
            Err(BuildError::FrameMisaligned { .. })
        ));
        for bits in [VPTE_V, VPTE_PS, 0x5000] {
            assert_eq!(
                b.map(p, f, PageSize::Size4K, bits),
                Err(BuildError::BadBits { bits })
            );
        }
        assert_eq!(b.lookup(p), Ok(None), "nothing changed");
    }

    #[test]
    fn running_out_of_frames_is_an_error() {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(3 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("root");
        // Root plus two tables; the L1 table does not fit.
        assert_eq!(
            b.map_page(PageIndex(0), GuestPhysAddr(0), 0),
            Err(BuildError::OutOfFrames)
        );
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(0));
        assert!(matches!(
            PageTableBuilder::new(&ram, alloc),
            Err(BuildError::OutOfFrames)
        ));
    }

    #[test]
    fn tables_in_a_byte_slice() {
        let mut bytes = vec![0xAAu8; RAM as usize];
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(8 * 4096));
        let mut b = PageTableBuilder::new(CellRam::new(&mut bytes), alloc).expect("room");
        let frame = b.allocator().alloc().expect("a data frame");
        b.map_page(PageIndex(77), frame, VPTE_RW).expect("maps");
        let t = walk(b.mem(), b.master(), PageIndex(77), Access::Read, RAM).expect("walks");
        assert_eq!(t.pa, frame);
        // Unused entries of the new tables were zeroed over the 0xAA filler.
        assert!(matches!(
            walk(b.mem(), b.master(), PageIndex(78), Access::Read, RAM),
            Err(crate::walk::WalkError::NotValid(s)) if s.level == Level::L1 && s.entry == Vpte(0)
        ));
        let master = b.master();
        drop(b);
        let root = master.frame().0 as usize;
        assert_eq!(bytes[root + 8..root + 16], [0; 8]);
    }
}
