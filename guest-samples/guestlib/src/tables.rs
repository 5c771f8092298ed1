//! Page tables built in guest RAM through the direct map with `vpte`'s
//! builder, and the small steps the sample guests take on them, each
//! failing with a line of text for the guest's FAIL report.

use std::ops::Range;
use std::sync::atomic::AtomicU64;

use vkabi::PAGE_SIZE;

use vpte::{GuestPhysAddr, PageIndex, PageTableBuilder, Vpte};

/// Frames below this stay unused (frame 0 above all: a zero PTE's frame).
pub const FIRST_FRAME: u64 = 1 << 20;

/// Page tables built in guest RAM through the DMAP.
pub type Tables = PageTableBuilder<&'static [AtomicU64]>;

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

/// Frames of guest RAM handed out in order from [`FIRST_FRAME`] up and never
/// given back: each caller gets frames nobody else uses.
#[derive(Debug)]
pub struct FrameCarver {
    /// The next frame not yet handed out.
    next: u64,
    /// The RAM size in bytes (`vk_info.ram_size`).
    ram_size: u64,
}

impl FrameCarver {
    /// Frames of `ram_size` bytes of RAM, from [`FIRST_FRAME`] up.
    pub fn new(ram_size: u64) -> FrameCarver {
        FrameCarver {
            next: FIRST_FRAME,
            ram_size,
        }
    }

    /// The next `pages` contiguous frames, as physical addresses
    /// `start..end`, or why they do not fit in RAM.
    pub fn take(&mut self, pages: u64) -> Result<Range<GuestPhysAddr>, String> {
        let start = self.next;
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| start.checked_add(b))
            .filter(|end| *end <= self.ram_size)
            .ok_or_else(|| {
                format!(
                    "{pages} frames from pa {start:#x} do not fit in {:#x} bytes of RAM",
                    self.ram_size
                )
            })?;
        self.next = end;
        Ok(GuestPhysAddr(start)..GuestPhysAddr(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_carved_in_order_until_ram_ends() {
        let mut frames = FrameCarver::new(FIRST_FRAME + 3 * PAGE_SIZE);
        let first = frames.take(2).expect("two frames fit");
        assert_eq!(
            first,
            GuestPhysAddr(FIRST_FRAME)..GuestPhysAddr(FIRST_FRAME + 2 * PAGE_SIZE)
        );
        assert!(frames.take(2).is_err(), "only one frame is left");
        let last = frames.take(1).expect("the last frame fits");
        assert_eq!(last.start, first.end);
        assert!(frames.take(u64::MAX).is_err(), "no overflow");
    }
}
