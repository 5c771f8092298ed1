//! Every `unsafe` step of the guest, behind safe functions (mapping guest
//! RAM as the direct map is `vkguest`'s, re-exported here): `vmspace_ctl`
//! with pointers that must be refused, address space that is known to be
//! unmapped, counting signal handlers, `pthread_kill`, `fork`/`_exit`, and
//! reading the user-code snippets out of this binary's text.

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use vkabi::hypercall::{self, Errno};
use vkabi::{Hypercall, PAGE_SIZE};
pub use vkguest::map_ram;

/// `vmspace_ctl(id, cmd, tf, vf)` with raw pointers, for the calls that must
/// fail (`EFAULT`, `EOPNOTSUPP`, `ENOENT`).
///
/// `tf` and `vf` are either null, small integers, addresses from
/// [`Hole`] (unmapped) or pointers into memory this program owns and lets
/// the hypercall read and write (the caller keeps them alive and unaliased
/// for the call's duration).
pub fn vmspace_ctl_raw(id: u64, cmd: i32, tf: u64, vf: u64) -> Result<(), Errno> {
    // SAFETY: the supervisor copies in from and out to `tf`/`vf`; for the
    // bad pointers this check passes it must refuse with EFAULT, and for the
    // good ones the callers pass memory of the ABI's sizes they own
    // exclusively (see above). Without vkrun the number is not a Linux
    // system call and nothing is accessed.
    let r = unsafe { hypercall::hypercall(Hypercall::VmspaceCtl, [id, cmd as u64, tf, vf, 0, 0]) };
    hypercall::result(r).map(drop)
}

/// A range of this process's address space that is mapped read-write for
/// `mapped` pages followed by one unmapped page (a hole), so that a pointer
/// into the last mapped bytes runs into unmapped memory. The mapped part is
/// unmapped on drop.
#[derive(Debug)]
pub struct Hole {
    base: u64,
    mapped: u64,
}

impl Hole {
    /// `mapped` read-write pages followed by an unmapped page.
    pub fn new(mapped: u64) -> io::Result<Hole> {
        let len = ((mapped + 1) * PAGE_SIZE) as usize;
        // SAFETY: a new private anonymous mapping where the kernel chooses:
        // nothing that exists is touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = p as u64;
        let hole = base + mapped * PAGE_SIZE;
        // SAFETY: the last page of the mapping just made, which nothing uses.
        if unsafe { libc::munmap(hole as *mut libc::c_void, PAGE_SIZE as usize) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Hole { base, mapped })
    }

    /// The first unmapped address (nothing else is placed there while this
    /// program runs single-threaded between creating the hole and using it;
    /// the callers use it at once).
    pub fn unmapped(&self) -> u64 {
        self.base + self.mapped * PAGE_SIZE
    }

    /// The address `n` bytes before the hole, inside the mapped part.
    pub fn before_hole(&self, n: u64) -> u64 {
        assert!(n <= self.mapped * PAGE_SIZE, "inside the mapped part");
        self.unmapped() - n
    }

    /// Fill the mapped part's last `n` bytes with `byte`.
    pub fn fill_before_hole(&self, n: u64, byte: u8) {
        let at = self.before_hole(n);
        // SAFETY: `before_hole` checked that the `n` bytes lie in the mapped,
        // writable part, which only this value owns.
        unsafe { ptr::write_bytes(at as *mut u8, byte, n as usize) };
    }

    /// The mapped part's last `n` bytes.
    pub fn bytes_before_hole(&self, n: u64) -> Vec<u8> {
        let at = self.before_hole(n);
        // SAFETY: as for `fill_before_hole`; the bytes are initialised (zero
        // pages or written by us or the supervisor).
        unsafe { std::slice::from_raw_parts(at as *const u8, n as usize) }.to_vec()
    }
}

impl Drop for Hole {
    fn drop(&mut self) {
        // SAFETY: the mapped part is this value's own mapping.
        unsafe {
            libc::munmap(
                self.base as *mut libc::c_void,
                (self.mapped * PAGE_SIZE) as usize,
            )
        };
    }
}

/// Per-signal counts of handler runs, for SIGUSR1 and SIGUSR2.
static HANDLED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// The thread the handler last ran on.
static HANDLER_TID: [AtomicI32; 2] = [AtomicI32::new(0), AtomicI32::new(0)];

fn slot(sig: i32) -> usize {
    match sig {
        libc::SIGUSR1 => 0,
        libc::SIGUSR2 => 1,
        _ => panic!("only SIGUSR1 and SIGUSR2 have counting handlers"),
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let i = match sig {
        libc::SIGUSR1 => 0,
        _ => 1,
    };
    HANDLED[i].fetch_add(1, Ordering::SeqCst);
    HANDLER_TID[i].store(gettid(), Ordering::SeqCst);
}

/// Install a counting handler for `sig` (SIGUSR1 or SIGUSR2), with or
/// without `SA_RESTART`.
pub fn install_counter(sig: i32, restart: bool) -> io::Result<()> {
    slot(sig);
    // SAFETY: `sigaction` is plain data, valid when zeroed.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_signal as *const () as usize;
    sa.sa_flags = if restart { libc::SA_RESTART } else { 0 };
    // SAFETY: `sa` is a valid sigaction whose handler has the plain
    // signature and touches only atomics and gettid(2).
    let r = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, ptr::null_mut())
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How often the counting handler for `sig` has run, and on which thread
/// it ran last.
pub fn handled(sig: i32) -> (u64, i32) {
    let i = slot(sig);
    (
        HANDLED[i].load(Ordering::SeqCst),
        HANDLER_TID[i].load(Ordering::SeqCst),
    )
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// `pthread_kill(thread, sig)`.
///
/// `thread` must be a thread of this process that has not been joined or
/// detached-and-exited (the callers keep its `JoinHandle` until after the
/// call).
pub fn pthread_kill(thread: libc::pthread_t, sig: i32) -> io::Result<()> {
    // SAFETY: the caller keeps the thread's handle, so `thread` names a live
    // or joinable thread (pthread_kill(3)).
    let r = unsafe { libc::pthread_kill(thread, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// `fork()`: `Ok(None)` in the child, `Ok(Some(pid))` in the parent.
///
/// Call it only while this process has a single thread, and in the child
/// use only raw hypercalls, the pipe and [`exit_now`].
pub fn fork() -> io::Result<Option<i32>> {
    // SAFETY: the callers fork with one thread only (so no lock can be held
    // by a thread that does not exist in the child) and the child avoids
    // anything but async-signal-safe work before `_exit`.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

/// `_exit(code)`: no atexit handlers, no flushing (for a forked child).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// `write(2)` of all of `bytes` to `fd` (async-signal-safe; for a forked
/// child).
pub fn write_all(fd: i32, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: `rest` is readable for its length.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe() -> io::Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is writable for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

/// Read `fd` to its end, then close it.
pub fn read_to_end_and_close(fd: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    close(fd);
    out
}

/// `close(fd)`.
pub fn close(fd: i32) {
    // SAFETY: closing a descriptor this program opened and no longer uses.
    unsafe { libc::close(fd) };
}

/// Fork a child that exits at once; returns how long `fork()` took to
/// return in this process (the child is reaped before returning).
pub fn time_fork() -> io::Result<std::time::Duration> {
    let started = std::time::Instant::now();
    // SAFETY: the child only calls _exit(2), which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    let took = started.elapsed();
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => exit_now(0),
        pid => waitpid(pid).map(|_| took),
    }
}

/// `waitpid(pid)`: the raw wait status.
pub fn waitpid(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is writable.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The bytes between two symbols of this binary's text: an assembled
/// user-code snippet (see `user.rs`).
///
/// `start` and `end` must be the addresses of two labels of one
/// `global_asm!` block, `start` before `end`.
pub fn text_bytes(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = (end as usize)
        .checked_sub(start as usize)
        .expect("a snippet's end label follows its start label");
    // SAFETY: both labels delimit one block of this binary's text section,
    // which is mapped readable for the life of the process and never
    // written.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// Put `value` in the calling thread's `xmm0` (to show that the user
/// context's FPU state is its own).
pub fn clobber_xmm0(value: u64) {
    // SAFETY: writes only xmm0, declared as clobbered.
    unsafe {
        std::arch::asm!("movq xmm0, {v}", v = in(reg) value, out("xmm0") _, options(nomem, nostack));
    }
}
