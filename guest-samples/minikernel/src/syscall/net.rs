//! Sockets' vector calls and `select`: `sendmsg`/`recvmsg` build a host
//! `msghdr` over pieces of guest RAM (name and control data copied, the
//! minikernel's descriptors refused in `SCM_RIGHTS`), `select`/`pselect6`
//! copy the sets. The plain socket calls are forwarded by [`super::spec`].

use super::Arg::{InOut, SigmaskPair, Val};
use super::{Blocked, SOCKADDR_MAX, SysResult, prepare, word};
use crate::kernel::{Kernel, Proc};
use crate::mm::MAX_IO;

/// A `sendmsg`/`recvmsg` prepared for the host: `hdr` is the host
/// `struct msghdr` (56 bytes) pointing at `name`, `iov` (guest RAM) and
/// `control`; `user_hdr` is the user's `msghdr`.
#[derive(Debug)]
pub struct Message {
    pub(super) nr: u64,
    pub(super) args: [u64; 6],
    pub(super) hdr: Vec<u8>,
    pub(super) name: Vec<u8>,
    pub(super) iov: Vec<libc::iovec>,
    pub(super) control: Vec<u8>,
    pub(super) user_hdr: u64,
    pub(super) user_name: u64,
    pub(super) user_control: u64,
}

/// `select(nfds, r, w, e, timeout)` and `pselect6(nfds, r, w, e, tsp,
/// sigmask)`: each set is `nfds` bits rounded up to words, copied in and
/// out; `select` also gives back the time left, as Linux does.
pub(super) fn select(k: &mut Kernel, p: &mut Proc, nr: u64, a: [u64; 6]) -> Result<Blocked, i32> {
    let nfds = a[0] as i32;
    if !(0..=1024).contains(&nfds) {
        return Err(libc::EINVAL);
    }
    let set = InOut((nfds as usize).div_ceil(64) * 8);
    let kinds = if nr == 23 {
        vec![Val, set, set, set, InOut(16)]
    } else {
        vec![Val, set, set, set, InOut(16), SigmaskPair]
    };
    prepare(k, p, nr, &a, kinds).map(Blocked::Forward)
}

/// Most bytes of ancillary data `sendmsg`/`recvmsg` carry (Linux's
/// default `net.core.optmem_max` is of this order).
const CONTROL_MAX: u64 = 64 << 10;

/// `sendmsg(fd, msg, flags)` / `recvmsg(fd, msg, flags)` (`receiving`):
/// the user's `msghdr` is read, its name and control data copied, its
/// iovecs translated into pieces of guest RAM (the data moves without a
/// copy), and a host `msghdr` built over them. Descriptors passed with
/// `SCM_RIGHTS` are the host's (they are the process's own); the
/// minikernel's RAM descriptor cannot be sent (`EBADF`).
pub(super) fn msg(
    k: &mut Kernel,
    p: &mut Proc,
    receiving: bool,
    a: [u64; 6],
) -> Result<Blocked, i32> {
    if k.reserved_fd(a[0]) {
        return Err(libc::EBADF);
    }
    let mut user = [0u8; 56];
    if !p.mm.read(&k.ram, &mut k.frames, a[1], &mut user) {
        return Err(libc::EFAULT);
    }
    let (user_name, namelen) = (word(&user, 0), word(&user, 8) & 0xffff_ffff);
    let (user_iov, iovlen) = (word(&user, 16), word(&user, 24));
    let (user_control, controllen) = (word(&user, 32), word(&user, 40));
    if iovlen > 1024 {
        return Err(libc::EMSGSIZE);
    }
    let mut name = Vec::new();
    if user_name != 0 {
        if receiving {
            name = vec![0u8; namelen.min(SOCKADDR_MAX) as usize];
        } else {
            if namelen > SOCKADDR_MAX {
                return Err(libc::EINVAL);
            }
            name = vec![0u8; namelen as usize];
            if !p.mm.read(&k.ram, &mut k.frames, user_name, &mut name) {
                return Err(libc::EFAULT);
            }
        }
    }
    let mut control = Vec::new();
    if user_control != 0 && controllen > 0 {
        if receiving {
            control = vec![0u8; controllen.min(CONTROL_MAX) as usize];
        } else {
            if controllen > CONTROL_MAX {
                return Err(libc::ENOBUFS);
            }
            control = vec![0u8; controllen as usize];
            if !p.mm.read(&k.ram, &mut k.frames, user_control, &mut control) {
                return Err(libc::EFAULT);
            }
            if passes_fd(&control, k.ram_fd) {
                return Err(libc::EBADF);
            }
        }
    }
    let mut raw = vec![0u8; iovlen as usize * 16];
    if !p.mm.read(&k.ram, &mut k.frames, user_iov, &mut raw) {
        return Err(libc::EFAULT);
    }
    let mut iov: Vec<libc::iovec> = Vec::new();
    let (mut total, mut asked) = (0u64, 0u64);
    'segs: for c in raw.chunks_exact(16) {
        let (va, len) = (word(c, 0), word(c, 8).min(MAX_IO - total));
        asked += len;
        let pieces =
            p.mm.translate(&k.ram, &mut k.frames, va, len, receiving)
                .map_err(|_| libc::ENOMEM)?;
        let mut got = 0;
        for (pa, n) in pieces {
            if iov.len() == 1024 {
                break 'segs;
            }
            iov.push(libc::iovec {
                iov_base: k.ram.ptr(pa, n).cast(),
                iov_len: n as usize,
            });
            got += n;
        }
        total += got;
        if got < len || total >= MAX_IO {
            break;
        }
    }
    if total == 0 && asked > 0 {
        return Err(libc::EFAULT);
    }
    let mut hdr = vec![0u8; 56];
    let put =
        |hdr: &mut Vec<u8>, at: usize, v: u64| hdr[at..at + 8].copy_from_slice(&v.to_le_bytes());
    if user_name != 0 {
        put(&mut hdr, 0, name.as_ptr() as u64);
        put(&mut hdr, 8, name.len() as u64);
    }
    put(&mut hdr, 16, iov.as_ptr() as u64);
    put(&mut hdr, 24, iov.len() as u64);
    if !control.is_empty() {
        put(&mut hdr, 32, control.as_ptr() as u64);
        put(&mut hdr, 40, control.len() as u64);
    }
    let nr = if receiving {
        libc::SYS_recvmsg
    } else {
        libc::SYS_sendmsg
    } as u64;
    let args = [a[0], hdr.as_ptr() as u64, a[2], 0, 0, 0];
    Ok(Blocked::Msg(Box::new(Message {
        nr,
        args,
        hdr,
        name,
        iov,
        control,
        user_hdr: a[1],
        user_name,
        user_control,
    })))
}

/// Whether the control messages in `control` pass descriptor `fd`
/// (`SCM_RIGHTS`). Hostile lengths end the walk.
fn passes_fd(control: &[u8], fd: i32) -> bool {
    let mut at = 0usize;
    while at + 16 <= control.len() {
        let len = word(control, at) as usize;
        let (level, kind) = (
            u32::from_le_bytes([
                control[at + 8],
                control[at + 9],
                control[at + 10],
                control[at + 11],
            ]),
            u32::from_le_bytes([
                control[at + 12],
                control[at + 13],
                control[at + 14],
                control[at + 15],
            ]),
        );
        if len < 16 || len > control.len() - at {
            return false;
        }
        if level == libc::SOL_SOCKET as u32 && kind == libc::SCM_RIGHTS as u32 {
            let fds = &control[at + 16..at + len];
            if fds
                .chunks_exact(4)
                .any(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) == fd)
            {
                return true;
            }
        }
        at += len.div_ceil(8) * 8;
    }
    false
}

/// After the host's `recvmsg`: the name, its length, the control data,
/// its length and the flags go back to the user's `msghdr`.
pub(super) fn complete_msg(k: &mut Kernel, p: &mut Proc, m: &Message, ret: SysResult) -> SysResult {
    let n = ret?;
    if m.nr != libc::SYS_recvmsg as u64 {
        return Ok(n);
    }
    let namelen = word(&m.hdr, 8) & 0xffff_ffff;
    let controllen = word(&m.hdr, 40);
    let flags = u32::from_le_bytes([m.hdr[48], m.hdr[49], m.hdr[50], m.hdr[51]]);
    let ok = (m.user_name == 0
        || (p.mm.write(
            &k.ram,
            &mut k.frames,
            m.user_name,
            &m.name[..(namelen as usize).min(m.name.len())],
        ) && p.mm.write(
            &k.ram,
            &mut k.frames,
            m.user_hdr + 8,
            &(namelen as u32).to_le_bytes(),
        )))
        && (m.user_control == 0
            || p.mm.write(
                &k.ram,
                &mut k.frames,
                m.user_control,
                &m.control[..(controllen as usize).min(m.control.len())],
            ))
        && p.mm.write(
            &k.ram,
            &mut k.frames,
            m.user_hdr + 40,
            &controllen.to_le_bytes(),
        )
        && p.mm
            .write(&k.ram, &mut k.frames, m.user_hdr + 48, &flags.to_le_bytes());
    if ok { Ok(n) } else { Err(libc::EFAULT) }
}
