//! Physical memory as the walker sees it: the [`PhysMem`] trait (64-bit load
//! and compare-and-swap at guest physical addresses) and two safe
//! implementations, over atomics ([`AtomicRam`], `[AtomicU64]`) and over a
//! byte slice ([`CellRam`]).

use core::cell::Cell;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::GuestPhysAddr;

/// Why a [`PhysMem`] access failed. The walker only asks for addresses below
/// the RAM size it is given, 8-byte aligned, so this reports a memory that is
/// smaller than the RAM size the caller claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PhysMemError {
    /// The word is not wholly inside the memory.
    #[error("the 8 bytes at {pa} are outside the memory ({size} bytes)")]
    OutOfRange {
        /// The address asked for.
        pa: GuestPhysAddr,
        /// The size of the memory.
        size: u64,
    },
    /// The address is not a multiple of 8.
    #[error("{pa} is not 8-byte aligned")]
    Misaligned {
        /// The address asked for.
        pa: GuestPhysAddr,
    },
}

/// Guest physical memory with 64-bit atomic access, for the walker.
///
/// Implementations answer for 8-byte aligned addresses; the walker never asks
/// for anything else, nor for anything at or beyond the RAM size it was given.
/// Values are little endian (x86-64). The supervisor implements this over its
/// shared mapping of the RAM memfd with atomics (the guest writes the tables
/// concurrently), e.g. by viewing the mapping as `&[AtomicU64]`, which already
/// implements it.
pub trait PhysMem {
    /// Load the 64-bit word at `pa` (acquire ordering or stronger, so a table
    /// page linked after being filled is seen filled).
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError>;

    /// Atomically replace the word at `pa` with `new` if it equals `current`.
    /// `Ok(Ok(current))` when it was replaced, `Ok(Err(actual))` with the
    /// value found when it was not (like [`AtomicU64::compare_exchange`]).
    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError>;

    /// Store `value` at `pa` (used by the builder, never by the walker). The
    /// default is a compare-and-swap loop; implementations may do better.
    #[inline]
    fn store(&self, pa: GuestPhysAddr, value: u64) -> Result<(), PhysMemError> {
        let mut current = self.load(pa)?;
        loop {
            match self.compare_exchange(pa, current, value)? {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

impl<M: PhysMem + ?Sized> PhysMem for &M {
    #[inline]
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
        (**self).load(pa)
    }

    #[inline]
    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError> {
        (**self).compare_exchange(pa, current, new)
    }

    #[inline]
    fn store(&self, pa: GuestPhysAddr, value: u64) -> Result<(), PhysMemError> {
        (**self).store(pa, value)
    }
}

/// The word index of `pa` in a memory of `words` 64-bit words.
#[inline]
fn word_index(pa: GuestPhysAddr, words: usize) -> Result<usize, PhysMemError> {
    if !pa.0.is_multiple_of(8) {
        return Err(PhysMemError::Misaligned { pa });
    }
    let size = (words as u64).saturating_mul(8);
    match usize::try_from(pa.0 / 8) {
        Ok(i) if i < words => Ok(i),
        _ => Err(PhysMemError::OutOfRange { pa, size }),
    }
}

/// Guest RAM as 64-bit atomics: word `i` holds bytes `8i..8i+8`. This is the
/// implementation the supervisor can use over its mapping of the memfd.
impl PhysMem for [AtomicU64] {
    #[inline]
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
        let i = word_index(pa, self.len())?;
        Ok(self[i].load(Ordering::Acquire))
    }

    #[inline]
    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError> {
        let i = word_index(pa, self.len())?;
        Ok(self[i].compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }

    #[inline]
    fn store(&self, pa: GuestPhysAddr, value: u64) -> Result<(), PhysMemError> {
        let i = word_index(pa, self.len())?;
        self[i].store(value, Ordering::Release);
        Ok(())
    }
}

/// Owned guest RAM made of atomics, `Sync`: for tests, benchmarks, fuzzers
/// and concurrent walkers.
#[derive(Debug, Default)]
pub struct AtomicRam {
    words: Box<[AtomicU64]>,
}

impl AtomicRam {
    /// Zeroed RAM of `size` bytes, rounded up to a multiple of 8.
    pub fn new(size: usize) -> AtomicRam {
        AtomicRam {
            words: (0..size.div_ceil(8)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// RAM holding a copy of `bytes`, zero-padded to a multiple of 8.
    pub fn from_bytes(bytes: &[u8]) -> AtomicRam {
        AtomicRam {
            words: bytes
                .chunks(8)
                .map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    AtomicU64::new(u64::from_le_bytes(w))
                })
                .collect(),
        }
    }

    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// The words, e.g. to hand to code written for `&[AtomicU64]`.
    pub fn words(&self) -> &[AtomicU64] {
        &self.words
    }
}

impl PhysMem for AtomicRam {
    #[inline]
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
        self.words.load(pa)
    }

    #[inline]
    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError> {
        self.words.compare_exchange(pa, current, new)
    }

    #[inline]
    fn store(&self, pa: GuestPhysAddr, value: u64) -> Result<(), PhysMemError> {
        self.words.store(pa, value)
    }
}

/// Guest RAM over a borrowed byte slice, for single-threaded users: guests
/// building tables in a buffer, tests, the page-table builder. Not `Sync`:
/// the compare-and-swap is atomic only because nobody else can run.
#[derive(Debug)]
pub struct CellRam<'a> {
    bytes: &'a [Cell<u8>],
}

impl<'a> CellRam<'a> {
    /// View `bytes` as guest RAM (offset 0 is guest physical address 0).
    pub fn new(bytes: &'a mut [u8]) -> CellRam<'a> {
        CellRam {
            bytes: Cell::from_mut(bytes).as_slice_of_cells(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The 8 cells at `pa`.
    fn cells(&self, pa: GuestPhysAddr) -> Result<&'a [Cell<u8>], PhysMemError> {
        if !pa.0.is_multiple_of(8) {
            return Err(PhysMemError::Misaligned { pa });
        }
        let out = PhysMemError::OutOfRange {
            pa,
            size: self.size(),
        };
        let start = usize::try_from(pa.0).map_err(|_| out)?;
        let end = start.checked_add(8).ok_or(out)?;
        self.bytes.get(start..end).ok_or(out)
    }
}

impl PhysMem for CellRam<'_> {
    #[inline]
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
        let mut w = [0u8; 8];
        for (b, c) in w.iter_mut().zip(self.cells(pa)?) {
            *b = c.get();
        }
        Ok(u64::from_le_bytes(w))
    }

    #[inline]
    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError> {
        let actual = self.load(pa)?;
        if actual != current {
            return Ok(Err(actual));
        }
        self.store(pa, new)?;
        Ok(Ok(actual))
    }

    #[inline]
    fn store(&self, pa: GuestPhysAddr, value: u64) -> Result<(), PhysMemError> {
        for (c, b) in self.cells(pa)?.iter().zip(value.to_le_bytes()) {
            c.set(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(mem: &dyn PhysMem, size: u64) {
        let pa = GuestPhysAddr(16);
        mem.store(pa, 0x1122_3344_5566_7788).expect("in range");
        assert_eq!(mem.load(pa), Ok(0x1122_3344_5566_7788));
        assert_eq!(
            mem.compare_exchange(pa, 1, 2),
            Ok(Err(0x1122_3344_5566_7788))
        );
        assert_eq!(
            mem.compare_exchange(pa, 0x1122_3344_5566_7788, 2),
            Ok(Ok(0x1122_3344_5566_7788))
        );
        assert_eq!(mem.load(pa), Ok(2));
        assert_eq!(
            mem.load(GuestPhysAddr(size)),
            Err(PhysMemError::OutOfRange {
                pa: GuestPhysAddr(size),
                size
            })
        );
        assert_eq!(
            mem.load(GuestPhysAddr(u64::MAX - 7)),
            Err(PhysMemError::OutOfRange {
                pa: GuestPhysAddr(u64::MAX - 7),
                size
            })
        );
        assert_eq!(
            mem.load(GuestPhysAddr(3)),
            Err(PhysMemError::Misaligned {
                pa: GuestPhysAddr(3)
            })
        );
    }

    #[test]
    fn atomic_ram_loads_cas_and_bounds() {
        let ram = AtomicRam::new(64);
        exercise(&ram, 64);
        let bytes = ram.to_bytes();
        assert_eq!(bytes[16], 2);
        let copy = AtomicRam::from_bytes(&bytes[..60]);
        assert_eq!(copy.size(), 64);
        assert_eq!(copy.load(GuestPhysAddr(16)), Ok(2));
    }

    #[test]
    fn cell_ram_loads_cas_and_bounds() {
        let mut bytes = vec![0u8; 64];
        exercise(&CellRam::new(&mut bytes), 64);
        assert_eq!(bytes[16], 2, "little endian");
        let mut odd = vec![0u8; 20];
        let ram = CellRam::new(&mut odd);
        assert!(ram.load(GuestPhysAddr(8)).is_ok());
        assert!(ram.load(GuestPhysAddr(16)).is_err(), "only 4 bytes left");
    }
}
