//! Guest RAM (ABI section 2) mapped as the guest's direct map (DMAP) and
//! viewed as 64-bit atomics, and byte and table access through that view.
//!
//! The mapping is never unmapped: the slice lives for the rest of the
//! program.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use vkabi::PAGE_SIZE;
use vpte::{GuestPhysAddr, Level, PageIndex, Vpte};

/// Map all of guest RAM (`vk_info.ram_fd`, `MAP_SHARED`, `size` bytes) and
/// view it as 64-bit atomics: word `i` is guest physical bytes `8i..8i+8`.
///
/// `size` must be a positive multiple of the page size.
pub fn map_ram(fd: i32, size: u64) -> io::Result<&'static [AtomicU64]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "RAM size");
    let len = usize::try_from(size).map_err(|_| bad())?;
    if len == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(bad());
    }
    // SAFETY: a new shared mapping at an address the kernel picks: nothing
    // that exists is touched.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is page aligned (so aligned for AtomicU64, which
    // has u64's size and alignment), `len` bytes long, readable and writable.
    // It is never unmapped, and the memfd is sealed against shrinking (ABI
    // section 2), so every word stays backed for the rest of the program.
    // Others (vmspaces' user code through their windows, the supervisor's
    // walker setting A and M, other threads) write the same memory; through
    // this slice the program accesses it only as atomics, as with any
    // MAP_SHARED memory that another process writes.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<AtomicU64>(), len / 8) })
}

/// The index of the word at `pa` (8-aligned).
fn word(pa: GuestPhysAddr) -> usize {
    assert!(pa.0.is_multiple_of(8), "word access at {pa}");
    (pa.0 / 8) as usize
}

/// The word at `pa` (8-aligned, inside RAM) of `ram`.
pub fn load(ram: &[AtomicU64], pa: GuestPhysAddr) -> u64 {
    ram[word(pa)].load(Ordering::SeqCst)
}

/// Store `value` in the word at `pa` (8-aligned, inside RAM) of `ram`.
pub fn store(ram: &[AtomicU64], pa: GuestPhysAddr, value: u64) {
    ram[word(pa)].store(value, Ordering::SeqCst);
}

/// Bytes `pa..pa + n` of `ram`.
pub fn read_bytes(ram: &[AtomicU64], pa: GuestPhysAddr, n: usize) -> Vec<u8> {
    (0..n as u64)
        .map(|i| {
            let at = pa.0 + i;
            load(ram, GuestPhysAddr(at & !7)).to_le_bytes()[(at & 7) as usize]
        })
        .collect()
}

/// Write `bytes` at `pa` of `ram`, a word at a time (read, change a byte,
/// store): nothing else may write those words meanwhile.
pub fn write_bytes(ram: &[AtomicU64], pa: GuestPhysAddr, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        let at = pa.0 + i as u64;
        let w = GuestPhysAddr(at & !7);
        let mut v = load(ram, w).to_le_bytes();
        v[(at & 7) as usize] = *b;
        store(ram, w, u64::from_le_bytes(v));
    }
}

/// The entries a walk of `pindex` from the L4 table at `root` visits, read
/// from `ram`: L4, L3, L2, L1 (fewer if it stops at an invalid or PS entry).
pub fn walk_path(ram: &[AtomicU64], root: GuestPhysAddr, pindex: PageIndex) -> Vec<(Level, Vpte)> {
    let mut out = Vec::new();
    let mut table = root;
    for level in [Level::L4, Level::L3, Level::L2, Level::L1] {
        let entry = Vpte(load(
            ram,
            GuestPhysAddr(table.0 + 8 * level.index(pindex) as u64),
        ));
        out.push((level, entry));
        if !entry.is_valid() || entry.is_superpage() {
            break;
        }
        table = entry.frame();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn bytes_written_across_words_read_back() {
        let ram = ram(4);
        write_bytes(&ram, GuestPhysAddr(5), b"0123456789");
        assert_eq!(read_bytes(&ram, GuestPhysAddr(5), 10), b"0123456789");
        assert_eq!(read_bytes(&ram, GuestPhysAddr(4), 1), [0]);
        assert_eq!(
            load(&ram, GuestPhysAddr(8)),
            u64::from_le_bytes(*b"3456789\0")
        );
    }

    #[test]
    fn walk_path_stops_at_an_invalid_entry() {
        let ram = ram(2 * 512);
        // The L4 table at 0: entry 0 names the L3 table at 4096, whose
        // entries are all invalid.
        store(&ram, GuestPhysAddr(0), 4096 | vkabi::VPTE_V);
        let path = walk_path(&ram, GuestPhysAddr(0), PageIndex(0));
        assert_eq!(path.len(), 2);
        assert_eq!(path[0].0, Level::L4);
        assert_eq!(path[1], (Level::L3, Vpte::INVALID));
    }
}
