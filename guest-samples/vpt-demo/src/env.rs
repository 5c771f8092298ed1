//! The set-up every area shares: `vk_info`, guest RAM mapped as the direct
//! map (DMAP) and viewed as [`PhysMem`], frames carved from RAM above 1 MiB,
//! page-table builders over them, and windows.

use std::sync::atomic::AtomicU64;

use vkabi::{PAGE_SIZE, VkInfo};
use vkguest::dmap;
use vkguest::tables::FrameCarver;
pub use vkguest::tables::{FIRST_FRAME, Tables, frame, leaf, leaf_pa, map, stamp};
use vpte::{FrameAllocator, GuestPhysAddr, Level, PageIndex, PhysMem, Vpte};

use crate::report::must;
use crate::sys::{self, Place, Window};

/// The guest's view of its RAM.
#[derive(Debug)]
pub struct Env {
    /// What `vk_info` said.
    pub info: VkInfo,
    /// All of RAM, through the DMAP.
    pub ram: &'static [AtomicU64],
    /// The frames not yet handed out.
    frames: FrameCarver,
}

impl Env {
    /// Map RAM as the DMAP and install the SIGSEGV handler.
    pub fn new(info: VkInfo) -> Result<Env, String> {
        let ram = sys::map_ram(info.ram_fd, info.ram_size)
            .map_err(|e| format!("mmap of ram_fd {}: {e}", info.ram_fd))?;
        sys::install_segv_handler().map_err(|e| format!("sigaction: {e}"))?;
        Ok(Env {
            info,
            ram,
            frames: FrameCarver::new(info.ram_size),
        })
    }

    /// The RAM memfd.
    pub fn ram_fd(&self) -> i32 {
        self.info.ram_fd
    }

    /// The DMAP's address (for the narrative).
    pub fn dmap_addr(&self) -> u64 {
        self.ram.as_ptr() as u64
    }

    /// An allocator over `pages` frames nobody else uses.
    pub fn frames(&mut self, pages: u64) -> Result<FrameAllocator, String> {
        Ok(FrameAllocator::new(self.frames.take(pages)?))
    }

    /// A builder with an empty L4 table, allocating tables and data frames
    /// from `pages` frames of its own.
    pub fn tables(&mut self, pages: u64) -> Result<Tables, String> {
        let alloc = self.frames(pages)?;
        Tables::new(self.ram, alloc).map_err(|e| format!("page tables: {e}"))
    }

    /// A window of `pages` pages with offset 0, wherever the supervisor
    /// puts it.
    pub fn window(&self, pages: u64) -> Result<Window, String> {
        self.window_at(Place::Anywhere, pages * PAGE_SIZE, 0)
    }

    /// A window of `len` bytes with offset `off` at `place`.
    pub fn window_at(&self, place: Place, len: u64, off: u64) -> Result<Window, String> {
        must("vk_mmap", Window::map(place, len, off, self.ram_fd()))
    }

    /// The word at `pa`, through the DMAP.
    pub fn load(&self, pa: GuestPhysAddr) -> u64 {
        self.ram.load(pa).expect("pa inside RAM, 8-aligned")
    }

    /// Store the word at `pa`, through the DMAP.
    pub fn store(&self, pa: GuestPhysAddr, value: u64) {
        self.ram.store(pa, value).expect("pa inside RAM, 8-aligned");
    }

    /// Bytes `pa..pa + n`, through the DMAP.
    pub fn read_bytes(&self, pa: GuestPhysAddr, n: usize) -> Vec<u8> {
        dmap::read_bytes(self.ram, pa, n)
    }

    /// Write `bytes` at `pa`, through the DMAP (nobody else writes there).
    pub fn write_bytes(&self, pa: GuestPhysAddr, bytes: &[u8]) {
        dmap::write_bytes(self.ram, pa, bytes);
    }

    /// The entries a walk of `pindex` visits below the master, read through
    /// the DMAP: L4, L3, L2, L1 (fewer if it stops at an invalid or PS entry).
    pub fn path(&self, root: GuestPhysAddr, pindex: PageIndex) -> Vec<(Level, Vpte)> {
        dmap::walk_path(self.ram, root, pindex)
    }
}

/// Write [`stamp`] into the first word of `pa` and its complement into the
/// last word.
pub fn stamp_frame(env: &Env, pa: GuestPhysAddr) {
    env.store(pa, stamp(pa));
    env.store(GuestPhysAddr(pa.0 + PAGE_SIZE - 8), !stamp(pa));
}
