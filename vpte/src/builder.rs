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
