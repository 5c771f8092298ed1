//! The memory calls: `mmap` (anonymous, private file copies, shared file
//! mappings written back), `munmap`, `mprotect`, `madvise`, `mremap`,
//! `msync`, `brk`, each invalidating what it took away (ABI section 5).

use super::{SysResult, host};
use crate::kernel::{Kernel, KernelError, Proc};
use crate::mm::{MIN_ADDR, PROT_EXEC, PROT_READ, PROT_WRITE, page_up};
use crate::process;

/// `mremap(old, old_len, new_len, flags, new_addr)`: shrink in place, grow
/// in place when the room after is free, else (`MREMAP_MAYMOVE`) move the
/// pages (their leaves, not their bytes) to a free range or (`MREMAP_FIXED`)
/// to `new_addr`. The old range must lie in one area.
pub(super) fn mremap(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    const MAYMOVE: u64 = 1;
    const FIXED: u64 = 2;
    let (old, old_len, new_len, flags, new_addr) = (a[0], a[1], a[2], a[3], a[4]);
    if !old.is_multiple_of(vkabi::PAGE_SIZE)
        || flags & !(MAYMOVE | FIXED) != 0
        || (flags & FIXED != 0 && flags & MAYMOVE == 0)
        || new_len == 0
        || old_len == 0
    {
        return Err(libc::EINVAL);
    }
    let (old_len, new_len) = (page_up(old_len), page_up(new_len));
    let old_end = old.checked_add(old_len).ok_or(libc::EFAULT)?;
    let area = p.mm.find(old).ok_or(libc::EFAULT)?;
    if old_end > area.end || new_len > k.user_max {
        return Err(libc::EFAULT);
    }
    // A shared file mapping is written back first; its new range is
    // backed by the same file from the same offset.
    process::writeback(k, p, old, old_end, true)?;
    let rebacked = |k: &mut Kernel, p: &mut Proc, at: u64, len: u64| {
        if let Some(b) = area.file {
            let off = b.off + (old - area.start);
            p.mm.back_with(&k.ram, at, at + len, b.fd, off);
        }
        process::sync_map_fds(k, p);
    };
    if flags & FIXED == 0 {
        if new_len <= old_len {
            if new_len < old_len && p.mm.remove(&k.ram, &mut k.frames, old + new_len, old_end) {
                inval(p, old + new_len, old_end)?;
            }
            process::sync_map_fds(k, p);
            return Ok(old);
        }
        let grown = old.checked_add(new_len).ok_or(libc::ENOMEM)?;
        if grown <= k.user_max && !p.mm.overlaps(old_end, grown) {
            p.mm.add_area(old_end, grown, area.prot, area.shared);
            rebacked(k, p, old, new_len);
            return Ok(old);
        }
        if flags & MAYMOVE == 0 {
            return Err(libc::ENOMEM);
        }
    }
    let to = if flags & FIXED != 0 {
        let end = new_addr.checked_add(new_len).ok_or(libc::EINVAL)?;
        if !new_addr.is_multiple_of(vkabi::PAGE_SIZE)
            || new_addr < MIN_ADDR
            || end > k.user_max
            || (new_addr < old_end && old < end)
        {
            return Err(libc::EINVAL);
        }
        process::writeback(k, p, new_addr, end, false)?;
        if p.mm.remove(&k.ram, &mut k.frames, new_addr, end) {
            inval(p, new_addr, end)?;
        }
        new_addr
    } else {
        p.mm.free_range(new_len).ok_or(libc::ENOMEM)?
    };
    let moved = old_len.min(new_len);
    p.mm.move_pages(&k.ram, &mut k.frames, old, to, moved, &area)
        .map_err(|_| libc::ENOMEM)?;
    if new_len > moved {
        p.mm.add_area(to + moved, to + new_len, area.prot, area.shared);
    }
    p.mm.remove(&k.ram, &mut k.frames, old, old_end);
    inval(p, old, old_end)?;
    rebacked(k, p, to, new_len);
    Ok(to)
}

/// `msync(addr, len, flags)`: the range must be mapped (`ENOMEM`); the
/// dirty pages of its shared file mappings are written back.
pub(super) fn msync(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, flags: u64) -> SysResult {
    const MS_ASYNC: u64 = 1;
    const MS_INVALIDATE: u64 = 2;
    const MS_SYNC: u64 = 4;
    if !addr.is_multiple_of(vkabi::PAGE_SIZE)
        || flags & !(MS_ASYNC | MS_INVALIDATE | MS_SYNC) != 0
        || flags & (MS_ASYNC | MS_SYNC) == MS_ASYNC | MS_SYNC
    {
        return Err(libc::EINVAL);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::ENOMEM)?;
    if !p.mm.covered(addr, end) {
        return Err(libc::ENOMEM);
    }
    process::writeback(k, p, addr, end, true)?;
    Ok(0)
}

/// `MADV_INVAL` after a change that removed pages or rights.
fn inval(p: &Proc, start: u64, end: u64) -> Result<(), i32> {
    p.vm.inval(start, end - start).map_err(|e| e.errno.0)
}

/// Where the minikernel's duplicates of mapped files' descriptors go.
const MAP_FD_MIN: u64 = 1001;

/// `mmap(addr, len, prot, flags, fd, off)`: anonymous memory (demand-zero),
/// or a copy of a file's bytes: private, or shared and written back to
/// the file when the file is open for writing (only the pages written, as
/// far as the file reaches, on `msync`, `munmap`, exit and `execve`; the
/// copy does not see later writes to the file by other means).
pub(super) fn mmap(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    const MAP_SHARED: u64 = 0x01;
    const MAP_FIXED: u64 = 0x10;
    const MAP_ANONYMOUS: u64 = 0x20;
    const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
    let (addr, len, prot, flags, fd, off) = (a[0], a[1], a[2] as i32, a[3], a[4], a[5]);
    if len == 0 || !off.is_multiple_of(vkabi::PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    let len = page_up(len);
    if len > k.user_max {
        return Err(libc::ENOMEM);
    }
    let anon = flags & MAP_ANONYMOUS != 0;
    // A shared mapping of a file open for reading and writing is written
    // back (msync, munmap, exit, execve); one open read-only cannot be
    // writable.
    let mut backed = false;
    if !anon {
        if k.reserved_fd(fd) {
            return Err(libc::EBADF);
        }
        let fl = host(
            libc::SYS_fcntl as u64,
            [fd, libc::F_GETFL as u64, 0, 0, 0, 0],
        )? as i32;
        if flags & MAP_SHARED != 0 {
            let rdwr = fl & libc::O_ACCMODE == libc::O_RDWR;
            if prot & PROT_WRITE != 0 && !rdwr {
                return Err(libc::EACCES);
            }
            backed = rdwr;
        }
    }
    let fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0;
    let in_range = |s: u64| s >= MIN_ADDR && s.checked_add(len).is_some_and(|e| e <= k.user_max);
    let start = if fixed {
        if !addr.is_multiple_of(vkabi::PAGE_SIZE) {
            return Err(libc::EINVAL);
        }
        if !in_range(addr) {
            return Err(libc::ENOMEM);
        }
        if flags & MAP_FIXED_NOREPLACE != 0 && p.mm.overlaps(addr, addr + len) {
            return Err(libc::EEXIST);
        }
        process::writeback(k, p, addr, addr + len, false)?;
        if p.mm.remove(&k.ram, &mut k.frames, addr, addr + len) {
            inval(p, addr, addr + len)?;
        }
        addr
    } else if addr != 0
        && addr % vkabi::PAGE_SIZE == 0
        && in_range(addr)
        && !p.mm.overlaps(addr, addr + len)
    {
        addr
    } else {
        p.mm.free_range(len).ok_or(libc::ENOMEM)?
    };
    let prot = prot & (PROT_READ | PROT_WRITE | PROT_EXEC);
    p.mm.add_area(start, start + len, prot, flags & MAP_SHARED != 0);
    if !anon {
        let mut data = vec![0u8; len as usize];
        let mut got = 0usize;
        while got < data.len() {
            let chunk = &mut data[got..];
            // SAFETY: pread writes at most chunk.len() bytes into chunk.
            let n = unsafe {
                libc::pread(
                    fd as i32,
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    (off + got as u64) as i64,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                p.mm.remove(&k.ram, &mut k.frames, start, start + len);
                return Err(if e == libc::EISDIR { libc::ENODEV } else { e });
            }
            if n == 0 {
                break;
            }
            got += n as usize;
        }
        let loaded =
            p.mm.load(&k.ram, &mut k.frames, start, &data[..got])
                .map_err(|_| libc::ENOMEM)?;
        debug_assert!(loaded, "the area was just added");
        if backed {
            let dup = host(
                libc::SYS_fcntl as u64,
                [fd, libc::F_DUPFD_CLOEXEC as u64, MAP_FD_MIN, 0, 0, 0],
            );
            let dup = match dup {
                Ok(d) => d as i32,
                Err(e) => {
                    p.mm.remove(&k.ram, &mut k.frames, start, start + len);
                    return Err(e);
                }
            };
            k.map_fds.push(dup);
            p.mm.back_with(&k.ram, start, start + len, dup, off);
        }
    }
    process::sync_map_fds(k, p);
    Ok(start)
}

/// `munmap(addr, len)`.
pub(super) fn munmap(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64) -> SysResult {
    if !addr.is_multiple_of(vkabi::PAGE_SIZE) || len == 0 {
        return Err(libc::EINVAL);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::EINVAL)?;
    if end > k.user_max {
        return Err(libc::EINVAL);
    }
    process::writeback(k, p, addr, end, false)?;
    if p.mm.remove(&k.ram, &mut k.frames, addr, end) {
        inval(p, addr, end)?;
    }
    process::sync_map_fds(k, p);
    Ok(0)
}

/// `mprotect(addr, len, prot)`.
pub(super) fn mprotect(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, prot: i32) -> SysResult {
    if !addr.is_multiple_of(vkabi::PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    if len == 0 {
        return Ok(0);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::ENOMEM)?;
    let prot = prot & (PROT_READ | PROT_WRITE | PROT_EXEC);
    match p.mm.protect(&k.ram, addr, end, prot) {
        Err(()) => Err(libc::ENOMEM),
        Ok(true) => inval(p, addr, end).map(|()| 0),
        Ok(false) => Ok(0),
    }
}

/// `madvise`: `MADV_DONTNEED` and `MADV_FREE` drop the pages of private
/// areas (they read back as zero; shared ones keep their contents, as
/// Linux's page cache does); other advice is accepted and ignored.
pub(super) fn madvise(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, advice: i32) -> SysResult {
    if !addr.is_multiple_of(vkabi::PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::EINVAL)?;
    if (advice == libc::MADV_DONTNEED || advice == libc::MADV_FREE)
        && p.mm.drop_private_pages(&k.ram, &mut k.frames, addr, end)
    {
        inval(p, addr, end)?;
    }
    Ok(0)
}

/// `brk(addr)`: move the break (within the room above the program); the
/// answer is the break.
pub(super) fn brk(k: &mut Kernel, p: &mut Proc, addr: u64) -> Result<u64, KernelError> {
    let mm = &mut p.mm;
    if addr < mm.brk_start {
        return Ok(mm.brk);
    }
    let (old, new) = (page_up(mm.brk), page_up(addr));
    if new > old {
        if new > k.user_max || mm.overlaps(old, new) {
            return Ok(mm.brk);
        }
        mm.add(old, new, PROT_READ | PROT_WRITE);
        // The first pages of the growth are written at once (a C library
        // puts its thread block there): frames now save the faults.
        let now = new.min(old + crate::mm::BRK_NOW * vkabi::PAGE_SIZE);
        mm.populate_range(&k.ram, &mut k.frames, old, now);
    } else if new < old && mm.remove(&k.ram, &mut k.frames, new, old) {
        p.vm.inval(new, old - new)?;
    }
    p.mm.brk = addr;
    Ok(addr)
}
