//! userfaultfd(2) control from the supervisor: the API handshake, range
//! registration, wake-ups and fault messages (ioctl_userfaultfd(2)).
//!
//! Written here rather than taken from the `userfaultfd` crate: that crate's
//! `-sys` half generates its bindings with bindgen at build time, which needs
//! libclang on every build machine; the handful of structs below are the
//! stable kernel ABI.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;

const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`: the event byte of a page-fault message.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault arm is decoded.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
/// The `UFFDIO_REGISTER` request number, for the agent, which registers
/// ranges in the guest with a `struct uffdio_register` of 32 bytes.
pub const UFFDIO_REGISTER: u64 =
    nix::request_code_readwrite!(0xAA, 0x00, size_of::<UffdioRegister>()) as u64;
/// The size of `struct uffdio_register`.
pub const UFFDIO_REGISTER_SIZE: usize = size_of::<UffdioRegister>();
nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);

/// A page fault reported by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address (not page-aligned).
    pub address: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// The faulting thread.
    pub tid: i32,
}

/// A userfaultfd context bound to a guest's mm (created in the guest, pulled
/// into the supervisor with `pidfd_getfd`).
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

/// Whether this process may create a userfaultfd that also reports faults
/// taken in kernel mode (no `UFFD_USER_MODE_ONLY`): Linux allows it with
/// `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd = 1`. Guests' system
/// calls on window addresses need it. Creates one descriptor and closes it.
pub fn kernel_faults_allowed() -> bool {
    // SAFETY: userfaultfd(2) takes flags by value and returns a new
    // descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
    true
}

impl Userfault {
    /// Complete the API handshake on `fd` (asking for thread ids).
    pub fn new(fd: OwnedFd) -> Result<Self, Errno> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_THREAD_ID,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api for the ioctl.
        unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }?;
        Ok(Self { fd })
    }

    /// Make reads block (the descriptor is shared with the guest's copy, so
    /// this is the guest-side reader's mode too).
    pub fn set_blocking(&self) -> Result<(), Errno> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map(drop)
    }

    /// Make reads return `EAGAIN` when nothing is pending.
    pub fn set_nonblocking(&self) -> Result<(), Errno> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
    }

    /// Register `[start, start+len)` for missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid uffdio_register for the ioctl.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }.map(drop)
    }

    /// Wake the threads waiting on faults in `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid uffdio_range; UFFDIO_WAKE only reads it
        // (the kernel declares it _IOR).
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut range) }.map(drop)
    }

    /// Read pending messages (the descriptor is non-blocking): page faults
    /// are returned, other events skipped. `Ok(empty)` when none is pending.
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> Result<(), Errno> {
        let mut msgs = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            flags: 0,
            address: 0,
            ptid: 0,
            pad: 0,
        }; 32];
        // SAFETY: the buffer is valid for its size; the kernel writes whole
        // messages of the struct's layout.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN => Ok(()),
                e => Err(e),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(
            msgs[..count]
                .iter()
                .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
                .map(|m| PageFault {
                    address: m.address,
                    write: m.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    tid: m.ptid as i32,
                }),
        );
        Ok(())
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// `pidfd_open(pid)` then `pidfd_getfd(fd)`: a duplicate of descriptor `fd`
/// of process `pid` (needs ptrace access, which the tracer has).
pub fn steal_fd(pid: i32, fd: i32) -> Result<OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: integer-only system calls; a returned descriptor is new and
    // owned by nobody else.
    unsafe {
        let pidfd = Errno::result(libc::syscall(libc::SYS_pidfd_open, pid, 0))? as i32;
        let pidfd = OwnedFd::from_raw_fd(pidfd);
        let got = Errno::result(libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd,
            0,
        ))? as i32;
        Ok(OwnedFd::from_raw_fd(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_request_is_the_kernels() {
        // _IOWR(0xAA, 0x00, struct uffdio_register) on x86-64.
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_REGISTER_SIZE, 32);
    }
}
