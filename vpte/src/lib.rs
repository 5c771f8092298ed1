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
//! - [`reference`](mod@reference): a naive walker and checks for tests and
//!   fuzzers.
//!
//! The bit values are `vkabi`'s, re-exported here; this crate defines none.
//!
//! # Using the walker from the supervisor
//!
//! View the shared mapping of the RAM memfd as `&[AtomicU64]` (page aligned,
//! `ram_size / 8` words; the one `unsafe` step lives in the supervisor's
//! `sys` module), which implements [`PhysMem`], or wrap the mapping in a type
//! of its own implementing [`PhysMem`]. Then, for a fault at `va` in a
//! VPAGETABLE mapping at `start` with offset `off` and master PDE `master`:
//!
//! ```
//! # use vpte::*;
//! # let ram = AtomicRam::new(1 << 16);
//! # let words = ram.words();
//! # let (va, start, off, master, ram_size) =
//! #     (GuestVirtAddr(0x1000), GuestVirtAddr(0), 0, Vpte::INVALID, 1 << 16);
//! let pindex = PageIndex::for_fault(va, start, off).expect("va in the mapping");
//! match walk(words, master, pindex, Access::Read, ram_size) {
//!     Ok(t) => {
//!         // Map RAM page t.pa at va, writable iff t.writable, executable
//!         // iff t.executable; prefault_run() says which neighbours may come
//!         // along.
//!     }
//!     Err(e) => {
//!         // SIGSEGV: SEGV_ACCERR if e.is_protection(), else SEGV_MAPERR;
//!         // REG_ERR = e.pgex(access) | PGEX_U.
//!         assert!(matches!(e, WalkError::NotValid(_)));
//!     }
//! }
//! ```
//!
//! # Tests
//!
//! Unit tests sit next to the code (one per walk rule in `walk.rs`);
//! `tests/model.rs` checks builder and walker against a naive model,
//! `tests/arbitrary_walk.rs` checks arbitrary RAM against [`reference`](mod@reference)
//! (the fuzz property), `tests/concurrency.rs` races walks with a guest
//! flipping entries. `vpte/fuzz` is a cargo-fuzz crate outside the workspace
//! (`cd vpte/fuzz && cargo +nightly fuzz run walk`), and `cargo bench -p vpte`
//! times the walk (pin it: `taskset -c 0 cargo bench -p vpte`).
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
