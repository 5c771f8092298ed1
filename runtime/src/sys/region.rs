//! Memory shared with another process: a memfd mapped `MAP_SHARED` both by
//! vkrun and by a guest process or a stub, read and written here as atomic
//! words at offsets. The other side may be hostile and write any word at
//! any time; what a word holds is checked by its user, never trusted.

use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

/// vkrun's mapping of a shared region. Offsets are checked: an offset out of
/// bounds or misaligned is a bug in vkrun and panics.
#[derive(Debug)]
pub struct SharedRegion {
    map: MmapRaw,
}

impl SharedRegion {
    /// A new memfd of `len` bytes named `name` (close-on-exec) and vkrun's
    /// mapping of it; the file is what the other process maps. It is sealed
    /// against growing and shrinking: whoever else holds it (a guest given
    /// it for the fast RUN) cannot make vkrun's accesses fault.
    pub fn create(name: &std::ffi::CStr, len: u64) -> Result<(File, Self), Errno> {
        let file = File::from(memfd_create(
            name,
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?);
        file.set_len(len).map_err(|_| Errno::ENOMEM)?;
        let seals = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
        let region = Self::map(&file, len).map_err(|_| Errno::ENOMEM)?;
        Ok((file, region))
    }

    /// Map `len` bytes of `file` shared.
    pub fn map(file: &File, len: u64) -> std::io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| std::io::Error::from(Errno::ENOMEM))?;
        Ok(Self {
            map: MmapOptions::new().len(len).map_raw(file)?,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn at<T>(&self, off: usize) -> *mut T {
        let size = size_of::<T>();
        assert!(
            off.is_multiple_of(size) && off.checked_add(size).is_some_and(|e| e <= self.len()),
            "shared-region offset {off:#x} in bounds and aligned"
        );
        // SAFETY: in bounds of the mapping (asserted above).
        unsafe { self.map.as_mut_ptr().add(off).cast::<T>() }
    }

    /// The 32-bit word at `off`.
    pub fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: in bounds and aligned (`at` asserts it); the mapping lives
        // as long as `self`; every access to it is atomic.
        unsafe { &*self.at::<AtomicU32>(off) }
    }

    /// The 64-bit word at `off`.
    pub fn qword(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as for `word`.
        unsafe { &*self.at::<AtomicU64>(off) }
    }

    /// The whole region as 64-bit words (for walking page tables that other
    /// processes update concurrently: every access is atomic).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: a mapping is page-aligned (so aligned for AtomicU64) and
        // `len` bytes long; it lives as long as `self`; concurrent writes by
        // other processes are what atomics permit. A memfd-backed caller
        // seals the file against shrinking, so no access can fault.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU64>(), self.len() / 8) }
    }

    /// Copy `bytes` to `off` (vkrun's own writes before the other side reads
    /// them, or at offsets it reads only after a release store).
    pub fn write(&self, off: usize, bytes: &[u8]) {
        assert!(
            off.checked_add(bytes.len())
                .is_some_and(|e| e <= self.len()),
            "shared-region write at {off:#x} in bounds"
        );
        // SAFETY: in bounds (asserted); our own mapping, which the source
        // slice cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(off),
                bytes.len(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn words_and_writes_land_at_their_offsets() {
        let (_file, r) = SharedRegion::create(c"vkrun-test-region", 8192).expect("memfd");
        r.write(8, &7u64.to_ne_bytes());
        assert_eq!(r.qword(8).load(Ordering::Relaxed), 7);
        r.word(4096).store(3, Ordering::Relaxed);
        assert_eq!(r.words()[512].load(Ordering::Relaxed), 3);
    }

    #[test]
    #[should_panic(expected = "in bounds")]
    fn an_offset_past_the_end_panics() {
        let (_file, r) = SharedRegion::create(c"vkrun-test-region", 4096).expect("memfd");
        r.word(4096);
    }
}
