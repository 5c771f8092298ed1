//! Guest RAM (ABI section 2): one unlinked, sealed memfd of exactly the `-m`
//! size, inherited by the guest and mapped by the supervisor.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::AtomicU64;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::sys::region::SharedRegion;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// creating the RAM memfd failed
    #[error("cannot create the guest RAM memfd: {0}")]
    Create(#[source] Errno),
    /// the memfd could not be sized
    #[error("cannot size guest RAM to {size} bytes: {source}")]
    Size {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// the seals could not be applied
    #[error("cannot seal guest RAM: {0}")]
    Seal(#[source] Errno),
    /// the supervisor could not map the memfd
    #[error("cannot map {size} bytes of guest RAM in the supervisor: {source}")]
    Map {
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The guest's physical memory: the memfd and the supervisor's shared mapping
/// of it (used to read and update page tables). Dropping it unmaps and closes;
/// the memory itself is freed when the last guest process holding the fd exits.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    map: SharedRegion,
    size: u64,
}

impl GuestRam {
    /// Create RAM of `size` bytes (a positive multiple of the page size,
    /// checked by the caller): sparse, sealed against grow, shrink and
    /// further sealing, close-on-exec in the supervisor.
    pub fn create(size: u64) -> Result<Self, RamError> {
        let fd = memfd_create(
            c"vkrun-guest-ram",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(RamError::Create)?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|source| RamError::Size { size, source })?;
        let seals = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(RamError::Seal)?;
        let map =
            SharedRegion::map(&file, size).map_err(|source| RamError::Map { size, source })?;
        Ok(Self { file, map, size })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd's descriptor number in the supervisor (and, at start, in the
    /// guest, which inherits it).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// RAM as 64-bit words, for walking page tables that guest threads
    /// update concurrently (every access is atomic). The memfd is sealed
    /// against shrinking, so no access can fault.
    pub fn words(&self) -> &[AtomicU64] {
        self.map.words()
    }
}

impl GuestRam {
    /// Copy RAM `[pa, pa + out.len())` to `out` (`EFAULT` beyond RAM).
    /// Through the memfd, so concurrent guest writes are no data race here.
    pub fn read(&self, pa: u64, out: &mut [u8]) -> Result<(), Errno> {
        self.check(pa, out.len())?;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, out, pa).map_err(|_| Errno::EIO)
    }

    /// Copy `data` to RAM at `pa` (`EFAULT` beyond RAM).
    pub fn write(&self, pa: u64, data: &[u8]) -> Result<(), Errno> {
        self.check(pa, data.len())?;
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, pa).map_err(|_| Errno::EIO)
    }

    fn check(&self, pa: u64, len: usize) -> Result<(), Errno> {
        match pa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }
}

impl AsFd for GuestRam {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_sized_and_sealed() {
        let ram = GuestRam::create(1 << 20).expect("memfd");
        assert_eq!(ram.file.metadata().expect("stat").len(), 1 << 20);
        assert_eq!(ram.size(), 1 << 20);
        let err = ram.file.set_len(2 << 20).expect_err("grow must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let err = ram.file.set_len(4096).expect_err("shrink must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let seals = fcntl(&ram.file, FcntlArg::F_GET_SEALS).expect("seals");
        let want = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        assert_eq!(seals, want.bits());
    }

    #[test]
    fn reads_and_writes_stay_inside_ram() {
        let ram = GuestRam::create(2 * 4096).expect("memfd");
        ram.write(4096 - 2, b"abcd").expect("write across a page");
        let mut out = [0u8; 4];
        ram.read(4096 - 2, &mut out).expect("read");
        assert_eq!(&out, b"abcd");
        assert_eq!(ram.read(2 * 4096 - 1, &mut out), Err(Errno::EFAULT));
        assert_eq!(ram.write(u64::MAX - 1, b"ab"), Err(Errno::EFAULT));
    }

    #[test]
    fn untouched_ram_costs_nothing() {
        let ram = GuestRam::create(1 << 30).expect("1 GiB memfd");
        let blocks = std::fs::metadata(format!("/proc/self/fd/{}", ram.raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
            .expect("stat");
        assert_eq!(blocks, 0);
    }
}
