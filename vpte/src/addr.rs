//! Address newtypes: guest virtual addresses, page indexes and guest physical
//! addresses (byte offsets into the guest RAM memfd) are never confused.

use core::fmt;

use vkabi::{PAGE_SHIFT, PAGE_SIZE};

/// A guest virtual address: an address inside a VPAGETABLE mapping, as the
/// guest (or a guest user context in a vmspace) sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestVirtAddr(pub u64);

/// A page index of a VPAGETABLE mapping: `(va - start + off) >> 12`
/// (ABI section 3). The walker consumes its low 36 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// A guest physical address: a byte offset into the guest RAM memfd
/// (ABI section 2). Not a host pointer and never dereferenced as one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPhysAddr(pub u64);

impl GuestVirtAddr {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl PageIndex {
    /// The page index of a fault at `va` in a VPAGETABLE mapping that starts
    /// at `start` with file offset `off`: `(va - start + off) >> 12`.
    ///
    /// `None` when `va` lies below `start` or the sum overflows 64 bits
    /// (neither can happen for a fault inside a mapping of `[0, USER_MAX)`
    /// with a sane offset; the caller reports it as a mapping error).
    pub fn for_fault(va: GuestVirtAddr, start: GuestVirtAddr, off: u64) -> Option<PageIndex> {
        let rel = va.0.checked_sub(start.0)?;
        Some(PageIndex(rel.checked_add(off)? >> PAGE_SHIFT))
    }

    /// The raw index.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The index `n` pages further on, `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<PageIndex> {
        self.0.checked_add(n).map(PageIndex)
    }

    /// The guest virtual address of this page in a mapping at `start` with
    /// file offset `off` (the inverse of [`PageIndex::for_fault`]); `None`
    /// when the page lies before the mapping or the result overflows.
    pub fn to_va(self, start: GuestVirtAddr, off: u64) -> Option<GuestVirtAddr> {
        let rel = self.0.checked_mul(PAGE_SIZE)?.checked_sub(off)?;
        start.0.checked_add(rel).map(GuestVirtAddr)
    }
}

impl GuestPhysAddr {
    /// The raw offset into guest RAM.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Whether the offset is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }

    /// The address `bytes` further on, `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<GuestPhysAddr> {
        self.0.checked_add(bytes).map(GuestPhysAddr)
    }

    /// Whether the whole 4 KiB page starting here lies below `ram_size`
    /// (the ABI's "at or beyond ram_size" test, made strict for a RAM size
    /// that is not a multiple of the page size).
    pub const fn page_in_ram(self, ram_size: u64) -> bool {
        match self.0.checked_add(PAGE_SIZE) {
            Some(end) => end <= ram_size,
            None => false,
        }
    }
}

impl fmt::Display for GuestVirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pindex {:#x}", self.0)
    }
}

impl fmt::Display for GuestPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pa {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_index_folds_in_the_file_offset() {
        let start = GuestVirtAddr(0x4000_0000);
        let va = GuestVirtAddr(0x4000_3123);
        assert_eq!(PageIndex::for_fault(va, start, 0), Some(PageIndex(3)));
        // DragonFly maps kernel space with offset 512 GiB.
        let off = 512 << 30;
        assert_eq!(
            PageIndex::for_fault(va, start, off),
            Some(PageIndex(3 + (off >> 12)))
        );
        assert_eq!(PageIndex::for_fault(GuestVirtAddr(0), start, 0), None);
        assert_eq!(PageIndex::for_fault(va, start, u64::MAX), None);
        assert_eq!(
            PageIndex(3 + (off >> 12)).to_va(start, off),
            Some(GuestVirtAddr(0x4000_3000))
        );
    }

    #[test]
    fn page_in_ram_is_strict() {
        assert!(GuestPhysAddr(0).page_in_ram(4096));
        assert!(!GuestPhysAddr(4096).page_in_ram(4096));
        assert!(!GuestPhysAddr(0).page_in_ram(4095));
        assert!(!GuestPhysAddr(u64::MAX - 10).page_in_ram(u64::MAX));
    }
}
