//! Page tables built in guest RAM through the direct map with `vpte`'s
//! builder, and the small steps the sample guests take on them, each
//! failing with a line of text for the guest's FAIL report.

use std::sync::atomic::AtomicU64;

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
