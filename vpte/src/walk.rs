//! The walker: resolves a page index through the master PDE and the guest's
//! tables exactly as ABI section 3 says, setting A and M as it goes.

use core::fmt;

use vkabi::{PAGE_SHIFT, PGEX_I, PGEX_P, PGEX_W, VPTE_A, VPTE_M};

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
/// 3. stops if the entry has PS or is at [`Level::L1`] (shift 0; PS there is
///    a plain leaf);
/// 4. otherwise reads entry `(pindex >> shift) & 511` of the table page at the
///    entry's frame (failing if that page is not wholly inside RAM), with
///    shift 9 smaller, and goes to 2 with it. Before going on, it ORs A (A|M
///    for a write) into the entry in memory by a compare-and-swap loop.
///
/// The final page is `frame + ((pindex & ((1 << shift) - 1)) << 12)`, not
/// alignment-masked; a page not wholly inside RAM fails the walk.
///
/// Order of check and update (a choice the ABI leaves open, stricter than
/// DragonFly, which sets A before checking RW/NX): an entry is checked
/// *before* A/M are ORed in, so a failing entry is never modified. If the
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
    let mut site = Site {
        level: Level::Master,
        entry: master,
        entry_pa: None,
    };
    deny(access, site)?;
    let mut all_rw = master.is_writable();
    let mut no_nx = !master.is_no_exec();

    while !site.entry.is_superpage() {
        let Some(next) = site.level.below() else {
            break;
        };
        let table = site.entry.frame();
        if !table.page_in_ram(ram_size) {
            return Err(WalkError::TableBeyondRam {
                site,
                table,
                ram_size,
            });
        }
        // The index is below 512 and the table page is inside RAM: no overflow.
        let entry_pa = GuestPhysAddr(table.0 + 8 * next.index(pindex) as u64);
        let memory = |source| WalkError::Memory { site, source };
        let mut entry = Vpte(mem.load(entry_pa).map_err(memory)?);
        loop {
            let at = Site {
                level: next,
                entry,
                entry_pa: Some(entry_pa),
            };
            deny(access, at)?;
            let updated = entry.with(access.update_bits());
            if updated == entry {
                break;
            }
            match mem
                .compare_exchange(entry_pa, entry.0, updated.0)
                .map_err(memory)?
            {
                Ok(_) => {
                    entry = updated;
                    break;
                }
                Err(actual) => entry = Vpte(actual),
            }
        }
        all_rw &= entry.is_writable();
        no_nx &= !entry.is_no_exec();
        site = Site {
            level: next,
            entry,
            entry_pa: Some(entry_pa),
        };
    }

    let offset = (pindex.0 & (site.level.pages() - 1)) << PAGE_SHIFT;
    // frame < 2^52 and offset < 2^48: the sum cannot overflow.
    let page = GuestPhysAddr(site.entry.frame().0 + offset);
    if !page.page_in_ram(ram_size) {
        return Err(WalkError::PageBeyondRam {
            site,
            page,
            ram_size,
        });
    }
    Ok(Translation {
        pindex,
        pa: page,
        writable: all_rw && site.entry.is_modified(),
        executable: no_nx,
        leaf: site,
    })
}

/// Fail with the reason `site.entry` denies `access`, if it does.
fn deny(access: Access, site: Site) -> Result<(), WalkError> {
    match access.check(site.entry) {
        Ok(()) => Ok(()),
        Err(Denial::NotValid) => Err(WalkError::NotValid(site)),
        Err(Denial::WriteDenied) => Err(WalkError::WriteDenied(site)),
        Err(Denial::ExecDenied) => Err(WalkError::ExecDenied(site)),
    }
}
