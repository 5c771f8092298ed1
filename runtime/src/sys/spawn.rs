//! Starting the guest: `fork`, the child's set-up before `execve`, and the
//! channels that tell the parent how set-up went.
//!
//! The child runs only async-signal-safe code: everything it needs (paths,
//! argument vectors, the filter) is prepared before `fork`, and it talks to
//! the parent through three descriptors:
//! - `go`: the parent writes one byte once it has seized the child (so no
//!   instruction of the guest runs untraced);
//! - `listener`: a socket on which the child sends the seccomp listener with
//!   `SCM_RIGHTS` before `execve` (the listener is close-on-exec);
//! - `report`: a close-on-exec pipe on which the child writes a
//!   [`ChildFailure`] if set-up or `execve` fails. EOF means `execve` worked.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use super::seccomp;

/// Which step of the child's set-up failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStep {
    /// Something before the filter (parent gone, descriptor set-up).
    Prepare,
    /// Installing the seccomp filter or handing over its listener.
    Filter,
    /// `execve` itself.
    Exec,
}

/// A failure the child reported before it could become the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildFailure {
    pub step: ChildStep,
    pub errno: Errno,
}

/// Exit code of a child whose set-up failed (vkrun's own failure).
pub const CHILD_SETUP_EXIT: i32 = 125;

/// Everything the child needs, prepared before `fork`.
#[derive(Debug)]
pub struct ChildPlan {
    path: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    ram_fd: RawFd,
    /// The hypercall filter the child installs before `execve`.
    filter: Vec<libc::sock_filter>,
}

impl ChildPlan {
    /// Prepare to execute `path` with `argv` and `envp` under the seccomp
    /// program `filter`, leaving `ram_fd` open (without close-on-exec) in
    /// the guest.
    pub fn new(
        path: OsString,
        argv: Vec<OsString>,
        envp: Vec<OsString>,
        ram_fd: RawFd,
        filter: Vec<libc::sock_filter>,
    ) -> Result<Self, Errno> {
        let cstr = |s: OsString| CString::new(s.into_vec()).map_err(|_| Errno::EINVAL);
        let path = cstr(path)?;
        let argv = argv.into_iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let envp = envp.into_iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            path,
            _argv: argv,
            _envp: envp,
            ram_fd,
            filter,
        })
    }
}

/// The parent's ends of the start-up channels.
#[derive(Debug)]
pub struct Child {
    pub pid: Pid,
    go: OwnedFd,
    listener: OwnedFd,
    report: OwnedFd,
}

impl Child {
    /// Let the (seized) child go on to install its filter and `execve`.
    pub fn release(&self) -> Result<(), Errno> {
        loop {
            match nix::unistd::write(&self.go, &[1u8]) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The seccomp listener the child sent before `execve`, if it did.
    /// Non-blocking: call once `execve` has been seen to succeed.
    pub fn take_listener(&self) -> Result<OwnedFd, Errno> {
        recv_fd(self.listener.as_raw_fd())
    }

    /// The failure the child reported, if any. Non-blocking: call once the
    /// child has exited (EOF or nothing means no report).
    pub fn failure(&self) -> Option<ChildFailure> {
        let mut buf = [0u8; 8];
        let n = nix::unistd::read(&self.report, &mut buf).ok()?;
        if n != buf.len() {
            return None;
        }
        let step = match buf[0] {
            1 => ChildStep::Prepare,
            2 => ChildStep::Filter,
            3 => ChildStep::Exec,
            _ => return None,
        };
        let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        Some(ChildFailure {
            step,
            errno: Errno::from_raw(errno),
        })
    }
}

/// Fork the guest's first process. The child waits for [`Child::release`],
/// then installs the hypercall filter, sends its listener and executes the
/// plan. It gets `SIGKILL` if vkrun dies before seizing it.
///
/// Precondition: the calling process is single-threaded (the child runs
/// Rust code between `fork` and `execve`).
pub fn fork_guest(plan: &ChildPlan) -> Result<Child, Errno> {
    let (go_read, go_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (report_read, report_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let (sock_parent, sock_child) = socket::socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the caller guarantees we are single-threaded, so the child may
    // run the code below; it only makes async-signal-safe calls on memory
    // prepared before the fork, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        child_main(
            plan,
            parent,
            go_read.as_raw_fd(),
            sock_child.as_raw_fd(),
            report_write.as_raw_fd(),
        );
    }
    Ok(Child {
        pid: Pid::from_raw(pid),
        go: go_write,
        listener: sock_parent,
        report: report_read,
    })
}

fn child_main(plan: &ChildPlan, parent: libc::pid_t, go: RawFd, sock: RawFd, report: RawFd) -> ! {
    let fail = |step: u8, errno: i32, code: i32| -> ! {
        let mut msg = [0u8; 8];
        msg[0] = step;
        msg[4..8].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write and _exit are async-signal-safe; `msg` is valid.
        unsafe {
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(code)
        }
    };
    let errno = || Errno::last_raw();
    // SAFETY: raw async-signal-safe calls with integer arguments or pointers
    // to memory owned by `plan` (alive until execve) or this stack frame.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(1, errno(), CHILD_SETUP_EXIT);
        }
        if libc::getppid() != parent {
            fail(1, libc::ESRCH, CHILD_SETUP_EXIT);
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(go, (&raw mut byte).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            fail(1, libc::ESRCH, CHILD_SETUP_EXIT);
        }
        // Seized with PTRACE_O_EXITKILL now: the death signal is no longer
        // needed and must not leak into the guest (prctl(2) keeps it across
        // execve).
        libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);
        // Undo what vkrun's own process state would leak into the guest:
        // the blocked signals, and Rust's SIG_IGN for SIGPIPE.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::fcntl(plan.ram_fd, libc::F_SETFD, 0) != 0 {
            fail(1, errno(), CHILD_SETUP_EXIT);
        }
        let listener = match seccomp::install_hypercall_filter(&plan.filter) {
            Ok(fd) => fd,
            Err(e) => fail(2, e as i32, CHILD_SETUP_EXIT),
        };
        if let Err(e) = send_fd(sock, listener) {
            fail(2, e as i32, CHILD_SETUP_EXIT);
        }
        libc::close(listener);
        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        let e = errno();
        let code = if e == libc::ENOENT || e == libc::ENOTDIR {
            127
        } else {
            126
        };
        fail(3, e, code)
    }
}

/// Space for one `SCM_RIGHTS` control message carrying one descriptor.
#[repr(C)]
union CmsgBuf {
    _align: libc::cmsghdr,
    bytes: [u8; 64],
}

/// Send `fd` over the Unix socket `sock` (async-signal-safe).
fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), Errno> {
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = CmsgBuf { bytes: [0; 64] };
    // SAFETY: msghdr is plain data; the fields set below point into `iov`
    // and `buf`, which outlive the sendmsg call; the CMSG macros stay within
    // `buf` because CMSG_SPACE(4) is far below 64 bytes.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&raw mut buf).cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(sock, &msg, 0) < 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// Receive one descriptor sent by [`send_fd`] (non-blocking socket; runs
/// in the parent, so it may use `nix`'s allocating wrapper).
fn recv_fd(sock: RawFd) -> Result<OwnedFd, Errno> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut payload = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut payload)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let [fd] = fds[..]
        {
            // SAFETY: the kernel installed `fd` for us just now; nobody else
            // owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Err(Errno::EBADMSG)
}
