//! What a vmspace maps (ABI section 4 for `vmspace_mmap`/`munmap`, 5 for
//! `vmspace_mcontrol`) and copying through it (`vmspace_pread`/`pwrite`).
//! Mapping runs on the tracer thread (system calls injected in the stub's
//! main thread); mcontrol and the copies on a hypercall thread.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{MAP_VPAGETABLE, PAGE_SIZE, USER_MAX};

use super::Vmspaces;
use super::space::{Kind, Mapping, Vmspace};
use crate::error::{CallError, errno_or};
use crate::sys::stub::{self, DATA_PATH, DATA_PATH_LEN, STUB_BASE};
use crate::sys::{kcmp, lock};
use crate::tracee::Tracer;
use crate::tracee::inject::Injector;
use crate::tracee::remote::{self, RemoteAddr};
use crate::vpt::Space;

const PAGE: u64 = PAGE_SIZE;

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

impl Vmspaces {
    /// `vmspace_mmap(id, addr, len, prot | flags << 32, fd, off)` from guest
    /// thread `caller` (ABI section 4).
    pub fn mmap(&self, tracer: &Tracer, caller: Pid, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let (addr, len) = (a[1], a[2]);
        let (prot, flags) = (a[3] as u32 as i32, (a[3] >> 32) as u32 as i32);
        let (fd, off) = (a[4] as i32, a[5]);
        let len = match len.checked_add(PAGE - 1) {
            Some(l) if len > 0 => page_down(l),
            _ => return Err(Errno::EINVAL),
        };
        let fixed = flags & libc::MAP_FIXED != 0;
        if len > USER_MAX || (fixed && (addr % PAGE != 0 || addr > USER_MAX - len)) {
            return Err(Errno::EINVAL);
        }
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        let is_ram = || kcmp::same_file(self.ram.as_fd(), caller, fd) == Ok(true);
        let mut inj = Injector::at_trap_stop(tracer, vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let kind = flags & libc::MAP_TYPE;
        let (start, what) = if flags & MAP_VPAGETABLE != 0 {
            if fd < 0 || !is_ram() {
                return Err(Errno::EINVAL);
            }
            let r = self.vpt.map_window(
                &mut inj,
                vm.stub,
                addr,
                len,
                prot,
                flags,
                off,
                Space::Vmspace,
            );
            lock(&self.stub_tids).extend(inj.new_threads.drain(..).map(|t| (t, vm.stub)));
            let start = match r {
                Ok(start) => start,
                Err(CallError::Guest(e)) => return Err(e),
                Err(CallError::Tracee(e)) => return Err(self.inject_failed(&vm, &e)),
            };
            (start, Kind::Window)
        } else {
            // A plain mapping: private anonymous memory, or RAM, linearly.
            let (what, own, stub_fd, stub_off) =
                if kind == libc::MAP_PRIVATE && flags & libc::MAP_ANONYMOUS != 0 {
                    let own = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
                    (Kind::Anon, own, u64::MAX, 0)
                } else if kind == libc::MAP_SHARED && fd >= 0 && is_ram() {
                    if !off.is_multiple_of(PAGE) {
                        return Err(Errno::EINVAL);
                    }
                    let ram_fd = self.stub_ram_fd(&vm, &mut inj)?;
                    (Kind::Linear { off }, libc::MAP_SHARED, ram_fd, off)
                } else {
                    return Err(Errno::EINVAL);
                };
            let allowed = own | libc::MAP_FIXED | libc::MAP_POPULATE | libc::MAP_FIXED_NOREPLACE;
            let flags = (flags & allowed) as u64;
            let args = [addr, len, prot as u64, flags, stub_fd, stub_off];
            (self.map_in_stub(&vm, &mut inj, args)?, what)
        };
        let _ = inj.finish(0);
        lock(&vm.maps).cut(start, start + len);
        if what != Kind::Window {
            // A plain mapping replaced whatever window part was there.
            self.vpt.unmap(vm.stub, start, start + len);
        }
        lock(&vm.maps).insert(
            start,
            Mapping {
                len,
                kind: what,
                prot,
            },
        );
        Ok(start as i64)
    }

    /// `mmap` in the stub, kept below `USER_MAX`.
    fn map_in_stub(&self, vm: &Vmspace, inj: &mut Injector, args: [u64; 6]) -> Result<u64, Errno> {
        let ret = inj
            .syscall(libc::SYS_mmap, args)
            .map_err(|e| self.inject_failed(vm, &e))?;
        let start = errno_or(ret)? as u64;
        if start.checked_add(args[1]).is_none_or(|end| end > USER_MAX) {
            let _ = inj.syscall(libc::SYS_munmap, [start, args[1], 0, 0, 0, 0]);
            return Err(Errno::ENOMEM);
        }
        Ok(start)
    }

    /// The stub's descriptor of RAM, opened on first use (through
    /// `/proc/<vkrun>/fd/N`, the path written to the stub's data page).
    fn stub_ram_fd(&self, vm: &Vmspace, inj: &mut Injector) -> Result<u64, Errno> {
        let mut fd = lock(&vm.ram_fd);
        if let Some(fd) = *fd {
            return Ok(fd);
        }
        let path = format!("/proc/{}/fd/{}\0", std::process::id(), self.ram.raw_fd());
        assert!(path.len() as u64 <= DATA_PATH_LEN);
        vm.region.write(DATA_PATH as usize, path.as_bytes());
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let ret = inj
            .syscall(libc::SYS_open, [STUB_BASE + DATA_PATH, flags, 0, 0, 0, 0])
            .map_err(|e| self.inject_failed(vm, &e))?;
        let n = errno_or(ret)? as u64;
        *fd = Some(n);
        Ok(n)
    }

    /// `vmspace_munmap(id, addr, len)`.
    pub fn munmap(&self, tracer: &Tracer, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let (addr, len) = (a[1], a[2]);
        if len == 0 {
            return Ok(0);
        }
        let start = page_down(addr);
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE - 1))
            .map(page_down)
            .ok_or(Errno::EINVAL)?;
        if end > USER_MAX || !lock(&vm.maps).covered(start, end) {
            return Err(Errno::EINVAL);
        }
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        let mut inj = Injector::at_trap_stop(tracer, vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let ret = inj
            .syscall(libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let _ = inj.finish(0);
        errno_or(ret)?;
        lock(&vm.maps).cut(start, end);
        self.vpt.unmap(vm.stub, start, end);
        Ok(0)
    }

    /// `vmspace_mcontrol(id, addr, len, behav, value)` (ABI section 5).
    pub fn mcontrol(&self, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let args = [a[1], a[2], a[3], a[4], 0, 0];
        self.with_live(&vm, || {
            self.vpt.mcontrol_in(vm.stub, args, |s, e, _windows| {
                lock(&vm.maps).has_non_window(s, e)
            })
        })
    }

    /// `vmspace_pread(id, buf, n, flags, vaddr)` (`write` false) and
    /// `vmspace_pwrite` (`write` true) for guest thread `caller`: copy
    /// through the vmspace's mappings, a page at a time, stopping at the
    /// first byte that is not accessible.
    pub fn prw(&self, caller: Pid, a: [u64; 6], write: bool) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        self.with_live(&vm, || self.prw_in(&vm, caller, a, write))
    }

    fn prw_in(&self, vm: &Vmspace, caller: Pid, a: [u64; 6], write: bool) -> Result<i64, Errno> {
        let (buf, n, flags, vaddr) = (a[1], a[2], a[3], a[4]);
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        let mut done = 0u64;
        let mut chunk = vec![0u8; PAGE as usize];
        while done < n {
            let va = vaddr.wrapping_add(done);
            if va >= USER_MAX {
                break;
            }
            let len = (PAGE - va % PAGE).min(n - done) as usize;
            let here = &mut chunk[..len];
            let user = RemoteAddr(buf.wrapping_add(done));
            if write {
                if remote::read_bytes(caller, user, here).is_err() {
                    return if done == 0 { Err(Errno::EFAULT) } else { break };
                }
                if !self.vm_write(vm, va, here) {
                    break;
                }
            } else {
                if !self.vm_read(vm, va, here) {
                    break;
                }
                if remote::write_bytes(caller, user, here).is_err() {
                    return if done == 0 { Err(Errno::EFAULT) } else { break };
                }
            }
            done += len as u64;
        }
        Ok(done as i64)
    }

    /// Where `va` (one page at most) lives in RAM, for a user access.
    fn ram_offset(&self, vm: &Vmspace, va: u64, write: bool) -> Option<Result<u64, ()>> {
        let (start, m) = lock(&vm.maps).at(va)?;
        let wanted = if write {
            libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        Some(match m.kind {
            Kind::Linear { .. } if m.prot & wanted == 0 => Err(()),
            Kind::Linear { off } => Ok(off + (va - start)),
            Kind::Window => self.vpt.translate(vm.stub, va, write).ok_or(()),
            Kind::Anon => return None,
        })
    }

    /// Read `out.len()` bytes at `va` of vmspace `id` as its user code
    /// would (a debugger's look, `monitor vmspace ID x`): through its
    /// mappings and tables, stopping at the first byte that is not
    /// readable. Returns how many were read.
    pub fn peek(&self, id: u64, va: u64, out: &mut [u8]) -> Result<usize, Errno> {
        let vm = self.get(id)?;
        self.with_live(&vm, || {
            let mut done = 0usize;
            while done < out.len() {
                let at = va.wrapping_add(done as u64);
                if at >= USER_MAX {
                    break;
                }
                let len = ((PAGE - at % PAGE) as usize).min(out.len() - done);
                if !self.vm_read(&vm, at, &mut out[done..done + len]) {
                    break;
                }
                done += len;
            }
            Ok(done)
        })
    }

    fn vm_read(&self, vm: &Vmspace, va: u64, out: &mut [u8]) -> bool {
        match self.ram_offset(vm, va, false) {
            Some(Ok(pa)) => self.ram.read(pa, out).is_ok(),
            Some(Err(())) => false,
            None => {
                lock(&vm.maps).at(va).is_some()
                    && remote::read_bytes(vm.stub, RemoteAddr(va), out).is_ok()
            }
        }
    }

    fn vm_write(&self, vm: &Vmspace, va: u64, data: &[u8]) -> bool {
        match self.ram_offset(vm, va, true) {
            Some(Ok(pa)) => self.ram.write(pa, data).is_ok(),
            Some(Err(())) => false,
            None => {
                lock(&vm.maps).at(va).is_some()
                    && remote::write_bytes(vm.stub, RemoteAddr(va), data).is_ok()
            }
        }
    }
}
