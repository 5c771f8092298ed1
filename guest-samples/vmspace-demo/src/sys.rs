//! The guest's one `unsafe` step outside the user-program blobs: mapping
//! guest RAM (ABI section 2) as the direct map (DMAP) and viewing it as
//! 64-bit atomics, the form `vpte`'s builder and walker take.

use std::io;
use std::ptr;
use std::sync::atomic::AtomicU64;

use vkabi::PAGE_SIZE;

/// Map all of guest RAM (`ram_fd`, `MAP_SHARED`, `size` bytes) and view it
/// as 64-bit atomics: word `i` is guest physical bytes `8i..8i+8`.
///
/// The mapping is never unmapped: the slice lives for the rest of the
/// program.
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
    // Others (the vmspace's user code through its window, the supervisor's
    // walker setting A and M) write the same memory; this program only ever
    // accesses it through these atomics, as with any MAP_SHARED memory that
    // another process writes.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<AtomicU64>(), len / 8) })
}
