//! The walker: resolves a page index through the master PDE and the guest's
//! tables exactly as ABI section 3 says, setting A and M as it goes.

use core::fmt;

use vkabi::{PAGE_SHIFT, PGEX_I, PGEX_P, PGEX_W, VPTE_A, VPTE_M, VPTE_NX, VPTE_RW, VPTE_V};

use crate::addr::{GuestPhysAddr, PageIndex};
use crate::entry::{Level, Vpte};
use crate::mem::{PhysMem, PhysMemError};

/// The kind of access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write: needs RW at every level, sets M.
    Write,
    /// An instruction fetch: fails on NX at any level.
    Execute,
}

impl Access {
    /// Every access kind.
    pub const ALL: [Access; 3] = [Access::Read, Access::Write, Access::Execute];

    /// The access described by x86 page-fault error bits (`PGEX_I` wins over
    /// `PGEX_W`, which wins over a read).
    pub const fn from_pgex(err: u64) -> Access {
        if err & PGEX_I != 0 {
            Access::Execute
        } else if err & PGEX_W != 0 {
            Access::Write
        } else {
            Access::Read
        }
    }

    /// The page-fault error bits for this access (`PGEX_W`, `PGEX_I` or
    /// none); the caller adds `PGEX_U` for a user-mode access.
    pub const fn pgex(self) -> u64 {
        match self {
            Access::Read => 0,
            Access::Write => PGEX_W,
            Access::Execute => PGEX_I,
        }
    }

    /// Whether `entry` lets this access through, ignoring everything else
    /// (V, then RW for a write, then NX for a fetch). `Err` says why not.
    const fn check(self, entry: Vpte) -> Result<(), Denial> {
        if !entry.is_valid() {
            Err(Denial::NotValid)
        } else if matches!(self, Access::Write) && !entry.is_writable() {
            Err(Denial::WriteDenied)
        } else if matches!(self, Access::Execute) && entry.is_no_exec() {
            Err(Denial::ExecDenied)
        } else {
            Ok(())
        }
    }

    /// The bits a walk ORs into each entry it visits: A, and A|M for a write
    /// (a write only gets past an entry that has RW).
    const fn update_bits(self) -> u64 {
        match self {
            Access::Write => VPTE_A | VPTE_M,
            Access::Read | Access::Execute => VPTE_A,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Execute => "exec",
        })
    }
}

#[derive(Clone, Copy)]
enum Denial {
    NotValid,
    WriteDenied,
    ExecDenied,
}

/// Where a walk stopped: the level, the entry as read (for a failure: as it
/// still is in memory) and where that entry lives (`None` for the master PDE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    /// The level of the entry.
    pub level: Level,
    /// The entry's value.
    pub entry: Vpte,
    /// The entry's own guest physical address; `None` for the master PDE.
    pub entry_pa: Option<GuestPhysAddr>,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry_pa {
            Some(pa) => write!(f, "{} entry {} at {pa}", self.level, self.entry),
            None => write!(f, "master PDE {}", self.entry),
        }
    }
}

/// Why a walk failed, and at which entry. A failing entry is never modified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// V is clear (this includes the master PDE 0 before `MADV_SETMAP`).
    #[error("not valid: {0}")]
    NotValid(Site),
    /// A write met an entry without RW.
    #[error("write denied: {0}")]
    WriteDenied(Site),
    /// An instruction fetch met an entry with NX.
    #[error("execute denied: {0}")]
    ExecDenied(Site),
    /// The entry at `site` points at a table page that is not wholly inside
    /// RAM.
    #[error("table {table} beyond RAM ({ram_size:#x} bytes): {site}")]
    TableBeyondRam {
        /// The entry pointing at the table.
        site: Site,
        /// The table page.
        table: GuestPhysAddr,
        /// The RAM size the walk was given.
        ram_size: u64,
    },
    /// The final page is not wholly inside RAM.
    #[error("page {page} beyond RAM ({ram_size:#x} bytes): {site}")]
    PageBeyondRam {
        /// The leaf entry.
        site: Site,
        /// The final page.
        page: GuestPhysAddr,
        /// The RAM size the walk was given.
        ram_size: u64,
    },
    /// The memory refused a table read or write below the RAM size: the
    /// [`PhysMem`] is smaller than the RAM size the caller passed (a caller
    /// bug, never the guest's doing).
    #[error("memory error reading the table of {site}: {source}")]
    Memory {
        /// The entry pointing at the table being read.
        site: Site,
        /// What the memory said.
        source: PhysMemError,
    },
}

impl WalkError {
    /// The entry where the walk stopped.
    pub const fn site(&self) -> Site {
        match *self {
            WalkError::NotValid(site)
            | WalkError::WriteDenied(site)
            | WalkError::ExecDenied(site)
            | WalkError::TableBeyondRam { site, .. }
            | WalkError::PageBeyondRam { site, .. }
            | WalkError::Memory { site, .. } => site,
        }
    }

    /// The level where the walk stopped.
    pub const fn level(&self) -> Level {
        self.site().level
    }

    /// The entry where the walk stopped.
    pub const fn entry(&self) -> Vpte {
        self.site().entry
    }

    /// Whether this is a protection failure (RW or NX denied: `SEGV_ACCERR`,
    /// `PGEX_P`) rather than a missing translation (`SEGV_MAPERR`), ABI
    /// section 6.
    pub const fn is_protection(&self) -> bool {
        matches!(self, WalkError::WriteDenied(_) | WalkError::ExecDenied(_))
    }

    /// The page-fault error bits to report for this failure of `access`
    /// (`PGEX_P` for a protection failure, plus the access bits; the caller
    /// adds `PGEX_U` for a user-mode access).
    pub const fn pgex(&self, access: Access) -> u64 {
        access.pgex() | if self.is_protection() { PGEX_P } else { 0 }
    }
}

/// A successful walk: the RAM page that backs the page index and how the host
/// may map it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The page index that was walked.
    pub pindex: PageIndex,
    /// The guest physical address of its 4 KiB page, wholly inside RAM.
    pub pa: GuestPhysAddr,
    /// Whether the host may map the page writable: every level has RW and the
    /// leaf has M (after this walk's update, so always true for a write).
    /// Otherwise it maps the page read-only and the first write faults again
    /// to set M (the read-only downgrade, ABI section 3 "Protection").
    pub writable: bool,
    /// Whether the host may map the page executable: no level has NX.
    pub executable: bool,
    /// The leaf: its level (which gives the size it covers), its value after
    /// this walk's A/M update, and its address.
    pub leaf: Site,
}

impl Translation {
    /// The level where the walk stopped.
    pub const fn level(&self) -> Level {
        self.leaf.level
    }

    /// Number of 4 KiB pages the leaf covers.
    pub const fn pages(&self) -> u64 {
        self.leaf.level.pages()
    }

    /// Bytes the leaf covers.
    pub const fn bytes(&self) -> u64 {
        self.leaf.level.bytes()
    }

    /// The first page index the leaf covers.
    pub const fn first_pindex(&self) -> PageIndex {
        self.leaf.level.region_start(self.pindex)
    }

    /// The guest physical address the leaf maps its first page to (its frame,
    /// not alignment-masked); page `first_pindex() + k` maps to
    /// `first_pa() + k * 4096`.
    pub const fn first_pa(&self) -> GuestPhysAddr {
        self.leaf.entry.frame()
    }
}

impl fmt::Display for Translation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} r{}{} via {}",
            self.pindex,
            self.pa,
            if self.writable { 'w' } else { '-' },
            if self.executable { 'x' } else { '-' },
            self.leaf
        )
    }
}

/// Walk `pindex` for `access` from `master` through the tables in `mem`
/// (ABI section 3).
///
/// `ram_size` is the guest RAM size in bytes; `mem` must answer for every
/// 8-byte word below it. The walk:
///
/// 1. starts with the master PDE at [`Level::Master`] (shift 36);
/// 2. checks the current entry: V must be set, RW too for a write, NX must be
///    clear for an instruction fetch; otherwise it fails at that entry;
/// 3. if the entry has PS or is at [`Level::L1`] (shift 0; PS there is a
///    plain leaf), the final page is `frame + ((pindex & ((1 << shift) - 1))
///    << 12)`, not alignment-masked; a page not wholly inside RAM fails the
///    walk at that entry;
/// 4. otherwise the table page at the entry's frame must be wholly inside RAM
///    (else the walk fails at that entry); for an entry in memory (not the
///    master) A, and A|M for a write, are now ORed in by a compare-and-swap
///    loop; then the walk reads entry `(pindex >> shift) & 511` of that table
///    with shift 9 smaller, and goes to 2 with it.
///
/// Order of check and update (a choice the ABI leaves open, stricter than
/// DragonFly, which sets A on a valid entry before checking its RW/NX): an
/// entry is checked *before* A/M are ORed in (V, RW, NX, and that the table
/// or final page it points at is inside RAM), so the entry a walk fails at is
/// never modified;
/// the entries above it, which it passed, keep the A (A|M) it gave them. If the
/// compare-and-swap finds that the guest changed the entry meanwhile, the new
/// value is checked again; an entry whose V was cleared concurrently is left
/// alone and the walk fails there. Each retry means the guest wrote the entry
/// again, so the loop ends as soon as the guest stops changing it. Nothing is
/// written when A (and M for a write) are already set, and the master PDE is
/// never written. At most four table entries are read, whatever the memory
/// holds (recursive slots and cycles included): the walk descends one level
/// per read.
pub fn walk<M: PhysMem + ?Sized>(
    mem: &M,
    master: Vpte,
    pindex: PageIndex,
    access: Access,
    ram_size: u64,
) -> Result<Translation, WalkError> {
    let rule = Rule::new(access, pindex, ram_size);
    let mut level = Level::Master;
    let mut entry = master;
    let mut entry_pa = None;
    let Some(mut step) = rule.step(level, entry) else {
        return Err(rule.failure(site(level, entry, entry_pa)));
    };
    let mut all_rw = master.is_writable();
    let mut no_nx = !master.is_no_exec();
    loop {
        let (next, pa) = match step {
            Step::Leaf(page) => {
                return Ok(Translation {
                    pindex,
                    pa: page,
                    // A write that got here may write: in-memory leaves now
                    // carry M; a master leaf (never written) cannot, and
                    // installing it read-only would fault forever.
                    writable: all_rw && (entry.is_modified() || access == Access::Write),
                    executable: no_nx,
                    leaf: site(level, entry, entry_pa),
                });
            }
            Step::Table { level, entry_pa } => (level, entry_pa),
        };
        let memory = |source| WalkError::Memory {
            site: site(level, entry, entry_pa),
            source,
        };
        let mut value = Vpte(mem.load(pa).map_err(memory)?);
        loop {
            // A/M do not enter the checks: `step` holds for the updated value.
            step = match rule.step(next, value) {
                Some(step) => step,
                None => return Err(rule.failure(site(next, value, Some(pa)))),
            };
            let updated = value.with(rule.update);
            if updated == value {
                break;
            }
            match mem
                .compare_exchange(pa, value.0, updated.0)
                .map_err(memory)?
            {
                Ok(_) => {
                    value = updated;
                    break;
                }
                Err(actual) => value = Vpte(actual),
            }
        }
        all_rw &= value.is_writable();
        no_nx &= !value.is_no_exec();
        (level, entry, entry_pa) = (next, value, Some(pa));
    }
}

fn site(level: Level, entry: Vpte, entry_pa: Option<GuestPhysAddr>) -> Site {
    Site {
        level,
        entry,
        entry_pa,
    }
}

/// Where an entry that lets the access through leads.
#[derive(Clone, Copy)]
enum Step {
    /// To the entry at `entry_pa`, of `level`, in the table the entry points at.
    Table {
        level: Level,
        entry_pa: GuestPhysAddr,
    },
    /// To the final page (the entry is a leaf: PS, or at L1).
    Leaf(GuestPhysAddr),
}

/// The checks of one walk, precomputed from its access.
#[derive(Clone, Copy)]
struct Rule {
    access: Access,
    pindex: PageIndex,
    ram_size: u64,
    /// Bits an entry must have: V, and RW for a write.
    need: u64,
    /// Bits an entry must not have: NX for a fetch.
    forbid: u64,
    /// Bits ORed into each entry passed: A, A|M for a write.
    update: u64,
}

impl Rule {
    fn new(access: Access, pindex: PageIndex, ram_size: u64) -> Rule {
        let (need, forbid) = match access {
            Access::Read => (VPTE_V, 0),
            Access::Write => (VPTE_V | VPTE_RW, 0),
            Access::Execute => (VPTE_V, VPTE_NX),
        };
        Rule {
            access,
            pindex,
            ram_size,
            need,
            forbid,
            update: access.update_bits(),
        }
    }

    /// Where `entry`, at `level`, leads, if it lets the access through and
    /// what it points at (table page or final page) is wholly inside RAM;
    /// `None` otherwise ([`Rule::failure`] then says why).
    #[inline]
    fn step(&self, level: Level, entry: Vpte) -> Option<Step> {
        if entry.0 & self.need != self.need || entry.0 & self.forbid != 0 {
            return None;
        }
        match level.below() {
            Some(next) if !entry.is_superpage() => {
                let table = entry.frame();
                if !table.page_in_ram(self.ram_size) {
                    return None;
                }
                // The index is below 512 and the table is inside RAM: no overflow.
                let entry_pa = GuestPhysAddr(table.0 + 8 * next.index(self.pindex) as u64);
                Some(Step::Table {
                    level: next,
                    entry_pa,
                })
            }
            _ => {
                let offset = (self.pindex.0 & (level.pages() - 1)) << PAGE_SHIFT;
                // frame < 2^52 and offset < 2^48: the sum cannot overflow.
                let page = GuestPhysAddr(entry.frame().0 + offset);
                page.page_in_ram(self.ram_size).then_some(Step::Leaf(page))
            }
        }
    }

    /// Why the entry at `site` failed [`Rule::step`].
    #[cold]
    fn failure(&self, site: Site) -> WalkError {
        match self.access.check(site.entry) {
            Err(Denial::NotValid) => return WalkError::NotValid(site),
            Err(Denial::WriteDenied) => return WalkError::WriteDenied(site),
            Err(Denial::ExecDenied) => return WalkError::ExecDenied(site),
            Ok(()) => {}
        }
        let ram_size = self.ram_size;
        match site.level.below() {
            Some(_) if !site.entry.is_superpage() => WalkError::TableBeyondRam {
                site,
                table: site.entry.frame(),
                ram_size,
            },
            _ => WalkError::PageBeyondRam {
                site,
                page: GuestPhysAddr(
                    site.entry.frame().0
                        + ((self.pindex.0 & (site.level.pages() - 1)) << PAGE_SHIFT),
                ),
                ram_size,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::GuestVirtAddr;
    use crate::builder::{FrameAllocator, PageSize, PageTableBuilder};
    use crate::mem::AtomicRam;
    use vkabi::{PGEX_P, VPTE_NX, VPTE_PS, VPTE_RW, VPTE_V};

    const RAM: u64 = 64 * 4096;
    /// L4 index 1, L3 index 2, L2 index 3, L1 index 4.
    const P: PageIndex = PageIndex((1 << 27) | (2 << 18) | (3 << 9) | 4);
    const DATA: GuestPhysAddr = GuestPhysAddr(40 * 4096);
    const LEVELS: [Level; 4] = [Level::L4, Level::L3, Level::L2, Level::L1];

    /// RAM with tables in pages 0..32 and `P` mapped to `DATA` with `bits`;
    /// returns the RAM, the master PDE and the addresses of the four entries
    /// on `P`'s path (L4, L3, L2, L1).
    fn fixture(bits: u64) -> (AtomicRam, Vpte, [GuestPhysAddr; 4]) {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(32 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("room for tables");
        b.map_page(P, DATA, bits).expect("maps");
        let master = b.master();
        let path = path(&ram, master, P);
        (ram, master, path)
    }

    /// The addresses of the entries on the path of `p`, read without walking.
    fn path(ram: &AtomicRam, master: Vpte, p: PageIndex) -> [GuestPhysAddr; 4] {
        let mut table = master.frame();
        LEVELS.map(|level| {
            let pa = GuestPhysAddr(table.0 + 8 * level.index(p) as u64);
            table = Vpte(ram.load(pa).expect("in RAM")).frame();
            pa
        })
    }

    fn get(ram: &AtomicRam, pa: GuestPhysAddr) -> Vpte {
        Vpte(ram.load(pa).expect("in RAM"))
    }

    fn set(ram: &AtomicRam, pa: GuestPhysAddr, v: Vpte) {
        ram.store(pa, v.0).expect("in RAM");
    }

    #[test]
    fn a_plain_walk_reaches_the_page_at_l1() {
        let (ram, master, path) = fixture(VPTE_RW);
        let t = walk(&ram, master, P, Access::Read, RAM).expect("mapped");
        assert_eq!(t.pa, DATA);
        assert_eq!(t.level(), Level::L1);
        assert_eq!(t.pages(), 1);
        assert_eq!(t.leaf.entry_pa, Some(path[3]));
        assert!(t.executable);
        assert_eq!(
            t.to_string(),
            format!(
                "pindex {:#x} -> pa 0x28000 r-x via L1 entry V|RW|A frame=0x28000 at pa {:#x}",
                P.0, path[3].0
            )
        );
    }

    #[test]
    fn master_zero_is_not_valid() {
        let (ram, _, _) = fixture(VPTE_RW);
        let before = ram.to_bytes();
        for access in Access::ALL {
            let e = walk(&ram, Vpte::INVALID, P, access, RAM).expect_err("master 0");
            assert_eq!(
                e,
                WalkError::NotValid(Site {
                    level: Level::Master,
                    entry: Vpte(0),
                    entry_pa: None
                })
            );
            assert!(!e.is_protection());
        }
        assert_eq!(ram.to_bytes(), before);
    }

    #[test]
    fn v_clear_at_each_level_fails_there_and_leaves_the_entry() {
        for (i, level) in LEVELS.into_iter().enumerate() {
            let (ram, master, path) = fixture(VPTE_RW);
            let cleared = get(&ram, path[i]).without(VPTE_V);
            set(&ram, path[i], cleared);
            let e = walk(&ram, master, P, Access::Write, RAM).expect_err("V clear");
            assert_eq!(
                e,
                WalkError::NotValid(Site {
                    level,
                    entry: cleared,
                    entry_pa: Some(path[i])
                }),
                "{level}"
            );
            assert_eq!(e.pgex(Access::Write), PGEX_W, "not present");
            assert_eq!(
                get(&ram, path[i]),
                cleared,
                "{level}: failing entry changed"
            );
            for above in &path[..i] {
                assert!(get(&ram, *above).has(VPTE_A | VPTE_M), "{level}");
            }
        }
    }

    #[test]
    fn rw_clear_at_each_level_denies_writes_there() {
        let (ram, master, _) = fixture(VPTE_RW);
        let e = walk(&ram, master.without(VPTE_RW), P, Access::Write, RAM).expect_err("master RO");
        assert_eq!(e.level(), Level::Master);
        assert!(matches!(e, WalkError::WriteDenied(_)));
        for (i, level) in LEVELS.into_iter().enumerate() {
            let (ram, master, path) = fixture(VPTE_RW);
            let ro = get(&ram, path[i]).without(VPTE_RW);
            set(&ram, path[i], ro);
            let e = walk(&ram, master, P, Access::Write, RAM).expect_err("RW clear");
            assert_eq!(
                e,
                WalkError::WriteDenied(Site {
                    level,
                    entry: ro,
                    entry_pa: Some(path[i])
                })
            );
            assert!(e.is_protection());
            assert_eq!(e.pgex(Access::Write), PGEX_P | PGEX_W);
            assert_eq!(get(&ram, path[i]), ro, "{level}: failing entry changed");
            // A read still works, read-only.
            let t = walk(&ram, master, P, Access::Read, RAM).expect("read");
            assert!(!t.writable, "{level}");
        }
    }

    #[test]
    fn nx_at_each_level_denies_fetches_there() {
        let (ram, master, _) = fixture(VPTE_RW);
        let e = walk(&ram, master.with(VPTE_NX), P, Access::Execute, RAM).expect_err("NX");
        assert_eq!(e.level(), Level::Master);
        assert!(matches!(e, WalkError::ExecDenied(_)));
        assert_eq!(e.pgex(Access::Execute), PGEX_P | PGEX_I);
        for (i, level) in LEVELS.into_iter().enumerate() {
            let (ram, master, path) = fixture(VPTE_RW);
            let nx = get(&ram, path[i]).with(VPTE_NX);
            set(&ram, path[i], nx);
            let e = walk(&ram, master, P, Access::Execute, RAM).expect_err("NX");
            assert_eq!(
                e,
                WalkError::ExecDenied(Site {
                    level,
                    entry: nx,
                    entry_pa: Some(path[i])
                })
            );
            assert_eq!(get(&ram, path[i]), nx, "{level}: failing entry changed");
            let t = walk(&ram, master, P, Access::Write, RAM).expect("write");
            assert!(!t.executable && t.writable, "{level}");
        }
    }

    #[test]
    fn ps_at_l3_maps_a_1g_superpage() {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(32 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("room");
        let first = Level::L3.region_start(P);
        b.map(first, GuestPhysAddr(0), PageSize::Size1G, VPTE_RW)
            .expect("maps");
        // Page 40 of the superpage is RAM page 40.
        let p = PageIndex(first.0 + 40);
        let t = walk(&ram, b.master(), p, Access::Write, RAM).expect("mapped");
        assert_eq!((t.level(), t.pa, t.bytes()), (Level::L3, DATA, 1 << 30));
        assert_eq!(t.first_pindex(), first);
        assert!(t.leaf.entry.has(VPTE_PS | VPTE_A | VPTE_M));
        // Page 64 is beyond RAM.
        let e = walk(&ram, b.master(), PageIndex(first.0 + 64), Access::Read, RAM)
            .expect_err("beyond RAM");
        assert!(matches!(
            e,
            WalkError::PageBeyondRam {
                page: GuestPhysAddr(RAM),
                ..
            }
        ));
    }

    #[test]
    fn ps_at_l2_maps_a_2m_superpage() {
        let ram = AtomicRam::new(RAM as usize);
        let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(32 * 4096));
        let mut b = PageTableBuilder::new(&ram, alloc).expect("room");
        let first = Level::L2.region_start(P);
        b.map(first, GuestPhysAddr(0), PageSize::Size2M, VPTE_RW)
            .expect("maps");
        let t = walk(&ram, b.master(), PageIndex(first.0 + 40), Access::Read, RAM).expect("mapped");
        assert_eq!((t.level(), t.pa, t.pages()), (Level::L2, DATA, 512));
    }

    #[test]
    fn ps_at_l4_maps_512g() {
        let (ram, master, path) = fixture(VPTE_RW);
        set(
            &ram,
            path[0],
            Vpte::leaf(GuestPhysAddr(0), VPTE_PS | VPTE_RW),
        );
        let p = PageIndex(Level::L4.region_start(P).0 + 7);
        let t = walk(&ram, master, p, Access::Read, RAM).expect("mapped");
        assert_eq!((t.level(), t.pa), (Level::L4, GuestPhysAddr(7 * 4096)));
    }

    #[test]
    fn ps_in_the_master_is_a_linear_map() {
        let ram = AtomicRam::new(RAM as usize);
        let master = Vpte::leaf(GuestPhysAddr(0), VPTE_PS | VPTE_RW);
        let before = ram.to_bytes();
        for n in [0, 1, 63] {
            let t = walk(&ram, master, PageIndex(n), Access::Write, RAM).expect("linear");
            assert_eq!((t.level(), t.pa), (Level::Master, GuestPhysAddr(n * 4096)));
            assert_eq!(t.leaf.entry, master, "the master is never written");
            // A permitted write may write, though the master cannot get M
            // (a read-only install would make the write fault forever).
            assert!(t.writable);
            let t = walk(&ram, master, PageIndex(n), Access::Read, RAM).expect("linear");
            assert!(
                !t.writable,
                "a read through a master without M maps read-only"
            );
        }
        // Bits above 36 of the page index are not part of the offset.
        let t = walk(&ram, master, PageIndex((1 << 36) | 5), Access::Read, RAM).expect("linear");
        assert_eq!(t.pa, GuestPhysAddr(5 * 4096));
        let e = walk(&ram, master, PageIndex(64), Access::Read, RAM).expect_err("beyond");
        assert!(matches!(e, WalkError::PageBeyondRam { .. }));
        assert_eq!(ram.to_bytes(), before, "nothing in memory to write");
        let t = walk(&ram, master.with(VPTE_M), PageIndex(1), Access::Read, RAM).expect("linear");
        assert!(t.writable, "a master with RW|M maps writable");
    }

    #[test]
    fn ps_in_an_l1_entry_is_a_plain_leaf() {
        let (ram, master, path) = fixture(VPTE_RW);
        set(&ram, path[3], get(&ram, path[3]).with(VPTE_PS));
        let t = walk(&ram, master, P, Access::Read, RAM).expect("mapped");
        assert_eq!((t.level(), t.pa, t.pages()), (Level::L1, DATA, 1));
    }

    #[test]
    fn an_unaligned_ps_frame_is_a_base_offset() {
        let (ram, master, path) = fixture(VPTE_RW);
        // A 2 MiB superpage whose frame is page 3, not 2 MiB aligned.
        set(
            &ram,
            path[2],
            Vpte::leaf(GuestPhysAddr(3 * 4096), VPTE_PS | VPTE_RW),
        );
        let first = Level::L2.region_start(P);
        let t = walk(&ram, master, PageIndex(first.0 + 10), Access::Read, RAM).expect("mapped");
        assert_eq!(t.pa, GuestPhysAddr(13 * 4096));
        assert_eq!(t.first_pa(), GuestPhysAddr(3 * 4096));
    }

    #[test]
    fn a_table_beyond_ram_fails_at_the_entry_pointing_to_it() {
        for (i, level) in [Level::Master, Level::L4, Level::L3, Level::L2]
            .into_iter()
            .enumerate()
        {
            let (ram, mut master, path) = fixture(VPTE_RW);
            let far = GuestPhysAddr(RAM);
            let entry = Vpte::table(far);
            match i {
                0 => master = entry,
                _ => set(&ram, path[i - 1], entry),
            }
            let e = walk(&ram, master, P, Access::Read, RAM).expect_err("beyond");
            assert!(
                matches!(e, WalkError::TableBeyondRam { table, ram_size: RAM, .. } if table == far),
                "{e}"
            );
            assert_eq!(e.level(), level);
            assert!(!e.is_protection());
            if i > 0 {
                assert_eq!(get(&ram, path[i - 1]), entry, "failing entry changed");
            }
        }
        // A RAM size that cuts the table page fails too.
        let (ram, master, _) = fixture(VPTE_RW);
        let e = walk(&ram, master, P, Access::Read, master.frame().0 + 4095).expect_err("cut");
        assert!(matches!(e, WalkError::TableBeyondRam { .. }));
    }

    #[test]
    fn a_final_page_beyond_ram_fails() {
        let (ram, master, path) = fixture(VPTE_RW);
        set(&ram, path[3], Vpte::leaf(GuestPhysAddr(RAM), VPTE_RW));
        let e = walk(&ram, master, P, Access::Read, RAM).expect_err("beyond");
        assert!(matches!(
            e,
            WalkError::PageBeyondRam {
                page: GuestPhysAddr(RAM),
                ..
            }
        ));
        assert_eq!(e.level(), Level::L1);
        assert_eq!(
            e.to_string(),
            format!(
                "page pa 0x40000 beyond RAM (0x40000 bytes): L1 entry V|RW frame=0x40000 at pa {:#x}",
                path[3].0
            )
        );
        assert_eq!(
            get(&ram, path[3]),
            Vpte::leaf(GuestPhysAddr(RAM), VPTE_RW),
            "failing entry changed"
        );
        assert!(get(&ram, path[2]).is_accessed(), "passed entries get A");
        let t = walk(&ram, master, P, Access::Read, RAM + 4096).expect("fits now");
        assert_eq!(t.pa, GuestPhysAddr(RAM));
    }

    #[test]
    fn every_visited_level_gets_a_and_m_only_on_a_write_with_rw() {
        let (ram, master, path) = fixture(VPTE_RW);
        for pa in path {
            assert!(!get(&ram, pa).has(VPTE_A));
        }
        walk(&ram, master, P, Access::Read, RAM).expect("read");
        for pa in path {
            assert!(get(&ram, pa).is_accessed() && !get(&ram, pa).is_modified());
        }
        walk(&ram, master, P, Access::Execute, RAM).expect("fetch");
        for pa in path {
            assert!(!get(&ram, pa).is_modified(), "a fetch does not set M");
        }
        let t = walk(&ram, master, P, Access::Write, RAM).expect("write");
        for pa in path {
            assert!(get(&ram, pa).has(VPTE_A | VPTE_M));
        }
        assert!(
            t.leaf.entry.has(VPTE_A | VPTE_M),
            "the translation shows the update"
        );
        // A write that fails at L1 for lack of RW sets A|M above, nothing at L1.
        let (ram, master, path) = fixture(0);
        walk(&ram, master, P, Access::Write, RAM).expect_err("read-only");
        for pa in &path[..3] {
            assert!(get(&ram, *pa).has(VPTE_A | VPTE_M));
        }
        assert_eq!(get(&ram, path[3]), Vpte::leaf(DATA, 0));
    }

    #[test]
    fn nothing_is_written_when_a_and_m_are_set() {
        let (ram, master, _) = fixture(VPTE_RW);
        walk(&ram, master, P, Access::Write, RAM).expect("write");
        let mem = crate::reference::CountingMem::new(&ram);
        for access in Access::ALL {
            walk(&mem, master, P, access, RAM).expect("walk");
        }
        assert!(mem.cas().is_empty());
        assert_eq!(mem.loads().len(), 12);
    }

    #[test]
    fn a_read_maps_read_only_until_the_leaf_has_m() {
        let (ram, master, _) = fixture(VPTE_RW);
        let t = walk(&ram, master, P, Access::Read, RAM).expect("read");
        assert!(!t.writable, "RW without M: read-only");
        let t = walk(&ram, master, P, Access::Write, RAM).expect("write");
        assert!(t.writable);
        let t = walk(&ram, master, P, Access::Read, RAM).expect("read");
        assert!(t.writable, "RW and M: writable");
        // M without RW stays read-only.
        let (ram, master, _) = fixture(VPTE_M | VPTE_A);
        let t = walk(&ram, master, P, Access::Read, RAM).expect("read");
        assert!(!t.writable);
        // RW|M at the leaf but no RW above: read-only.
        let (ram, master, _) = fixture(VPTE_RW | VPTE_M);
        let t = walk(&ram, master.without(VPTE_RW), P, Access::Read, RAM).expect("read");
        assert!(!t.writable);
    }

    #[test]
    fn the_file_offset_enters_the_page_index() {
        let (ram, master, _) = fixture(VPTE_RW);
        // A mapping at 0x10000000 with offset P pages - 16: va = start + 16 pages.
        let start = GuestVirtAddr(0x1000_0000);
        let off = (P.0 - 16) << 12;
        let va = GuestVirtAddr(start.0 + (16 << 12) + 0x123);
        let p = PageIndex::for_fault(va, start, off).expect("in range");
        assert_eq!(p, P);
        let t = walk(&ram, master, p, Access::Read, RAM).expect("mapped");
        assert_eq!(t.pa, DATA);
    }

    #[test]
    fn a_recursive_slot_reads_the_table_page() {
        let (ram, master, path) = fixture(VPTE_RW);
        // L4 slot 511 points back at the L4 table.
        let l4 = master.frame();
        set(&ram, GuestPhysAddr(l4.0 + 8 * 511), Vpte::table(l4));
        // Through the slot, P's L4/L3/L2 indexes select its L1 table.
        let p = PageIndex((511 << 27) | (1 << 18) | (2 << 9) | 3);
        let t = walk(&ram, master, p, Access::Read, RAM).expect("recursive");
        let l1_table = GuestPhysAddr(path[3].0 & !0xFFF);
        assert_eq!((t.level(), t.pa), (Level::L1, l1_table));
    }

    #[test]
    fn a_cycle_stops_after_four_reads() {
        let ram = AtomicRam::new(RAM as usize);
        // Every entry of the table at page 1 points at page 1.
        let table = GuestPhysAddr(4096);
        for i in 0..512 {
            set(&ram, GuestPhysAddr(table.0 + 8 * i), Vpte::table(table));
        }
        let mem = crate::reference::CountingMem::new(&ram);
        let t = walk(
            &mem,
            Vpte::table(table),
            PageIndex(0x1234_5678),
            Access::Write,
            RAM,
        )
        .expect("leaf is page 1");
        assert_eq!((t.level(), t.pa), (Level::L1, table));
        assert_eq!(mem.loads().len(), 4);
    }

    /// A memory whose first compare-and-swap loses to a guest store of `guest`.
    struct Racing<'a> {
        ram: &'a AtomicRam,
        guest: Vpte,
        fired: core::cell::Cell<bool>,
    }

    impl PhysMem for Racing<'_> {
        fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
            self.ram.load(pa)
        }
        fn compare_exchange(
            &self,
            pa: GuestPhysAddr,
            current: u64,
            new: u64,
        ) -> Result<Result<u64, u64>, PhysMemError> {
            if !self.fired.replace(true) {
                self.ram.store(pa, self.guest.0)?;
            }
            self.ram.compare_exchange(pa, current, new)
        }
    }

    #[test]
    fn an_entry_invalidated_during_the_update_is_left_alone() {
        let (ram, master, path) = fixture(VPTE_RW);
        let l4 = get(&ram, path[0]);
        let gone = l4.without(VPTE_V);
        let mem = Racing {
            ram: &ram,
            guest: gone,
            fired: false.into(),
        };
        let e = walk(&mem, master, P, Access::Read, RAM).expect_err("V cleared");
        assert_eq!(
            e,
            WalkError::NotValid(Site {
                level: Level::L4,
                entry: gone,
                entry_pa: Some(path[0])
            })
        );
        assert_eq!(get(&ram, path[0]), gone, "no A on a cleared entry");
    }

    #[test]
    fn a_concurrent_change_is_kept_and_rechecked() {
        let (ram, master, path) = fixture(VPTE_RW);
        let l4 = get(&ram, path[0]);
        // The guest sets G meanwhile: the walk retries and keeps it.
        let mem = Racing {
            ram: &ram,
            guest: l4.with(vkabi::VPTE_G),
            fired: false.into(),
        };
        walk(&mem, master, P, Access::Write, RAM).expect("walks");
        assert_eq!(get(&ram, path[0]), l4.with(vkabi::VPTE_G | VPTE_A | VPTE_M));
        // The guest clears RW meanwhile: the write now fails there, unchanged.
        let (ram, master, path) = fixture(VPTE_RW);
        let ro = get(&ram, path[1]).without(VPTE_RW);
        let mem = Racing {
            ram: &ram,
            guest: ro,
            fired: false.into(),
        };
        // The first CAS is at L4; make the race hit L3 by pre-setting L4's A|M.
        set(&ram, path[0], get(&ram, path[0]).with(VPTE_A | VPTE_M));
        let e = walk(&mem, master, P, Access::Write, RAM).expect_err("RW cleared");
        assert!(matches!(e, WalkError::WriteDenied(s) if s.level == Level::L3 && s.entry == ro));
        assert_eq!(get(&ram, path[1]), ro);
    }

    #[test]
    fn access_from_pgex() {
        assert_eq!(Access::from_pgex(0), Access::Read);
        assert_eq!(Access::from_pgex(PGEX_W | vkabi::PGEX_U), Access::Write);
        assert_eq!(Access::from_pgex(PGEX_I | PGEX_P), Access::Execute);
        for a in Access::ALL {
            assert_eq!(Access::from_pgex(a.pgex()), a);
        }
    }
}
