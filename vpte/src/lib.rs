//! DragonFly virtual page table entries and the walker (ABI section 3).
//!
//! This crate is the pure heart of `MAP_VPAGETABLE`: no OS dependencies and no
//! `unsafe`, usable by the supervisor (to resolve faults), by guests (to build
//! tables) and by fuzzers.
//!
//! - [`Vpte`] and [`Level`]: entries and the levels of the walk (the master
//!   PDE above [`Level::L4`] (512 GiB per entry), [`Level::L3`] (1 GiB),
//!   [`Level::L2`] (2 MiB) and [`Level::L1`] (4 KiB)).
//! - [`GuestVirtAddr`], [`PageIndex`], [`GuestPhysAddr`]: addresses kept apart.
//! - [`PhysMem`]: what the walker needs from guest RAM (64-bit load and
//!   compare-and-swap), implemented by `[AtomicU64]`, [`AtomicRam`] and
//!   [`CellRam`].
//! - [`walk`]: page index to [`Translation`] or [`WalkError`], setting A/M.
//! - [`prefault_run`]: which neighbours of a translated page may be installed
//!   ahead of access without making A/M inexact.
//! - [`PageTableBuilder`] and [`FrameAllocator`]: build tables in guest RAM.
//! - [`reference`]: a naive walker and checks for tests and fuzzers.
//!
//! The bit values are `vkabi`'s, re-exported here; this crate defines none.
#![forbid(unsafe_code)]

mod addr;
mod builder;
mod entry;
mod mem;
mod prefault;
pub mod reference;
mod walk;

pub use addr::{GuestPhysAddr, GuestVirtAddr, PageIndex};
pub use builder::{BuildError, FrameAllocator, Mapping, PageSize, PageTableBuilder};
pub use entry::{Level, VPTE_PAGE_BITS, Vpte};
pub use mem::{AtomicRam, CellRam, PhysMem, PhysMemError};
pub use prefault::{PrefaultRun, prefault_run};
pub use walk::{Access, Site, Translation, WalkError, walk};

pub use vkabi::{
    PAGE_SHIFT, PAGE_SIZE, PGEX_I, PGEX_P, PGEX_U, PGEX_W, RAM_SIZE_MAX, VPTE_A, VPTE_ENTRIES,
    VPTE_FRAME, VPTE_G, VPTE_LEVELS, VPTE_M, VPTE_MANAGED, VPTE_NX, VPTE_PS, VPTE_RW,
    VPTE_TOP_SHIFT, VPTE_U, VPTE_V, VPTE_WIRED, VpteT,
};
