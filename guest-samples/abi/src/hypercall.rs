//! Raw hypercall wrappers: the `syscall` instruction with a number from the
//! ABI section 1 table, and typed wrappers that return `Result<_, Errno>`.
//!
//! Without vkrun every hypercall answers `-ENOSYS`; [`vk_info`] is the
//! conventional way for a guest to find out whether it is supervised.

use core::arch::asm;
use core::mem::size_of;

use crate::{Hypercall, TrapFrame, VextFrame, VkInfo, vmspace_mmap_prot_flags};

/// A Linux errno value returned by a failed hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(1);
    /// No such vmspace (ABI section 7).
    pub const ENOENT: Errno = Errno(2);
    /// Interrupted by a signal whose handler lacks `SA_RESTART`.
    pub const EINTR: Errno = Errno(4);
    /// The supervisor lost the vmspace's host process.
    pub const EIO: Errno = Errno(5);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(9);
    /// No address left for a mapping (ABI section 4).
    pub const ENOMEM: Errno = Errno(12);
    /// A pointer argument the supervisor could not read or write.
    pub const EFAULT: Errno = Errno(14);
    /// `vmspace_destroy` while a thread runs in the vmspace.
    pub const EBUSY: Errno = Errno(16);
    /// `vmspace_create` with an id already in use.
    pub const EEXIST: Errno = Errno(17);
    /// An argument outside what the ABI allows.
    pub const EINVAL: Errno = Errno(22);
    /// Not a hypercall the supervisor knows, or no supervisor at all.
    pub const ENOSYS: Errno = Errno(38);
    /// An unsupported `vmspace_ctl` command, or no FSGSBASE on the host.
    pub const EOPNOTSUPP: Errno = Errno(95);

    /// The symbolic name of the errno values the ABI uses (see the
    /// constants above), `None` for others.
    ///
    /// ```
    /// use vkabi::hypercall::Errno;
    /// assert_eq!(Errno::ENOSYS.name(), Some("ENOSYS"));
    /// assert_eq!(Errno(200).name(), None);
    /// ```
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            4 => "EINTR",
            5 => "EIO",
            9 => "EBADF",
            12 => "ENOMEM",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            22 => "EINVAL",
            38 => "ENOSYS",
            95 => "EOPNOTSUPP",
            _ => return None,
        })
    }
}

/// The name and the number, as strace prints them.
///
/// ```
/// use vkabi::hypercall::Errno;
/// assert_eq!(Errno::ENOSYS.to_string(), "ENOSYS (38)");
/// assert_eq!(Errno(200).to_string(), "errno 200");
/// ```
impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl core::error::Error for Errno {}

/// Issue system call `nr` with six arguments and return the raw result.
///
/// # Safety
/// The caller must uphold whatever the call does to memory: pointer arguments
/// must be valid for the accesses the hypercall (or, without vkrun, the Linux
/// system call of that number) performs.
#[inline(always)]
pub unsafe fn syscall6(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // SAFETY: the `syscall` instruction clobbers only rcx, r11 and rax (the
    // result); memory effects are the caller's contract above.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            in("r8") a4,
            in("r9") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Split a raw return value into a value or an errno (Linux convention).
pub fn result(ret: i64) -> Result<u64, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as u64)
    }
}

/// Issue hypercall `h` with six arguments.
///
/// # Safety
/// As for [`syscall6`].
#[inline(always)]
pub unsafe fn hypercall(h: Hypercall, args: [u64; 6]) -> i64 {
    // SAFETY: forwarded to the caller.
    unsafe { syscall6(h.nr(), args[0], args[1], args[2], args[3], args[4], args[5]) }
}

/// `vk_info`: the supervisor's description of this guest.
pub fn vk_info() -> Result<VkInfo, Errno> {
    let mut info = VkInfo::default();
    // SAFETY: `info` is a valid, writable `VkInfo` of the size passed.
    let ret = unsafe {
        hypercall(
            Hypercall::VkInfo,
            [&raw mut info as u64, size_of::<VkInfo>() as u64, 0, 0, 0, 0],
        )
    };
    result(ret).map(|_| info)
}

/// `vk_info` with an explicit buffer and size (for partial copies and tests).
///
/// # Safety
/// `out` must be writable for `size` bytes, or the call may write through an
/// invalid pointer (the supervisor answers `EFAULT` when it cannot).
pub unsafe fn vk_info_raw(out: *mut u8, size: usize) -> Result<u64, Errno> {
    // SAFETY: forwarded to the caller.
    result(unsafe { hypercall(Hypercall::VkInfo, [out as u64, size as u64, 0, 0, 0, 0]) })
}

/// `vk_mmap(addr, len, prot, flags, fd, off)`: returns the mapped address.
///
/// # Safety
/// With `MAP_FIXED` the call replaces whatever was mapped at `addr`.
pub unsafe fn vk_mmap(
    addr: u64,
    len: u64,
    prot: i32,
    flags: i32,
    fd: i32,
    off: u64,
) -> Result<u64, Errno> {
    // SAFETY: forwarded to the caller.
    result(unsafe {
        hypercall(
            Hypercall::VkMmap,
            [addr, len, prot as u64, flags as u64, fd as u64, off],
        )
    })
}

/// `mcontrol(addr, len, behav, value)`.
pub fn mcontrol(addr: u64, len: u64, behav: i32, value: u64) -> Result<(), Errno> {
    // SAFETY: mcontrol reads and writes no guest memory through its arguments;
    // at worst it drops translations, which the guest asked for.
    result(unsafe { hypercall(Hypercall::Mcontrol, [addr, len, behav as u64, value, 0, 0]) })
        .map(drop)
}

/// `vmspace_create(id, type, data)`.
pub fn vmspace_create(id: u64, kind: i32, data: u64) -> Result<(), Errno> {
    // SAFETY: no guest memory is accessed through the arguments.
    result(unsafe { hypercall(Hypercall::VmspaceCreate, [id, kind as u64, data, 0, 0, 0]) })
        .map(drop)
}

/// `vmspace_destroy(id)`.
pub fn vmspace_destroy(id: u64) -> Result<(), Errno> {
    // SAFETY: no guest memory is accessed through the arguments.
    result(unsafe { hypercall(Hypercall::VmspaceDestroy, [id, 0, 0, 0, 0, 0]) }).map(drop)
}

/// `vmspace_ctl(id, cmd, tf, vf)`: with `VMSPACE_CTL_RUN`, runs the user
/// context until it traps and updates `tf`.
///
/// A RUN takes the fast path ([`crate::fastrun`]) when vkrun offers it and
/// the hypercall otherwise; the two behave the same (ABI section 7).
pub fn vmspace_ctl(id: u64, cmd: i32, tf: &mut TrapFrame, vf: &mut VextFrame) -> Result<(), Errno> {
    if let Some(r) = crate::fastrun::run(id, cmd, tf, vf) {
        return r;
    }
    // SAFETY: `tf` and `vf` are valid, exclusive references of the ABI's sizes.
    result(unsafe {
        hypercall(
            Hypercall::VmspaceCtl,
            [
                id,
                cmd as u64,
                tf as *mut TrapFrame as u64,
                vf as *mut VextFrame as u64,
                0,
                0,
            ],
        )
    })
    .map(drop)
}

/// `vmspace_mmap(id, addr, len, prot, flags, fd, off)`: `prot` and `flags`
/// share the fourth register (ABI section 1).
pub fn vmspace_mmap(
    id: u64,
    addr: u64,
    len: u64,
    prot: i32,
    flags: i32,
    fd: i32,
    off: u64,
) -> Result<u64, Errno> {
    // SAFETY: the mapping is made in the vmspace, not in the caller.
    result(unsafe {
        hypercall(
            Hypercall::VmspaceMmap,
            [
                id,
                addr,
                len,
                vmspace_mmap_prot_flags(prot, flags),
                fd as u64,
                off,
            ],
        )
    })
}

/// `vmspace_munmap(id, addr, len)`.
pub fn vmspace_munmap(id: u64, addr: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: the mapping is removed from the vmspace, not from the caller.
    result(unsafe { hypercall(Hypercall::VmspaceMunmap, [id, addr, len, 0, 0, 0]) }).map(drop)
}

/// `vmspace_mcontrol(id, addr, len, behav, value)`.
pub fn vmspace_mcontrol(id: u64, addr: u64, len: u64, behav: i32, value: u64) -> Result<(), Errno> {
    // SAFETY: acts on the vmspace only.
    result(unsafe {
        hypercall(
            Hypercall::VmspaceMcontrol,
            [id, addr, len, behav as u64, value, 0],
        )
    })
    .map(drop)
}

/// `vmspace_pread(id, buf, n, flags, vaddr)`: copy from the vmspace into `buf`.
pub fn vmspace_pread(id: u64, buf: &mut [u8], flags: i32, vaddr: u64) -> Result<usize, Errno> {
    // SAFETY: `buf` is writable for its length.
    result(unsafe {
        hypercall(
            Hypercall::VmspacePread,
            [
                id,
                buf.as_mut_ptr() as u64,
                buf.len() as u64,
                flags as u64,
                vaddr,
                0,
            ],
        )
    })
    .map(|n| n as usize)
}

/// `vmspace_pwrite(id, buf, n, flags, vaddr)`: copy `buf` into the vmspace.
pub fn vmspace_pwrite(id: u64, buf: &[u8], flags: i32, vaddr: u64) -> Result<usize, Errno> {
    // SAFETY: `buf` is readable for its length.
    result(unsafe {
        hypercall(
            Hypercall::VmspacePwrite,
            [
                id,
                buf.as_ptr() as u64,
                buf.len() as u64,
                flags as u64,
                vaddr,
                0,
            ],
        )
    })
    .map(|n| n as usize)
}
