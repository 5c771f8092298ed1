//! Virtual page table entries ([`Vpte`]) and the levels of the walk
//! ([`Level`]), ABI section 3. The bit values come from `vkabi`.

use core::fmt;

use vkabi::{
    PAGE_SHIFT, VPTE_A, VPTE_ENTRIES, VPTE_FRAME, VPTE_G, VPTE_LEVELS, VPTE_M, VPTE_MANAGED,
    VPTE_NX, VPTE_PS, VPTE_RW, VPTE_TOP_SHIFT, VPTE_U, VPTE_V, VPTE_WIRED,
};

use crate::addr::{GuestPhysAddr, PageIndex};

/// Page-index bits consumed by one table level: log2 of [`VPTE_ENTRIES`] (9).
pub const VPTE_PAGE_BITS: u32 = VPTE_ENTRIES.trailing_zeros();

const _: () = {
    assert!(VPTE_ENTRIES.is_power_of_two());
    assert!(VPTE_TOP_SHIFT == VPTE_LEVELS * VPTE_PAGE_BITS);
    assert!(VPTE_FRAME & VPTE_NX == 0);
};

/// Every flag the ABI names, in the order [`Vpte`]'s `Display` prints them.
const NAMED_BITS: [(u64, &str); 10] = [
    (VPTE_V, "V"),
    (VPTE_RW, "RW"),
    (VPTE_U, "U"),
    (VPTE_A, "A"),
    (VPTE_M, "M"),
    (VPTE_PS, "PS"),
    (VPTE_G, "G"),
    (VPTE_WIRED, "WIRED"),
    (VPTE_MANAGED, "MANAGED"),
    (VPTE_NX, "NX"),
];

/// A virtual page table entry (`vpte_t`), as the guest wrote it.
///
/// `Display` gives the trace form, e.g. `V|RW|A frame=0x1234000`; bits the
/// ABI does not name are printed in hex among the flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Vpte(pub u64);

impl Vpte {
    /// The invalid entry (all zero); also the initial master PDE.
    pub const INVALID: Vpte = Vpte(0);

    /// An entry pointing at the table page `table`: `V|RW|U`, so that the
    /// leaf alone decides protection. `table` should be page aligned; other
    /// bits are masked off by [`VPTE_FRAME`].
    pub const fn table(table: GuestPhysAddr) -> Vpte {
        Vpte((table.0 & VPTE_FRAME) | VPTE_V | VPTE_RW | VPTE_U)
    }

    /// A valid leaf entry for `frame` with the extra `bits` (RW, U, NX, A, M,
    /// PS, G, ...). Frame bits in `bits` are ignored.
    pub const fn leaf(frame: GuestPhysAddr, bits: u64) -> Vpte {
        Vpte((frame.0 & VPTE_FRAME) | (bits & !VPTE_FRAME) | VPTE_V)
    }

    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The frame: `vpte & VPTE_FRAME`, a guest physical address.
    pub const fn frame(self) -> GuestPhysAddr {
        GuestPhysAddr(self.0 & VPTE_FRAME)
    }

    /// The flag bits (everything outside [`VPTE_FRAME`]).
    pub const fn flags(self) -> u64 {
        self.0 & !VPTE_FRAME
    }

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }

    /// The entry with `bits` set.
    #[must_use]
    pub const fn with(self, bits: u64) -> Vpte {
        Vpte(self.0 | bits)
    }

    /// The entry with `bits` cleared.
    #[must_use]
    pub const fn without(self, bits: u64) -> Vpte {
        Vpte(self.0 & !bits)
    }

    /// `VPTE_V`.
    pub const fn is_valid(self) -> bool {
        self.has(VPTE_V)
    }

    /// `VPTE_RW`.
    pub const fn is_writable(self) -> bool {
        self.has(VPTE_RW)
    }

    /// `VPTE_NX`.
    pub const fn is_no_exec(self) -> bool {
        self.has(VPTE_NX)
    }

    /// `VPTE_PS`.
    pub const fn is_superpage(self) -> bool {
        self.has(VPTE_PS)
    }

    /// `VPTE_A`.
    pub const fn is_accessed(self) -> bool {
        self.has(VPTE_A)
    }

    /// `VPTE_M`.
    pub const fn is_modified(self) -> bool {
        self.has(VPTE_M)
    }
}

impl From<u64> for Vpte {
    fn from(raw: u64) -> Vpte {
        Vpte(raw)
    }
}

impl From<Vpte> for u64 {
    fn from(v: Vpte) -> u64 {
        v.0
    }
}

impl fmt::Display for Vpte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.flags();
        let mut first = true;
        for (bit, name) in NAMED_BITS {
            if rest & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
            first = false;
        }
        if first {
            f.write_str("-")?;
        }
        write!(f, " frame={:#x}", self.0 & VPTE_FRAME)
    }
}

impl fmt::Debug for Vpte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vpte({:#x}: {self})", self.0)
    }
}

/// A level of the walk, named after the x86-64 table whose reach it has.
///
/// The master PDE (set by `MADV_SETMAP`) sits above four levels of tables
/// (`VPTE_LEVELS`). An entry at each level covers `1 << shift` pages:
///
/// | level | shift | one entry covers | PS means |
/// |---|---|---|---|
/// | [`Level::Master`] | 36 | the whole 2^48-byte index space | linear map |
/// | [`Level::L4`] | 27 | 512 GiB | 512 GiB superpage |
/// | [`Level::L3`] | 18 | 1 GiB | 1 GiB superpage |
/// | [`Level::L2`] | 9 | 2 MiB | 2 MiB superpage |
/// | [`Level::L1`] | 0 | 4 KiB | nothing: an L1 entry is always a leaf |
///
/// The entry of level `L` lives in the table its parent points at and is
/// picked by `(pindex >> L.shift()) & 511`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The master PDE (never in memory, never written by the host).
    Master,
    /// First table below the master PDE; an entry covers 512 GiB.
    L4,
    /// An entry covers 1 GiB.
    L3,
    /// An entry covers 2 MiB.
    L2,
    /// The last level; an entry maps one 4 KiB page.
    L1,
}

impl Level {
    /// Every level, in walk order.
    pub const ALL: [Level; 5] = [Level::Master, Level::L4, Level::L3, Level::L2, Level::L1];

    /// The page-index shift of an entry at this level.
    pub const fn shift(self) -> u32 {
        match self {
            Level::Master => VPTE_TOP_SHIFT,
            Level::L4 => VPTE_TOP_SHIFT - VPTE_PAGE_BITS,
            Level::L3 => VPTE_TOP_SHIFT - 2 * VPTE_PAGE_BITS,
            Level::L2 => VPTE_TOP_SHIFT - 3 * VPTE_PAGE_BITS,
            Level::L1 => VPTE_TOP_SHIFT - 4 * VPTE_PAGE_BITS,
        }
    }

    /// Number of 4 KiB pages one entry at this level covers.
    pub const fn pages(self) -> u64 {
        1 << self.shift()
    }

    /// Bytes one entry at this level covers.
    pub const fn bytes(self) -> u64 {
        self.pages() << PAGE_SHIFT
    }

    /// The level of the table an entry at this level points at; `None` for
    /// [`Level::L1`].
    pub const fn below(self) -> Option<Level> {
        match self {
            Level::Master => Some(Level::L4),
            Level::L4 => Some(Level::L3),
            Level::L3 => Some(Level::L2),
            Level::L2 => Some(Level::L1),
            Level::L1 => None,
        }
    }

    /// Index of the entry for `pindex` in a table of this level
    /// (`(pindex >> shift) & 511`). Meaningless for the master.
    pub const fn index(self, pindex: PageIndex) -> usize {
        ((pindex.0 >> self.shift()) as usize) & (VPTE_ENTRIES - 1)
    }

    /// The first page index of the region an entry at this level covers.
    pub const fn region_start(self, pindex: PageIndex) -> PageIndex {
        PageIndex(pindex.0 & !(self.pages() - 1))
    }

    /// The short name used in traces: `master`, `L4`, `L3`, `L2`, `L1`.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Master => "master",
            Level::L4 => "L4",
            Level::L3 => "L3",
            Level::L2 => "L2",
            Level::L1 => "L1",
        }
    }

    /// The reach of one entry, for humans: `256 TiB`, `512 GiB`, ... `4 KiB`.
    pub const fn reach(self) -> &'static str {
        match self {
            Level::Master => "256 TiB",
            Level::L4 => "512 GiB",
            Level::L3 => "1 GiB",
            Level::L2 => "2 MiB",
            Level::L1 => "4 KiB",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_flags() {
        let v = Vpte(0x123_4000 | VPTE_V | VPTE_RW | VPTE_A);
        assert_eq!(v.to_string(), "V|RW|A frame=0x1234000");
        assert_eq!(Vpte(0).to_string(), "- frame=0x0");
        let all = Vpte(
            VPTE_V
                | VPTE_RW
                | VPTE_U
                | VPTE_A
                | VPTE_M
                | VPTE_PS
                | VPTE_G
                | VPTE_WIRED
                | VPTE_MANAGED
                | VPTE_NX
                | 0x18
                | 0x5000,
        );
        assert_eq!(
            all.to_string(),
            "V|RW|U|A|M|PS|G|WIRED|MANAGED|NX|0x18 frame=0x5000"
        );
        assert_eq!(Vpte(0x8).to_string(), "0x8 frame=0x0");
    }

    #[test]
    fn levels_cover_what_the_table_says() {
        assert_eq!(Level::Master.bytes(), 1 << 48);
        assert_eq!(Level::L4.bytes(), 512 << 30);
        assert_eq!(Level::L3.bytes(), 1 << 30);
        assert_eq!(Level::L2.bytes(), 2 << 20);
        assert_eq!(Level::L1.bytes(), 4096);
        let p = PageIndex((3 << 27) | (4 << 18) | (5 << 9) | 6);
        assert_eq!(Level::L4.index(p), 3);
        assert_eq!(Level::L3.index(p), 4);
        assert_eq!(Level::L2.index(p), 5);
        assert_eq!(Level::L1.index(p), 6);
        assert_eq!(Level::L2.region_start(p), PageIndex(p.0 - 6));
        let mut walked = vec![Level::Master];
        while let Some(l) = walked.last().and_then(|l| l.below()) {
            walked.push(l);
        }
        assert_eq!(walked, Level::ALL);
    }

    #[test]
    fn constructors_keep_frame_and_flags_apart() {
        let t = Vpte::table(GuestPhysAddr(0x7000));
        assert!(t.is_valid() && t.is_writable() && !t.is_superpage());
        assert_eq!(t.frame(), GuestPhysAddr(0x7000));
        let l = Vpte::leaf(GuestPhysAddr(0x9000), VPTE_NX | 0xF000);
        assert_eq!(l.raw(), 0x9000 | VPTE_NX | VPTE_V);
    }
}
