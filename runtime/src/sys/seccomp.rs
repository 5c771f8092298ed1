//! The hypercall filter and its user-notification listener
//! (seccomp(2), seccomp_unotify(2)).
//!
//! The filter lets every system call through natively except the numbers in
//! `[VK_SYS_BASE, VK_SYS_BASE + VK_SYS_COUNT)` on x86-64, which it turns into
//! `SECCOMP_RET_USER_NOTIF` so that the supervisor answers them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use vkabi::{VK_SYS_BASE, VK_SYS_COUNT};

pub(crate) use super::abi::AUDIT_ARCH_X86_64;
/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6): wake the supervisor
/// synchronously on the notifying task's CPU.
const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;

pub(crate) const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

pub(crate) const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

pub(crate) const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
pub(crate) const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
pub(crate) const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// The classic-BPF program of a guest: numbers in the hypercall range
/// notify the supervisor (`SECCOMP_RET_USER_NOTIF`), except `tracer_stops`,
/// which stop the caller for the tracer thread (`SECCOMP_RET_TRACE`);
/// everything else runs natively. Which hypercall arrives how is the
/// hypercall table's decision; this only encodes it. (cBPF written by hand:
/// seccompiler has no `USER_NOTIF` action.)
pub fn hypercall_filter(tracer_stops: &[u32]) -> Vec<libc::sock_filter> {
    let n = tracer_stops.len();
    assert!(n < 200, "a short list of tracer-stop hypercalls");
    let mut f = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        // Not x86-64: allow (jump past everything to the last instruction).
        jump(JEQ_K, AUDIT_ARCH_X86_64, 0, (n + 5) as u8),
        stmt(LD_W_ABS, DATA_NR),
        jump(JGE_K, VK_SYS_BASE as u32, 0, (n + 3) as u8),
        jump(JGE_K, (VK_SYS_BASE + VK_SYS_COUNT) as u32, (n + 2) as u8, 0),
    ];
    for (i, &nr) in tracer_stops.iter().enumerate() {
        // Matched: jump to RET_TRACE, `n - i` instructions on.
        f.push(jump(JEQ_K, nr, (n - i) as u8, 0));
    }
    f.push(stmt(RET_K, libc::SECCOMP_RET_USER_NOTIF));
    f.push(stmt(RET_K, libc::SECCOMP_RET_TRACE));
    f.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    f
}

/// Install `filter` on the calling thread and return the listener
/// descriptor (close-on-exec, as the kernel makes it).
///
/// Async-signal-safe: called in the forked child before `execve`. Without
/// `CAP_SYS_ADMIN` the kernel requires `no_new_privs`; it is set only then, so
/// that a privileged vkrun runs set-user-ID guests as they would run natively.
pub fn install_hypercall_filter(filter: &[libc::sock_filter]) -> Result<RawFd, Errno> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    let install = || {
        // SAFETY: `prog` points to a valid program that outlives the call;
        // the kernel copies it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &prog as *const libc::sock_fprog,
            )
        };
        Errno::result(ret).map(|fd| fd as RawFd)
    };
    match install() {
        Err(Errno::EACCES) => {
            // SAFETY: prctl with integer arguments only.
            let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            Errno::result(ret)?;
            install()
        }
        other => other,
    }
}

/// What a cBPF program of the shapes built here returns for system call
/// `nr` of architecture `arch` (a small interpreter: loads of `nr`/`arch`,
/// `jeq`/`jge` with constants, `ret` constants), for tests.
#[cfg(test)]
pub(crate) fn evaluate(filter: &[libc::sock_filter], arch: u32, nr: u32) -> u32 {
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let i = filter[pc];
        pc += 1;
        match i.code {
            LD_W_ABS if i.k == DATA_NR => acc = nr,
            LD_W_ABS if i.k == DATA_ARCH => acc = arch,
            JEQ_K | JGE_K => {
                let hit = if i.code == JEQ_K {
                    acc == i.k
                } else {
                    acc >= i.k
                };
                pc += usize::from(if hit { i.jt } else { i.jf });
            }
            RET_K => return i.k,
            code => panic!("instruction {code:#x} not modelled"),
        }
    }
}

/// One pending hypercall, as `SECCOMP_IOCTL_NOTIF_RECV` reports it.
#[derive(Clone, Copy, Debug)]
pub struct Notification {
    /// Cookie for the answer; valid until answered or the caller dies.
    pub id: u64,
    /// Thread id of the caller (in our pid namespace).
    pub tid: i32,
    /// System call number.
    pub nr: u64,
    /// The six argument registers.
    pub args: [u64; 6],
}

/// The supervisor's end of the filter: the user-notification descriptor.
#[derive(Debug)]
pub struct NotifyFd {
    fd: OwnedFd,
}

impl NotifyFd {
    /// Take ownership of a listener received from the child.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Ask the kernel to wake us synchronously (the woken supervisor thread
    /// runs on the caller's CPU, so latency does not depend on placement). Kernels before 6.6 refuse; that only costs speed.
    pub fn set_sync_wake_up(&self) -> Result<(), Errno> {
        // SAFETY: SET_FLAGS takes the flags by value.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
            )
        };
        Errno::result(ret).map(drop)
    }

    /// Receive one notification. Blocks if none is pending; `ENOENT` means
    /// the caller went away between poll and receive.
    pub fn recv(&self) -> Result<Notification, Errno> {
        // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `n` is a valid, writable seccomp_notif for the ioctl.
            let ret = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_RECV,
                    &mut n as *mut libc::seccomp_notif,
                )
            };
            match Errno::result(ret) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Notification {
            id: n.id,
            tid: n.pid as i32,
            nr: u64::from(n.data.nr as u32),
            args: n.data.args,
        })
    }

    /// Answer notification `id`: `Ok(value)` becomes the return value,
    /// `Err(errno)` becomes `-errno`. `ENOENT` means the caller is gone.
    pub fn respond(&self, id: u64, result: Result<i64, Errno>) -> Result<(), Errno> {
        let (val, error) = match result {
            Ok(v) => (v, 0),
            Err(e) => (0, -(e as i32)),
        };
        let mut resp = libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags: 0,
        };
        // SAFETY: `resp` is a valid seccomp_notif_resp for the ioctl.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp as *mut libc::seccomp_notif_resp,
            )
        };
        Errno::result(ret).map(drop)
    }

    /// Whether no task uses the filter any more (the listener polls
    /// `POLLHUP`, seccomp_unotify(2)). Waits until either a notification is
    /// pending or that is the case; `EINTR` counts as "not orphaned".
    pub fn orphaned(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }

    /// Whether a notification waits to be received.
    pub fn pending(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Whether a notification is pending within `timeout` (`Err`: the
    /// listener has no task left, or poll failed).
    pub fn pending_within(&self, timeout: std::time::Duration) -> Result<bool, Errno> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Ok(false),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.contains(PollFlags::POLLIN) {
            Ok(true)
        } else {
            Err(Errno::ENOENT)
        }
    }

    /// Receive one notification within `timeout`: `Ok(None)` if none came,
    /// `Err` if the listener has no task left (or failed).
    pub fn recv_within(&self, timeout: std::time::Duration) -> Result<Option<Notification>, Errno> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !revents.contains(PollFlags::POLLIN) {
            return Err(Errno::ENOENT);
        }
        self.recv().map(Some)
    }

    /// Whether notification `id` is still pending (its caller alive and
    /// waiting). Check before acting on the caller's memory: a dead caller's
    /// thread id may already name another task.
    pub fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        // SAFETY: ID_VALID reads one u64 through the pointer.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id as *mut u64,
            )
        };
        ret == 0
    }

    /// Install a duplicate of `src` in the caller of notification `id`
    /// (`SECCOMP_IOCTL_NOTIF_ADDFD`), close-on-exec if `cloexec`; returns
    /// its number there (the lowest free one).
    pub fn add_fd(&self, id: u64, src: BorrowedFd<'_>, cloexec: bool) -> Result<i32, Errno> {
        let mut addfd = libc::seccomp_notif_addfd {
            id,
            flags: 0,
            srcfd: src.as_raw_fd() as u32,
            newfd: 0,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        // SAFETY: `addfd` is a valid seccomp_notif_addfd for the ioctl.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ADDFD,
                &mut addfd as *mut libc::seccomp_notif_addfd,
            )
        };
        Errno::result(ret)
    }
}

impl AsFd for NotifyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_getfd`,
/// close-on-exec), as a listener: an execution context's own.
pub fn listener_of(pid: nix::unistd::Pid, fd: i32) -> Result<NotifyFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers; the result is a new descriptor we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let pidfd = Errno::result(pidfd)? as RawFd;
    // SAFETY: the descriptor was just made and is ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes integers; the result is a new descriptor.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let dup = Errno::result(dup)? as RawFd;
    // SAFETY: as above.
    Ok(NotifyFd::new(unsafe { OwnedFd::from_raw_fd(dup) }))
}
