//! Tracee memory: typed remote addresses, read and written with
//! `process_vm_readv`/`process_vm_writev` (never dereferenced locally).

use std::io::{IoSlice, IoSliceMut};

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

/// An address in a tracee's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteAddr(pub u64);

impl std::fmt::LowerHex for RemoteAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Copy `bytes` to `addr` in task `tid`. A partial copy (the range crosses
/// into unmapped or read-only memory) is `EFAULT`, like a kernel copyout.
pub fn write_bytes(tid: Pid, addr: RemoteAddr, bytes: &[u8]) -> Result<(), Errno> {
    if bytes.is_empty() {
        return Ok(());
    }
    let base = usize::try_from(addr.0).map_err(|_| Errno::EFAULT)?;
    base.checked_add(bytes.len()).ok_or(Errno::EFAULT)?;
    let remote = [RemoteIoVec {
        base,
        len: bytes.len(),
    }];
    match process_vm_writev(tid, &[IoSlice::new(bytes)], &remote) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(Errno::EFAULT),
        Err(Errno::ESRCH) => Err(Errno::ESRCH),
        Err(_) => Err(Errno::EFAULT),
    }
}

/// Copy `buf.len()` bytes from `addr` in task `tid`; a partial copy is `EFAULT`.
pub fn read_bytes(tid: Pid, addr: RemoteAddr, buf: &mut [u8]) -> Result<(), Errno> {
    if buf.is_empty() {
        return Ok(());
    }
    let base = usize::try_from(addr.0).map_err(|_| Errno::EFAULT)?;
    base.checked_add(buf.len()).ok_or(Errno::EFAULT)?;
    let len = buf.len();
    let remote = [RemoteIoVec { base, len }];
    match process_vm_readv(tid, &mut [IoSliceMut::new(buf)], &remote) {
        Ok(n) if n == len => Ok(()),
        Ok(_) => Err(Errno::EFAULT),
        Err(Errno::ESRCH) => Err(Errno::ESRCH),
        Err(_) => Err(Errno::EFAULT),
    }
}

/// Copy two buffers from two addresses of task `tid` in one system call
/// (a RUN's trapframe and vextframe); any partial copy is `EFAULT`.
pub fn read_two(
    tid: Pid,
    a: (RemoteAddr, &mut [u8]),
    b: (RemoteAddr, &mut [u8]),
) -> Result<(), Errno> {
    let remote = [remote_iov(a.0, a.1.len())?, remote_iov(b.0, b.1.len())?];
    let want = a.1.len() + b.1.len();
    match process_vm_readv(
        tid,
        &mut [IoSliceMut::new(a.1), IoSliceMut::new(b.1)],
        &remote,
    ) {
        Ok(n) if n == want => Ok(()),
        Err(Errno::ESRCH) => Err(Errno::ESRCH),
        _ => Err(Errno::EFAULT),
    }
}

/// Copy two buffers to two addresses of task `tid` in one system call;
/// any partial copy is `EFAULT`.
pub fn write_two(tid: Pid, a: (RemoteAddr, &[u8]), b: (RemoteAddr, &[u8])) -> Result<(), Errno> {
    let remote = [remote_iov(a.0, a.1.len())?, remote_iov(b.0, b.1.len())?];
    let want = a.1.len() + b.1.len();
    match process_vm_writev(tid, &[IoSlice::new(a.1), IoSlice::new(b.1)], &remote) {
        Ok(n) if n == want => Ok(()),
        Err(Errno::ESRCH) => Err(Errno::ESRCH),
        _ => Err(Errno::EFAULT),
    }
}

fn remote_iov(addr: RemoteAddr, len: usize) -> Result<RemoteIoVec, Errno> {
    let base = usize::try_from(addr.0).map_err(|_| Errno::EFAULT)?;
    base.checked_add(len).ok_or(Errno::EFAULT)?;
    Ok(RemoteIoVec { base, len })
}
