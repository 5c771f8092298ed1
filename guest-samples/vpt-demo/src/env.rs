//! The set-up every area shares: `vk_info`, guest RAM mapped as the direct
//! map (DMAP) and viewed as [`PhysMem`], frames carved from RAM above 1 MiB,
//! page-table builders over them, and windows.

use std::sync::atomic::AtomicU64;

use vkabi::{PAGE_SIZE, VkInfo};
use vpte::{FrameAllocator, GuestPhysAddr, Level, PageIndex, PageTableBuilder, PhysMem, Vpte};

use crate::report::must;
use crate::sys::{self, Place, Window};

/// Frames below this stay unused (frame 0 above all: a zero PTE's frame).
pub const FIRST_FRAME: u64 = 1 << 20;

/// Page tables built in guest RAM through the DMAP.
pub type Tables = PageTableBuilder<&'static [AtomicU64]>;

/// The guest's view of its RAM.
#[derive(Debug)]
pub struct Env {
    /// What `vk_info` said.
    pub info: VkInfo,
    /// All of RAM, through the DMAP.
    pub ram: &'static [AtomicU64],
    /// The next frame not yet handed out.
    next: u64,
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
            next: FIRST_FRAME,
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
        let start = self.next;
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| start.checked_add(b))
            .filter(|end| *end <= self.info.ram_size)
            .ok_or_else(|| {
                format!(
                    "{pages} frames from pa {start:#x} do not fit in {} bytes of RAM",
                    self.info.ram_size
                )
            })?;
        self.next = end;
        Ok(FrameAllocator::new(
            GuestPhysAddr(start)..GuestPhysAddr(end),
        ))
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
        (0..n as u64)
            .map(|i| {
                let at = pa.0 + i;
                self.load(GuestPhysAddr(at & !7)).to_le_bytes()[(at & 7) as usize]
            })
            .collect()
    }

    /// Write `bytes` at `pa`, through the DMAP (nobody else writes there).
    pub fn write_bytes(&self, pa: GuestPhysAddr, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = pa.0 + i as u64;
            let word = GuestPhysAddr(at & !7);
            let mut w = self.load(word).to_le_bytes();
            w[(at & 7) as usize] = *b;
            self.store(word, u64::from_le_bytes(w));
        }
    }

    /// The entries a walk of `pindex` visits below the master, read through
    /// the DMAP: L4, L3, L2, L1 (fewer if it stops at an invalid or PS entry).
    pub fn path(&self, root: GuestPhysAddr, pindex: PageIndex) -> Vec<(Level, Vpte)> {
        let mut out = Vec::new();
        let mut table = root;
        for level in [Level::L4, Level::L3, Level::L2, Level::L1] {
            let entry = Vpte(self.load(GuestPhysAddr(table.0 + 8 * level.index(pindex) as u64)));
            out.push((level, entry));
            if !entry.is_valid() || entry.is_superpage() {
                break;
            }
            table = entry.frame();
        }
        out
    }
}

/// A data frame from the builder's allocator.
pub fn frame(pt: &mut Tables) -> Result<GuestPhysAddr, String> {
    pt.allocator()
        .alloc()
        .ok_or_else(|| "out of frames".to_owned())
}

/// Map `pindex` to `frame` with `bits`.
pub fn map(
    pt: &mut Tables,
    pindex: PageIndex,
    frame: GuestPhysAddr,
    bits: u64,
) -> Result<(), String> {
    pt.map_page(pindex, frame, bits)
        .map(drop)
        .map_err(|e| format!("map {pindex}: {e}"))
}

/// Where the leaf of `pindex` lives.
pub fn leaf_pa(pt: &Tables, pindex: PageIndex) -> Result<GuestPhysAddr, String> {
    match pt.lookup(pindex) {
        Ok(Some(m)) => Ok(m.entry_pa),
        Ok(None) => Err(format!("{pindex} is not mapped")),
        Err(e) => Err(format!("lookup {pindex}: {e}")),
    }
}

/// The leaf of `pindex` as it is now (0 if unmapped).
pub fn leaf(pt: &Tables, pindex: PageIndex) -> Vpte {
    match pt.lookup(pindex) {
        Ok(Some(m)) => m.entry,
        _ => Vpte::INVALID,
    }
}

/// The stamp a frame holds in its first word: distinct per frame, so a page
/// read through the wrong frame cannot match.
pub fn stamp(pa: GuestPhysAddr) -> u64 {
    (pa.0 >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_0000_0000_0000
}

/// Write [`stamp`] into the first word of `pa` and its complement into the
/// last word.
pub fn stamp_frame(env: &Env, pa: GuestPhysAddr) {
    env.store(pa, stamp(pa));
    env.store(GuestPhysAddr(pa.0 + PAGE_SIZE - 8), !stamp(pa));
}
