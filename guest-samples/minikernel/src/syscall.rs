//! Linux system calls of the user process (`T_FAST_SYSCALL`: `rax` = number,
//! arguments in `rdi rsi rdx r10 r8 r9`, result in `rax`).
//!
//! Most calls are *forwarded*: the minikernel's own descriptors, working
//! directory, clock and identity serve as the user program's, so the honest
//! implementation is the host's own call. [`spec`] describes each forwarded
//! call's arguments (plain values, descriptors, paths, buffers in or out of a
//! fixed size or of a size given by another argument); [`forward`] copies
//! the user buffers in through the process's page tables, makes the call and
//! copies results out. `read`/`write` and their vector and positional forms
//! go straight between the descriptor and guest RAM: the user buffer is
//! translated into pieces of the minikernel's RAM mapping and passed to the
//! host's `readv`/`writev`/`preadv`/`pwritev`, without a copy.
//!
//! Sockets are forwarded the same way (the descriptors are the process's
//! own): socket addresses and `socklen_t` lengths are copied in and out,
//! `sendmsg`/`recvmsg` build a host `msghdr` whose iovecs are pieces of
//! guest RAM and whose name and control data (descriptors passed with
//! `SCM_RIGHTS`) are copied; the minikernel's RAM descriptor cannot be
//! passed. `select`/`pselect6` copy the `nfds` bits of each set.
//!
//! Served by the minikernel itself: memory (`brk mmap munmap mprotect
//! madvise mremap msync`), `arch_prctl`, signals (`rt_sigaction rt_sigprocmask
//! sigaltstack rt_sigreturn rt_sigsuspend pause rt_sigpending`, see
//! [`crate::signal`]; a call the host interrupted for a handler restarts or
//! fails with `EINTR` as Linux decides), `futex` (one thread), process
//! identity and `kill` of itself, `exit`/`exit_group`, `ioctl` (terminal queries only),
//! `readlink("/proc/self/exe")` and `open("/proc/self/cmdline")` (the user
//! program's, not the minikernel's). Anything else answers `-ENOSYS`
//! (listed on stderr with `MINIKERNEL_TRACE=1`).
//!
//! This module owns the system-call table and the copying of arguments in
//! and out; it builds on [`crate::kernel`] (state and types) and
//! [`crate::process`] (fork, exec), and is called by `trap`.

use vkabi::hypercall::syscall6;

use crate::kernel::{Exit, Kernel, KernelError, Proc, Thread, Trace};
use crate::mm::{MAX_IO, MIN_ADDR, PROT_EXEC, PROT_READ, PROT_WRITE, page_up};
use crate::process;
use crate::signal;

/// How a forwarded call's argument is passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arg {
    /// A plain value.
    Val,
    /// A descriptor (the minikernel's own are `EBADF`).
    Fd,
    /// The caller's own pid: passed as 0.
    Pid,
    /// A NUL-terminated path (NULL passes through).
    Path,
    /// A buffer of this size read by the call.
    In(usize),
    /// A buffer of this size written by the call (copied out on success).
    Out(usize),
    /// A buffer of this size read and written.
    InOut(usize),
    /// A buffer written by the call whose size is argument `i`; the call
    /// returns the bytes written.
    OutN(usize),
    /// A buffer of `.0` bytes written by the call, which returns how many
    /// items of `.1` bytes it wrote.
    OutItems(usize, usize),
    /// A buffer read by the call whose size is argument `i`.
    InN(usize),
    /// A buffer written by the call whose size is the `u32` argument `i`
    /// points to (a `socklen_t *`, itself `InOut(4)`), which the call
    /// updates; the bytes written are copied out, at most the size given.
    OutLen(usize),
    /// `pselect6`'s `{const sigset_t *ss; size_t ss_len}`: the pair and
    /// the set it points to are copied in.
    SigmaskPair,
}

use Arg::{Fd, In, InN, InOut, Out, OutItems, OutLen, OutN, Path, Pid, SigmaskPair, Val};

/// Bytes of a socket address the minikernel copies (`sockaddr_storage`).
const SOCKADDR_MAX: u64 = 128;

/// `struct stat`.
const STAT: usize = 144;

/// The argument kinds of a forwarded system call.
fn spec(nr: u64) -> Option<&'static [Arg]> {
    Some(match nr {
        2 => &[Path, Val, Val],                         // open
        3 => &[Fd],                                     // close
        4 | 6 => &[Path, Out(STAT)],                    // stat, lstat
        5 => &[Fd, Out(STAT)],                          // fstat
        8 => &[Fd, Val, Val],                           // lseek
        21 => &[Path, Val],                             // access
        22 => &[Out(8)],                                // pipe
        24 => &[],                                      // sched_yield
        32 => &[Fd],                                    // dup
        33 => &[Fd, Fd],                                // dup2
        35 => &[In(16), Out(16)],                       // nanosleep
        40 => &[Fd, Fd, InOut(8), Val],                 // sendfile
        63 => &[Out(390)],                              // uname
        74 | 75 | 81 => &[Fd],                          // fsync, fdatasync, fchdir
        76 => &[Path, Val],                             // truncate
        77 => &[Fd, Val],                               // ftruncate
        78 | 217 => &[Fd, OutN(2), Val],                // getdents, getdents64
        79 => &[OutN(1), Val],                          // getcwd
        80 | 84 | 87 => &[Path],                        // chdir, rmdir, unlink
        82 | 86 | 88 => &[Path, Path],                  // rename, link, symlink
        83 | 90 => &[Path, Val],                        // mkdir, chmod
        89 => &[Path, OutN(2), Val],                    // readlink
        91 => &[Fd, Val],                               // fchmod
        92 | 94 => &[Path, Val, Val],                   // chown, lchown
        93 => &[Fd, Val, Val],                          // fchown
        95 => &[Val],                                   // umask
        96 => &[Out(16), Out(8)],                       // gettimeofday
        97 => &[Val, Out(16)],                          // getrlimit
        98 => &[Val, Out(144)],                         // getrusage
        99 => &[Out(112)],                              // sysinfo
        100 => &[Out(32)],                              // times
        102 | 104 | 107 | 108 => &[],                   // getuid, getgid, geteuid, getegid
        61 => &[Val, Out(4), Val, Out(144)],            // wait4
        62 => &[Val, Val],                              // kill (of another process)
        109 => &[Val, Val],                             // setpgid
        111 | 112 => &[],                               // getpgrp, setsid
        121 | 124 => &[Val],                            // getpgid, getsid
        140 => &[Val, Val],                             // getpriority
        213 | 291 => &[Val],                            // epoll_create, epoll_create1
        233 => &[Fd, Val, Fd, In(12)],                  // epoll_ctl
        290 => &[Val, Val],                             // eventfd2
        141 => &[Val, Val, Val],                        // setpriority
        247 => &[Val, Val, Out(128), Val, Out(144)],    // waitid
        137 => &[Path, Out(120)],                       // statfs
        138 => &[Fd, Out(120)],                         // fstatfs
        160 => &[Val, In(16)],                          // setrlimit
        201 => &[Out(8)],                               // time
        204 => &[Pid, Val, OutN(1)],                    // sched_getaffinity
        221 => &[Fd, Val, Val, Val],                    // fadvise64
        228 | 229 => &[Val, Out(16)],                   // clock_gettime, clock_getres
        230 => &[Val, Val, In(16), Out(16)],            // clock_nanosleep
        257 => &[Fd, Path, Val, Val],                   // openat
        258 | 268 => &[Fd, Path, Val],                  // mkdirat, fchmodat
        260 => &[Fd, Path, Val, Val, Val],              // fchownat
        262 => &[Fd, Path, Out(STAT), Val],             // newfstatat
        263 | 269 => &[Fd, Path, Val],                  // unlinkat, faccessat
        264 => &[Fd, Path, Fd, Path],                   // renameat
        265 | 316 => &[Fd, Path, Fd, Path, Val],        // linkat, renameat2
        266 => &[Path, Fd, Path],                       // symlinkat
        267 => &[Fd, Path, OutN(3), Val],               // readlinkat
        280 => &[Fd, Path, In(32), Val],                // utimensat
        285 => &[Fd, Val, Val, Val],                    // fallocate
        292 => &[Fd, Fd, Val],                          // dup3
        293 => &[Out(8), Val],                          // pipe2
        302 => &[Pid, Val, In(16), Out(16)],            // prlimit64
        318 => &[OutN(1), Val],                         // getrandom
        326 => &[Fd, InOut(8), Fd, InOut(8), Val, Val], // copy_file_range
        332 => &[Fd, Path, Val, Val, Out(256)],         // statx
        439 => &[Fd, Path, Val, Val],                   // faccessat2
        73 => &[Fd, Val],                               // flock
        85 => &[Path, Val],                             // creat
        133 => &[Path, Val, Val],                       // mknod
        259 => &[Fd, Path, Val, Val],                   // mknodat
        132 => &[Path, In(16)],                         // utime
        235 => &[Path, In(32)],                         // utimes
        261 => &[Fd, Path, In(32)],                     // futimesat
        452 => &[Fd, Path, Val, Val],                   // fchmodat2
        162 => &[],                                     // sync
        306 => &[Fd],                                   // syncfs
        188 | 189 => &[Path, Path, InN(3), Val, Val],   // setxattr, lsetxattr
        190 => &[Fd, Path, InN(3), Val, Val],           // fsetxattr
        191 | 192 => &[Path, Path, OutN(3), Val],       // getxattr, lgetxattr
        193 => &[Fd, Path, OutN(3), Val],               // fgetxattr
        194 | 195 => &[Path, OutN(2), Val],             // listxattr, llistxattr
        196 => &[Fd, OutN(2), Val],                     // flistxattr
        197 | 198 => &[Path, Path],                     // removexattr, lremovexattr
        199 => &[Fd, Path],                             // fremovexattr
        41 => &[Val, Val, Val],                         // socket
        53 => &[Val, Val, Val, Out(8)],                 // socketpair
        49 => &[Fd, InN(2), Val],                       // bind
        50 => &[Fd, Val],                               // listen
        48 => &[Fd, Val],                               // shutdown
        51 | 52 => &[Fd, OutLen(2), InOut(4)],          // getsockname, getpeername
        54 => &[Fd, Val, Val, InN(4), Val],             // setsockopt
        55 => &[Fd, Val, Val, OutLen(4), InOut(4)],     // getsockopt
        _ => return None,
    })
}

/// The result of a system call: a value, or `Err(errno)`.
type SysResult = Result<u64, i32>;

/// What serving a system call asks of the thread loop.
#[derive(Debug)]
pub enum Outcome {
    /// Served (`Some(exit)` when the process ends): run the thread again.
    Done(Option<Exit>),
    /// A host call that may block: made without the guest's lock, then
    /// [`complete`]d.
    Block(Blocked),
    /// `clone` of a thread: start it with this state (tid to fill in),
    /// then answer with its tid.
    Spawn(Box<Thread>),
    /// The thread ended (`exit` with other threads left).
    ThreadExit,
}

/// A call answered at once, or to be made without the lock.
#[derive(Debug)]
enum Now {
    Value(u64),
    Later(Blocked),
}

/// A host call prepared under the guest's lock, made outside it.
#[derive(Debug)]
pub enum Blocked {
    /// A forwarded call.
    Forward(Prepared),
    /// A call on guest RAM itself (`read`/`write` into it, `futex` on it);
    /// `iov` and `buf` hold what `args` point to.
    Raw {
        nr: u64,
        args: [u64; 6],
        iov: Vec<libc::iovec>,
        buf: Vec<u8>,
    },
    /// `rt_sigsuspend`/`pause` with this mask (and the mask to restore).
    Suspend { mask: u64, old: Option<u64> },
    /// `sendmsg`/`recvmsg` with a host `msghdr` whose data buffers are
    /// pieces of guest RAM ([`msg`]).
    Msg(Box<Message>),
}

/// A `sendmsg`/`recvmsg` prepared for the host: `hdr` is the host
/// `struct msghdr` (56 bytes) pointing at `name`, `iov` (guest RAM) and
/// `control`; `user_hdr` is the user's `msghdr`.
#[derive(Debug)]
pub struct Message {
    nr: u64,
    args: [u64; 6],
    hdr: Vec<u8>,
    name: Vec<u8>,
    iov: Vec<libc::iovec>,
    control: Vec<u8>,
    user_hdr: u64,
    user_name: u64,
    user_control: u64,
}

impl Blocked {
    /// Make the call (without the lock: it touches no guest state but the
    /// signal atomics and RAM words).
    pub fn call(&self) -> SysResult {
        match self {
            Blocked::Forward(f) => host(f.nr, f.host_args),
            Blocked::Raw { nr, args, iov, buf } => {
                let _ = (iov, buf);
                host(*nr, *args)
            }
            Blocked::Msg(m) => {
                let _ = (&m.hdr, &m.name, &m.iov, &m.control);
                host(m.nr, m.args)
            }
            Blocked::Suspend { mask, .. } => {
                let m = *mask;
                while signal::pending() & !m == 0 {
                    // Ends when a host handler ran (EINTR) with mask `m`.
                    let _ = host(
                        libc::SYS_rt_sigsuspend as u64,
                        [&m as *const u64 as u64, 8, 0, 0, 0, 0],
                    );
                }
                Err(libc::EINTR)
            }
        }
    }
}

/// The arguments of the system call in `p.tf`.
fn args(p: &Proc) -> [u64; 6] {
    [
        p.tf.tf_rdi,
        p.tf.tf_rsi,
        p.tf.tf_rdx,
        p.tf.tf_r10,
        p.tf.tf_r8,
        p.tf.tf_r9,
    ]
}

/// Finish the blocked call `b` of the served thread, which returned `ret`.
pub fn complete(k: &mut Kernel, p: &mut Proc, b: Blocked, ret: SysResult) -> Option<Exit> {
    let ret = match b {
        Blocked::Forward(f) => complete_forward(k, p, f, ret),
        Blocked::Raw { .. } => ret,
        Blocked::Msg(m) => complete_msg(k, p, &m, ret),
        Blocked::Suspend { mask, old } => {
            p.sig.mask = mask;
            p.sig.saved_mask = old;
            ret
        }
    };
    let nr = p.tf.tf_rax;
    let a = args(p);
    answer(k, p, nr, a, ret)
}

/// Serve the system call in `p.tf`.
pub fn serve(k: &mut Kernel, p: &mut Proc) -> Result<Outcome, KernelError> {
    let nr = p.tf.tf_rax;
    let a = args(p);
    let block = |r: Result<Blocked, i32>| match r {
        Ok(b) => Ok(Outcome::Block(b)),
        Err(e) => Err(e),
    };
    let ret: SysResult = match nr {
        231 => return Ok(Outcome::Done(Some(Exit::Code(a[0] as i32 & 0xff)))),
        60 if p.threads > 1 => {
            thread_exit(k, p);
            return Ok(Outcome::ThreadExit);
        }
        60 => return Ok(Outcome::Done(Some(Exit::Code(a[0] as i32 & 0xff)))),
        56 if a[0] & process::CLONE_THREAD != 0 => match process::thread(p, a) {
            Ok(t) => return Ok(Outcome::Spawn(t)),
            Err(e) => Err(e),
        },
        0 | 1 | 17 | 18 => {
            let off = (nr >= 17).then_some(a[3]);
            match block(rw(k, p, nr == 0 || nr == 17, a[0], &[(a[1], a[2])], off)) {
                Ok(o) => return Ok(o),
                Err(e) => Err(e),
            }
        }
        19 | 20 | 295 | 296 => match block(vector_rw(k, p, nr, a)) {
            Ok(o) => return Ok(o),
            Err(e) => Err(e),
        },
        7 | 271 => match block(poll(k, p, nr, a)) {
            Ok(o) => return Ok(o),
            Err(e) => Err(e),
        },
        23 | 270 => match block(select(k, p, nr, a)) {
            Ok(o) => return Ok(o),
            Err(e) => Err(e),
        },
        46 | 47 => match block(msg(k, p, nr == 47, a)) {
            Ok(o) => return Ok(o),
            Err(e) => Err(e),
        },
        // epoll_wait, epoll_pwait: may block
        232 | 281 => {
            if a[2] as i32 <= 0 || a[2] > 4096 {
                return Ok(Outcome::Done(answer(k, p, nr, a, Err(libc::EINVAL))));
            }
            let events = OutItems(a[2] as usize * 12, 12);
            let kinds = if nr == 232 {
                vec![Fd, events, Val, Val]
            } else {
                vec![Fd, events, Val, Val, In(8), Val]
            };
            match block(prepare(k, p, nr, &a, kinds).map(Blocked::Forward)) {
                Ok(o) => return Ok(o),
                Err(e) => Err(e),
            }
        }
        // nanosleep, clock_nanosleep, wait4, waitid, and the socket calls
        // that wait for a peer: may block
        35 | 230 | 61 | 247 | 42 | 43 | 288 | 44 | 45 => {
            let kinds: &[Arg] = match nr {
                42 => &[Fd, InN(2), Val],                            // connect
                43 => &[Fd, OutLen(2), InOut(4)],                    // accept
                288 => &[Fd, OutLen(2), InOut(4), Val],              // accept4
                44 => &[Fd, InN(2), Val, Val, InN(5), Val],          // sendto
                45 => &[Fd, OutN(2), Val, Val, OutLen(5), InOut(4)], // recvfrom
                _ => spec(nr).unwrap_or(&[]),
            };
            match block(prepare(k, p, nr, &a, kinds.to_vec()).map(Blocked::Forward)) {
                Ok(o) => return Ok(o),
                Err(e) => Err(e),
            }
        }
        128 => match sigtimedwait(k, p, a) {
            Ok(Now::Value(sig)) => Ok(sig),
            Ok(Now::Later(b)) => return Ok(Outcome::Block(b)),
            Err(e) => Err(e),
        },
        130 => match block(sigsuspend(k, p, a[0], a[1])) {
            Ok(o) => return Ok(o),
            Err(e) => Err(e),
        },
        34 => {
            return Ok(Outcome::Block(Blocked::Suspend {
                mask: p.sig.mask,
                old: None,
            }));
        }
        202 => match futex(k, p, a) {
            Ok(Now::Value(v)) => Ok(v),
            Ok(Now::Later(b)) => return Ok(Outcome::Block(b)),
            Err(e) => Err(e),
        },
        15 => {
            if k.trace == Trace::All {
                eprintln!("minikernel: [{}] syscall 15 (rt_sigreturn)", p.pid);
            }
            return Ok(Outcome::Done(signal::sigreturn(k, p).err()));
        }
        127 => sigpending(k, p, a[0], a[1]),
        37 => forward(k, p, nr, &a, &[Val]),          // alarm
        36 => forward(k, p, nr, &a, &[Val, Out(32)]), // getitimer
        38 => forward(k, p, nr, &a, &[Val, In(32), Out(32)]), // setitimer
        9 => mmap(k, p, a),
        10 => mprotect(k, p, a[0], a[1], a[2] as i32),
        11 => munmap(k, p, a[0], a[1]),
        12 => Ok(brk(k, p, a[0])?),
        25 => mremap(k, p, a),
        26 => msync(k, p, a[0], a[1], a[2]),
        28 => madvise(k, p, a[0], a[1], a[2] as i32),
        13 => sigaction(k, p, a),
        14 => sigprocmask(k, p, a),
        131 => sigaltstack(k, p, a[0], a[1]),
        16 => ioctl(k, p, a),
        72 => fcntl(k, p, a),
        157 => match a[0] {
            15 => forward(k, p, nr, &a, &[Val, In(16)]), // PR_SET_NAME
            16 => forward(k, p, nr, &a, &[Val, Out(16)]), // PR_GET_NAME
            _ => Err(libc::EINVAL),
        },
        39 => Ok(p.pid as u64),   // getpid
        186 => Ok(p.tid as u64),  // gettid
        110 => Ok(p.ppid as u64), // getppid
        57 | 58 => process::fork(k, p, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
        56 => process::fork(k, p, a),
        59 => process::execve(k, p, a),
        // With other threads, the host picks the thread that takes it.
        62 if a[0] as i32 == p.pid && p.threads > 1 => forward(k, p, nr, &a, &[Val, Val]),
        62 if a[0] as i32 == p.pid => kill(p, a[0] as i32, a[1] as i32, signal::SI_USER),
        200 if a[0] as i32 == p.tid => kill(p, p.pid, a[1] as i32, signal::SI_TKILL),
        234 if a[0] as i32 == p.pid && a[1] as i32 == p.tid => {
            kill(p, p.pid, a[2] as i32, signal::SI_TKILL)
        }
        // Another thread of the process: the host's tgkill reaches its host
        // thread.
        200 => host(libc::SYS_tgkill as u64, [p.pid as u64, a[0], a[1], 0, 0, 0]),
        234 if a[0] as i32 == p.pid => host(libc::SYS_tgkill as u64, [a[0], a[1], a[2], 0, 0, 0]),
        234 => Err(libc::ESRCH), // tgkill
        158 => arch_prctl(k, p, a[0], a[1]),
        218 => {
            p.clear_tid = a[0];
            Ok(p.tid as u64)
        } // set_tid_address
        273 => set_robust_list(p, a[0], a[1]),
        274 => get_robust_list(k, p, a[0], a[1], a[2]),
        334 => Err(libc::ENOSYS), // rseq
        2 | 257 if is_proc_self_cmdline(k, p, if nr == 2 { a[0] } else { a[1] }) => {
            open_cmdline(p, if nr == 2 { a[1] } else { a[2] })
        }
        89 | 267 if is_proc_self_exe(k, p, if nr == 89 { a[0] } else { a[1] }) => {
            let (buf, n) = if nr == 89 { (a[1], a[2]) } else { (a[2], a[3]) };
            let exe = p.exe.as_os_str().as_encoded_bytes().to_vec();
            let n = exe.len().min(n as usize);
            if p.mm.write(&k.ram, &mut k.frames, buf, &exe[..n]) {
                Ok(n as u64)
            } else {
                Err(libc::EFAULT)
            }
        }
        _ => match spec(nr) {
            Some(kinds) => forward(k, p, nr, &a, kinds),
            None => {
                if k.trace != Trace::Off {
                    eprintln!(
                        "minikernel: unknown syscall {nr} ({:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}) -> ENOSYS",
                        a[0], a[1], a[2], a[3], a[4], a[5]
                    );
                }
                Err(libc::ENOSYS)
            }
        },
    };
    Ok(Outcome::Done(answer(k, p, nr, a, ret)))
}

/// Answer system call `nr` (arguments `a`) with `ret`: restart it, or put
/// the result in `rax`.
fn answer(k: &mut Kernel, p: &mut Proc, nr: u64, a: [u64; 6], ret: SysResult) -> Option<Exit> {
    if ret == Err(libc::EINTR) && nr != 130 && nr != 34 {
        let restart = match signal::next_handler(p) {
            // A handler runs: Linux restarts only ERESTARTSYS calls of an
            // SA_RESTART handler.
            Some(flags) => {
                flags & signal::SA_RESTART != 0 && signal::restart_kind(nr) == signal::Restart::Sys
            }
            // No handler to run (the signal was ignored after all): the
            // call restarts.
            None => true,
        };
        if restart {
            p.tf.tf_rip -= 2;
            p.tf.tf_rax = nr;
            return None;
        }
    }
    let raw = match ret {
        Ok(v) => v,
        Err(e) => (-i64::from(e)) as u64,
    };
    if k.trace == Trace::All {
        eprintln!(
            "minikernel: [{}] syscall {nr}({:#x}, {:#x}, {:#x}, {:#x}) = {}",
            p.pid, a[0], a[1], a[2], a[3], raw as i64
        );
    }
    p.tf.tf_rax = raw;
    None
}

/// Whether the path at `va` is the process's own `cmdline` in `/proc`
/// (`/proc/self/cmdline`, `/proc/thread-self/cmdline`, `/proc/PID/cmdline`).
fn is_proc_self_cmdline(k: &mut Kernel, p: &mut Proc, va: u64) -> bool {
    let Ok(s) = p.mm.cstr(&k.ram, &mut k.frames, va, 4096) else {
        return false;
    };
    let own = format!("/proc/{}/cmdline", p.pid);
    s == b"/proc/self/cmdline" || s == b"/proc/thread-self/cmdline" || s == own.as_bytes()
}

/// `open` of the process's own `/proc/.../cmdline`: the host's file would
/// show the minikernel's arguments, so the answer is a descriptor of a
/// sealed memory file holding the user program's (read-only; `O_CLOEXEC`
/// as asked).
fn open_cmdline(p: &Proc, flags: u64) -> SysResult {
    let flags = flags as i32;
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(libc::EACCES);
    }
    let mfd_flags = libc::MFD_ALLOW_SEALING
        | if flags & libc::O_CLOEXEC != 0 {
            libc::MFD_CLOEXEC
        } else {
            0
        };
    let fd = host(
        libc::SYS_memfd_create as u64,
        [c"cmdline".as_ptr() as u64, u64::from(mfd_flags), 0, 0, 0, 0],
    )?;
    let data = &p.cmdline;
    let written = host(
        libc::SYS_pwrite64 as u64,
        [fd, data.as_ptr() as u64, data.len() as u64, 0, 0, 0],
    );
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    let sealed = host(
        libc::SYS_fcntl as u64,
        [fd, libc::F_ADD_SEALS as u64, seals as u64, 0, 0, 0],
    );
    if let Err(e) = written.and(sealed) {
        let _ = host(libc::SYS_close as u64, [fd, 0, 0, 0, 0, 0]);
        return Err(e);
    }
    Ok(fd)
}

/// Whether the path at `va` is `/proc/self/exe`.
fn is_proc_self_exe(k: &mut Kernel, p: &mut Proc, va: u64) -> bool {
    p.mm.cstr(&k.ram, &mut k.frames, va, 4096)
        .is_ok_and(|s| s == b"/proc/self/exe")
}

/// The host result of a raw system call.
fn host(nr: u64, a: [u64; 6]) -> SysResult {
    // SAFETY: every pointer argument points into a buffer of the
    // minikernel's own (or into guest RAM) of at least the size the call
    // uses: `forward` and the callers below build them that way.
    let r = unsafe { syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if (-4095..0).contains(&r) {
        Err(-r as i32)
    } else {
        Ok(r as u64)
    }
}

/// Forward `nr` with arguments `a` of kinds `kinds`.
fn forward(k: &mut Kernel, p: &mut Proc, nr: u64, a: &[u64; 6], kinds: &[Arg]) -> SysResult {
    let f = prepare(k, p, nr, a, kinds.to_vec())?;
    let ret = host(f.nr, f.host_args);
    complete_forward(k, p, f, ret)
}

/// A forwarded call with its user buffers copied in.
#[derive(Debug)]
pub struct Prepared {
    nr: u64,
    a: [u64; 6],
    kinds: Vec<Arg>,
    bufs: Vec<Option<Vec<u8>>>,
    host_args: [u64; 6],
}

/// Copy in the buffers of `nr` with arguments `a` of kinds `kinds`.
fn prepare(
    k: &mut Kernel,
    p: &mut Proc,
    nr: u64,
    a: &[u64; 6],
    kinds: Vec<Arg>,
) -> Result<Prepared, i32> {
    let mut bufs: Vec<Option<Vec<u8>>> = vec![None; 6];
    let mut host_args = *a;
    for (i, kind) in kinds.iter().enumerate() {
        let va = a[i];
        match *kind {
            Val => {}
            Fd => {
                if k.reserved_fd(va) {
                    return Err(libc::EBADF);
                }
            }
            Pid => host_args[i] = 0,
            Path if va == 0 => {}
            Path => {
                let mut s = p.mm.cstr(&k.ram, &mut k.frames, va, 4096)?;
                if s == b"/proc/self/exe" {
                    s = p.exe.as_os_str().as_encoded_bytes().to_vec();
                }
                s.push(0);
                bufs[i] = Some(s);
            }
            In(_) | InOut(_) | Out(_) | OutItems(..) if va == 0 => {}
            In(n) | InOut(n) => {
                let mut b = vec![0u8; n];
                if !p.mm.read(&k.ram, &mut k.frames, va, &mut b) {
                    return Err(libc::EFAULT);
                }
                bufs[i] = Some(b);
            }
            Out(n) | OutItems(n, _) => bufs[i] = Some(vec![0u8; n]),
            OutN(len) => bufs[i] = Some(vec![0u8; a[len].min(MAX_IO) as usize]),
            InN(_) | OutLen(_) | SigmaskPair if va == 0 => {}
            InN(len) => {
                let mut b = vec![0u8; a[len].min(MAX_IO) as usize];
                if !p.mm.read(&k.ram, &mut k.frames, va, &mut b) {
                    return Err(libc::EFAULT);
                }
                bufs[i] = Some(b);
            }
            OutLen(len_at) => {
                let mut l = [0u8; 4];
                if a[len_at] == 0 || !p.mm.read(&k.ram, &mut k.frames, a[len_at], &mut l) {
                    return Err(libc::EFAULT);
                }
                let n = u64::from(u32::from_le_bytes(l)).min(MAX_IO);
                bufs[i] = Some(vec![0u8; n as usize]);
            }
            SigmaskPair => {
                let mut pair = [0u8; 16];
                if !p.mm.read(&k.ram, &mut k.frames, va, &mut pair) {
                    return Err(libc::EFAULT);
                }
                let (set, len) = (word(&pair, 0), word(&pair, 8));
                // [the set, the host pair pointing at it]
                let mut b = vec![0u8; 24];
                if set != 0 {
                    if len != 8 {
                        return Err(libc::EINVAL);
                    }
                    if !p.mm.read(&k.ram, &mut k.frames, set, &mut b[..8]) {
                        return Err(libc::EFAULT);
                    }
                }
                let host_set = if set == 0 { 0 } else { b.as_ptr() as u64 };
                b[8..16].copy_from_slice(&host_set.to_le_bytes());
                b[16..24].copy_from_slice(&len.to_le_bytes());
                bufs[i] = Some(b);
            }
        }
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        if let Some(b) = b {
            host_args[i] = b.as_mut_ptr() as u64;
            if kinds.get(i) == Some(&SigmaskPair) {
                host_args[i] += 8;
            }
        }
    }
    Ok(Prepared {
        nr,
        a: *a,
        kinds,
        bufs,
        host_args,
    })
}

/// Copy out the results of the forwarded call `f`, which returned `ret`
/// (`nanosleep`'s remaining time also after `EINTR`).
fn complete_forward(k: &mut Kernel, p: &mut Proc, f: Prepared, ret: SysResult) -> SysResult {
    let sleep_eintr = ret == Err(libc::EINTR) && (f.nr == 35 || f.nr == 230);
    let n = match ret {
        Ok(n) => n,
        Err(_) if sleep_eintr => 0,
        Err(e) => return Err(e),
    };
    for (i, kind) in f.kinds.iter().enumerate() {
        let Some(b) = &f.bufs[i] else { continue };
        let bytes = match *kind {
            Out(_) | InOut(_) => &b[..],
            OutN(_) => &b[..(n as usize).min(b.len())],
            OutItems(_, item) => &b[..(n as usize).saturating_mul(item).min(b.len())],
            OutLen(len_at) => {
                let written = f.bufs[len_at]
                    .as_ref()
                    .map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]));
                &b[..(written as usize).min(b.len())]
            }
            _ => continue,
        };
        if !p.mm.write(&k.ram, &mut k.frames, f.a[i], bytes) {
            return Err(libc::EFAULT);
        }
    }
    ret
}

/// `read`/`write` (`pread64`/`pwrite64` with `off`) of the user buffers
/// `segs` (address, length): host `readv`/`writev`/`preadv`/`pwritev`
/// straight into guest RAM.
fn rw(
    k: &mut Kernel,
    p: &mut Proc,
    reading: bool,
    fd: u64,
    segs: &[(u64, u64)],
    off: Option<u64>,
) -> Result<Blocked, i32> {
    if k.reserved_fd(fd) {
        return Err(libc::EBADF);
    }
    let mut iov: Vec<libc::iovec> = Vec::new();
    let mut total = 0u64;
    let mut asked = 0u64;
    'segs: for &(va, len) in segs {
        let len = len.min(MAX_IO - total);
        asked += len;
        let pieces =
            p.mm.translate(&k.ram, &mut k.frames, va, len, reading)
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
    let iovp = iov.as_ptr() as u64;
    let cnt = iov.len() as u64;
    let (nr, args) = match (reading, off) {
        (true, None) => (libc::SYS_readv, [fd, iovp, cnt, 0, 0, 0]),
        (false, None) => (libc::SYS_writev, [fd, iovp, cnt, 0, 0, 0]),
        (true, Some(o)) => (libc::SYS_preadv, [fd, iovp, cnt, o, 0, 0]),
        (false, Some(o)) => (libc::SYS_pwritev, [fd, iovp, cnt, o, 0, 0]),
    };
    Ok(Blocked::Raw {
        nr: nr as u64,
        args,
        iov,
        buf: Vec::new(),
    })
}

/// `readv`/`writev`/`preadv`/`pwritev`: the user's iovec array, then [`rw`].
fn vector_rw(k: &mut Kernel, p: &mut Proc, nr: u64, a: [u64; 6]) -> Result<Blocked, i32> {
    let cnt = a[2];
    if cnt > 1024 {
        return Err(libc::EINVAL);
    }
    let mut raw = vec![0u8; cnt as usize * 16];
    if !p.mm.read(&k.ram, &mut k.frames, a[1], &mut raw) {
        return Err(libc::EFAULT);
    }
    let segs: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|c| (word(c, 0), word(c, 8)))
        .collect();
    let reading = nr == 19 || nr == 295;
    let off = (nr >= 295).then_some(a[3]);
    rw(k, p, reading, a[0], &segs, off)
}

/// The little-endian word at byte `at` of `b`.
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// `poll(fds, nfds, timeout)` and `ppoll(fds, nfds, tsp, sigmask, size)`.
fn poll(k: &mut Kernel, p: &mut Proc, nr: u64, a: [u64; 6]) -> Result<Blocked, i32> {
    let nfds = a[1];
    if nfds > 1024 {
        return Err(libc::EINVAL);
    }
    let fds = InOut(nfds as usize * 8);
    let kinds = if nr == 7 {
        vec![fds, Val, Val]
    } else {
        vec![fds, Val, In(16), In(8), Val]
    };
    prepare(k, p, nr, &a, kinds).map(Blocked::Forward)
}

/// `select(nfds, r, w, e, timeout)` and `pselect6(nfds, r, w, e, tsp,
/// sigmask)`: each set is `nfds` bits rounded up to words, copied in and
/// out; `select` also gives back the time left, as Linux does.
fn select(k: &mut Kernel, p: &mut Proc, nr: u64, a: [u64; 6]) -> Result<Blocked, i32> {
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
fn msg(k: &mut Kernel, p: &mut Proc, receiving: bool, a: [u64; 6]) -> Result<Blocked, i32> {
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
fn complete_msg(k: &mut Kernel, p: &mut Proc, m: &Message, ret: SysResult) -> SysResult {
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

/// `mremap(old, old_len, new_len, flags, new_addr)`: shrink in place, grow
/// in place when the room after is free, else (`MREMAP_MAYMOVE`) move the
/// pages (their leaves, not their bytes) to a free range or (`MREMAP_FIXED`)
/// to `new_addr`. The old range must lie in one area.
fn mremap(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
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
    if flags & FIXED == 0 {
        if new_len <= old_len {
            if new_len < old_len && p.mm.remove(&k.ram, &mut k.frames, old + new_len, old_end) {
                inval(p, old + new_len, old_end)?;
            }
            return Ok(old);
        }
        let grown = old.checked_add(new_len).ok_or(libc::ENOMEM)?;
        if grown <= k.user_max && !p.mm.overlaps(old_end, grown) {
            p.mm.add_area(old_end, grown, area.prot, area.shared);
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
    Ok(to)
}

/// `msync(addr, len, flags)`: the range must be mapped (`ENOMEM`).
fn msync(_k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, flags: u64) -> SysResult {
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
    Ok(0)
}

/// `MADV_INVAL` after a change that removed pages or rights.
fn inval(p: &Proc, start: u64, end: u64) -> Result<(), i32> {
    p.vm.inval(start, end - start).map_err(|e| e.errno.0)
}

/// `mmap(addr, len, prot, flags, fd, off)`: anonymous memory (demand-zero),
/// or a private copy of a file's bytes.
fn mmap(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
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
    if !anon {
        if k.reserved_fd(fd) {
            return Err(libc::EBADF);
        }
        if flags & MAP_SHARED != 0 && prot & PROT_WRITE != 0 {
            return Err(libc::ENODEV);
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
    }
    Ok(start)
}

/// `munmap(addr, len)`.
fn munmap(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64) -> SysResult {
    if !addr.is_multiple_of(vkabi::PAGE_SIZE) || len == 0 {
        return Err(libc::EINVAL);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::EINVAL)?;
    if end > k.user_max {
        return Err(libc::EINVAL);
    }
    if p.mm.remove(&k.ram, &mut k.frames, addr, end) {
        inval(p, addr, end)?;
    }
    Ok(0)
}

/// `mprotect(addr, len, prot)`.
fn mprotect(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, prot: i32) -> SysResult {
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

/// `madvise`: `MADV_DONTNEED` and `MADV_FREE` drop the pages (they read
/// back as zero); other advice is accepted and ignored.
fn madvise(k: &mut Kernel, p: &mut Proc, addr: u64, len: u64, advice: i32) -> SysResult {
    if !addr.is_multiple_of(vkabi::PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    let end = addr.checked_add(page_up(len)).ok_or(libc::EINVAL)?;
    if (advice == libc::MADV_DONTNEED || advice == libc::MADV_FREE)
        && p.mm.drop_pages(&k.ram, &mut k.frames, addr, end)
    {
        inval(p, addr, end)?;
    }
    Ok(0)
}

/// `brk(addr)`: move the break (within the room above the program); the
/// answer is the break.
fn brk(k: &mut Kernel, p: &mut Proc, addr: u64) -> Result<u64, KernelError> {
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

/// `rt_sigaction(sig, act, oact, sigsetsize)`, mirrored on the host.
fn sigaction(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    let (sig, act, oact) = (a[0], a[1], a[2]);
    if a[3] != 8 || !(1..=64).contains(&sig) {
        return Err(libc::EINVAL);
    }
    let slot = sig as usize - 1;
    let mut new = None;
    if act != 0 {
        if sig == 9 || sig == 19 {
            return Err(libc::EINVAL);
        }
        let mut b = [0u8; 32];
        if !p.mm.read(&k.ram, &mut k.frames, act, &mut b) {
            return Err(libc::EFAULT);
        }
        new = Some([word(&b, 0), word(&b, 8), word(&b, 16), word(&b, 24)]);
    }
    if oact != 0 {
        let old: Vec<u8> = p.sig.actions[slot]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        if !p.mm.write(&k.ram, &mut k.frames, oact, &old) {
            return Err(libc::EFAULT);
        }
    }
    if let Some(new) = new {
        p.sig.actions[slot] = new;
        signal::set_host_action(sig as i32, new[0]);
    }
    Ok(0)
}

/// `rt_sigprocmask(how, set, oset, sigsetsize)`, mirrored on the host.
fn sigprocmask(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    let (how, set, oset) = (a[0], a[1], a[2]);
    if a[3] != 8 {
        return Err(libc::EINVAL);
    }
    let old = p.sig.mask;
    if set != 0 {
        let mut b = [0u8; 8];
        if !p.mm.read(&k.ram, &mut k.frames, set, &mut b) {
            return Err(libc::EFAULT);
        }
        let s = u64::from_le_bytes(b);
        let mask = match how {
            0 => old | s,
            1 => old & !s,
            2 => s,
            _ => return Err(libc::EINVAL),
        };
        signal::set_mask(p, mask);
    }
    if oset != 0 && !p.mm.write(&k.ram, &mut k.frames, oset, &old.to_le_bytes()) {
        return Err(libc::EFAULT);
    }
    Ok(0)
}

/// `sigaltstack(ss, oss)`.
fn sigaltstack(k: &mut Kernel, p: &mut Proc, ss: u64, oss: u64) -> SysResult {
    let old: Vec<u8> = p
        .sig
        .altstack
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    if ss != 0 {
        let mut b = [0u8; 24];
        if !p.mm.read(&k.ram, &mut k.frames, ss, &mut b) {
            return Err(libc::EFAULT);
        }
        p.sig.altstack = [word(&b, 0), word(&b, 8) & 0xffff_ffff, word(&b, 16)];
    }
    if oss != 0 && !p.mm.write(&k.ram, &mut k.frames, oss, &old) {
        return Err(libc::EFAULT);
    }
    Ok(0)
}

/// `ioctl`: terminal queries and a few descriptor controls are forwarded;
/// anything else is `ENOTTY`.
fn ioctl(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    let kinds: &[Arg] = match a[1] {
        0x5401 => &[Fd, Val, Out(36)],         // TCGETS
        0x5402..=0x5404 => &[Fd, Val, In(36)], // TCSETS, TCSETSW, TCSETSF
        0x5413 => &[Fd, Val, Out(8)],          // TIOCGWINSZ
        0x540F | 0x541B => &[Fd, Val, Out(4)], // TIOCGPGRP, FIONREAD
        0x5421 => &[Fd, Val, In(4)],           // FIONBIO
        0x5451 | 0x5450 => &[Fd, Val],         // FIOCLEX, FIONCLEX
        _ => {
            if k.reserved_fd(a[0]) {
                return Err(libc::EBADF);
            }
            return Err(libc::ENOTTY);
        }
    };
    forward(k, p, 16, &a, kinds)
}

/// `fcntl`: integer commands forwarded, record locks with their struct.
fn fcntl(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> SysResult {
    let kinds: &[Arg] = match a[1] as i32 {
        libc::F_GETLK | libc::F_SETLK | libc::F_SETLKW | 36..=38 => &[Fd, Val, InOut(32)],
        _ => &[Fd, Val, Val],
    };
    forward(k, p, 72, &a, kinds)
}

/// `kill`/`tkill`/`tgkill` of the process itself: the signal is queued
/// (unless ignored) and acted on before the program runs again. Other pids:
/// `ESRCH`.
fn kill(p: &mut Proc, pid: i32, sig: i32, code: i32) -> SysResult {
    if !(0..=64).contains(&sig) {
        return Err(libc::EINVAL);
    }
    if pid != p.pid && pid != 0 && pid != -1 {
        return Err(libc::ESRCH);
    }
    if sig == 0 {
        return Ok(0);
    }
    let handler = p.sig.actions[sig as usize - 1][0];
    let ignored_by_default = matches!(
        sig,
        libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT
    );
    if p.sig.mask & signal::bit(sig) == 0 && (handler == 1 || (handler == 0 && ignored_by_default))
    {
        return Ok(0);
    }
    signal::queue(sig, &signal::user_info(sig, code));
    Ok(0)
}

/// `rt_sigpending(set, size)`: queued signals and the host's pending ones.
fn sigpending(k: &mut Kernel, p: &mut Proc, set: u64, size: u64) -> SysResult {
    if size != 8 {
        return Err(libc::EINVAL);
    }
    let mut host_set = 0u64;
    host(
        libc::SYS_rt_sigpending as u64,
        [&mut host_set as *mut u64 as u64, 8, 0, 0, 0, 0],
    )?;
    let v = (signal::pending() | host_set) & p.sig.mask;
    if !p.mm.write(&k.ram, &mut k.frames, set, &v.to_le_bytes()) {
        return Err(libc::EFAULT);
    }
    Ok(0)
}

/// `rt_sigtimedwait(set, info, timeout, size)`: a signal of `set` queued
/// for the thread at once, else the host's wait (which takes the signal
/// from the host's queue, its handler not run).
fn sigtimedwait(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> Result<Now, i32> {
    if a[3] != 8 {
        return Err(libc::EINVAL);
    }
    let mut b = [0u8; 8];
    if !p.mm.read(&k.ram, &mut k.frames, a[0], &mut b) {
        return Err(libc::EFAULT);
    }
    let set = u64::from_le_bytes(b);
    let mine = signal::pending() & set;
    if mine == 0 {
        let kinds = vec![In(8), Out(128), In(16), Val];
        return prepare(k, p, 128, &a, kinds).map(|f| Now::Later(Blocked::Forward(f)));
    }
    let sig = mine.trailing_zeros() as i32 + 1;
    let info: Vec<u8> = signal::take(sig)
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    if a[1] != 0 && !p.mm.write(&k.ram, &mut k.frames, a[1], &info) {
        return Err(libc::EFAULT);
    }
    Ok(Now::Value(sig as u64))
}

/// `rt_sigsuspend(mask, size)`.
fn sigsuspend(k: &mut Kernel, p: &mut Proc, set: u64, size: u64) -> Result<Blocked, i32> {
    if size != 8 {
        return Err(libc::EINVAL);
    }
    let mut b = [0u8; 8];
    if !p.mm.read(&k.ram, &mut k.frames, set, &mut b) {
        return Err(libc::EFAULT);
    }
    let mask = u64::from_le_bytes(b) & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
    Ok(Blocked::Suspend {
        mask,
        old: Some(p.sig.mask),
    })
}

/// The host address of the user's 4-byte futex word at `va` (in guest
/// RAM, which every host thread and process of the guest maps), or EFAULT.
fn futex_word(k: &mut Kernel, p: &mut Proc, va: u64) -> Result<u64, i32> {
    let pa = futex_pa(k, p, va, false)?;
    Ok(k.ram.ptr(pa, 4) as u64)
}

/// The physical address of the user's 4-byte futex word at `va` (readable,
/// or writable when `write`), EINVAL if unaligned, EFAULT if inaccessible.
fn futex_pa(k: &mut Kernel, p: &mut Proc, va: u64, write: bool) -> Result<u64, i32> {
    if !va.is_multiple_of(4) {
        return Err(libc::EINVAL);
    }
    let pieces =
        p.mm.translate(&k.ram, &mut k.frames, va, 4, write)
            .map_err(|_| libc::EFAULT)?;
    match pieces.as_slice() {
        [(pa, 4)] => Ok(*pa),
        _ => Err(libc::EFAULT),
    }
}

/// `futex(uaddr, op, val, timeout, uaddr2, val3)`: the host's futex on the
/// word in guest RAM (shared, as RAM is shared between the guest's host
/// processes). A wait is [`Now::Later`], made without the lock.
fn futex(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> Result<Now, i32> {
    const PRIVATE: u64 = 128;
    const CLOCK_REALTIME: u64 = 256;
    let (uaddr, op, timeout) = (a[0], a[1], a[3]);
    let cmd = op & !(PRIVATE | CLOCK_REALTIME);
    let w = futex_word(k, p, uaddr)?;
    let host_op = cmd | (op & CLOCK_REALTIME);
    match cmd {
        // FUTEX_WAIT, FUTEX_WAIT_BITSET
        0 | 9 => {
            let mut buf = Vec::new();
            let mut tsp = 0;
            if timeout != 0 {
                buf = vec![0u8; 16];
                if !p.mm.read(&k.ram, &mut k.frames, timeout, &mut buf) {
                    return Err(libc::EFAULT);
                }
                tsp = buf.as_ptr() as u64;
            }
            Ok(Now::Later(Blocked::Raw {
                nr: libc::SYS_futex as u64,
                args: [w, host_op, a[2] as u32 as u64, tsp, 0, a[5] as u32 as u64],
                iov: Vec::new(),
                buf,
            }))
        }
        // FUTEX_WAKE, FUTEX_WAKE_BITSET
        1 | 10 => host(
            libc::SYS_futex as u64,
            [w, host_op, a[2] as u32 as u64, 0, 0, a[5] as u32 as u64],
        )
        .map(Now::Value),
        // FUTEX_REQUEUE, FUTEX_CMP_REQUEUE, FUTEX_WAKE_OP
        3..=5 => {
            let w2 = futex_word(k, p, a[4])?;
            host(
                libc::SYS_futex as u64,
                [w, host_op, a[2] as u32 as u64, a[3], w2, a[5] as u32 as u64],
            )
            .map(Now::Value)
        }
        _ => Err(libc::ENOSYS),
    }
}

/// `set_robust_list(head, len)`: `len` is the size of Linux's
/// `struct robust_list_head` or EINVAL.
fn set_robust_list(p: &mut Proc, head: u64, len: u64) -> SysResult {
    if len != ROBUST_HEAD_LEN {
        return Err(libc::EINVAL);
    }
    p.robust_list = head;
    Ok(0)
}

/// `get_robust_list(pid, head_ptr, len_ptr)` for the calling thread (pid 0
/// or its own tid); another thread's list is not kept where this thread
/// can read it, so that answers ESRCH.
fn get_robust_list(k: &mut Kernel, p: &mut Proc, pid: u64, head: u64, len: u64) -> SysResult {
    if pid != 0 && pid != p.tid as u64 {
        return Err(libc::ESRCH);
    }
    let ok =
        p.mm.write(&k.ram, &mut k.frames, head, &p.robust_list.to_le_bytes())
            && p.mm
                .write(&k.ram, &mut k.frames, len, &ROBUST_HEAD_LEN.to_le_bytes());
    if ok { Ok(0) } else { Err(libc::EFAULT) }
}

/// `sizeof(struct robust_list_head)`: `{ next, futex_offset, list_op_pending }`.
const ROBUST_HEAD_LEN: u64 = 24;

/// A robust futex word's owner-TID bits, and the flags Linux sets in it.
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_WAITERS: u32 = 0x8000_0000;

/// Linux's walk of an exiting thread's robust list (`exit_robust_list`):
/// every futex on it (and the one whose operation was pending) that this
/// thread still owns gets `FUTEX_OWNER_DIED`, keeps `FUTEX_WAITERS`, and
/// one waiter is woken, so the next `pthread_mutex_lock` answers
/// EOWNERDEAD. The list is the user's memory: at most [`ROBUST_LIMIT`]
/// entries are visited (Linux's bound), and an unreadable one ends it.
fn exit_robust_list(k: &mut Kernel, p: &mut Proc) {
    const ROBUST_LIMIT: usize = 2048;
    let head = p.robust_list;
    let mut h = [0u8; 24];
    if head == 0 || !p.mm.read(&k.ram, &mut k.frames, head, &mut h) {
        return;
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let (first, offset, pending) = (word(&h[0..8]), word(&h[8..16]), word(&h[16..24]) & !1);
    let mut entry = first & !1;
    for _ in 0..ROBUST_LIMIT {
        if entry == head || entry == 0 {
            break;
        }
        let mut next = [0u8; 8];
        if !p.mm.read(&k.ram, &mut k.frames, entry, &mut next) {
            break;
        }
        if entry != pending {
            futex_owner_died(k, p, entry.wrapping_add(offset));
        }
        entry = u64::from_le_bytes(next) & !1;
    }
    if pending != 0 {
        futex_owner_died(k, p, pending.wrapping_add(offset));
    }
}

/// Linux's `handle_futex_death` for the word at `va`, if this thread owns it.
fn futex_owner_died(k: &mut Kernel, p: &mut Proc, va: u64) {
    let Ok(pa) = futex_pa(k, p, va, true) else {
        return;
    };
    let mut seen = k.ram.cmpxchg_u32(pa, 0, 0);
    // User threads may set FUTEX_WAITERS meanwhile; a few tries, as each
    // failure means the word changed under us.
    for _ in 0..16 {
        if seen & FUTEX_TID_MASK != p.tid as u32 {
            return;
        }
        let new = (seen & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
        let found = k.ram.cmpxchg_u32(pa, seen, new);
        if found == seen {
            if seen & FUTEX_WAITERS != 0 {
                let w = k.ram.ptr(pa, 4) as u64;
                let _ = host(libc::SYS_futex as u64, [w, 1, 1, 0, 0, 0]);
            }
            return;
        }
        seen = found;
    }
}

/// The end of a thread that is not the last: its robust futexes are
/// released as Linux releases them, then its clear-tid word is zeroed and
/// woken (`CLONE_CHILD_CLEARTID`, `set_tid_address`).
fn thread_exit(k: &mut Kernel, p: &mut Proc) {
    p.threads -= 1;
    exit_robust_list(k, p);
    let word = p.clear_tid;
    if word != 0
        && p.mm.write(&k.ram, &mut k.frames, word, &0u32.to_le_bytes())
        && let Ok(w) = futex_word(k, p, word)
    {
        let _ = host(libc::SYS_futex as u64, [w, 1, 1, 0, 0, 0]);
    }
}

/// `arch_prctl`: the FS and GS bases live in the vextframe.
fn arch_prctl(k: &mut Kernel, p: &mut Proc, code: u64, addr: u64) -> SysResult {
    const ARCH_SET_GS: u64 = 0x1001;
    const ARCH_SET_FS: u64 = 0x1002;
    const ARCH_GET_FS: u64 = 0x1003;
    const ARCH_GET_GS: u64 = 0x1004;
    match code {
        ARCH_SET_FS | ARCH_SET_GS => {
            if addr >= k.user_max {
                return Err(libc::EPERM);
            }
            p.vf.vx_tls[usize::from(code == ARCH_SET_GS)].base = addr;
            Ok(0)
        }
        ARCH_GET_FS | ARCH_GET_GS => {
            let v = p.vf.vx_tls[usize::from(code == ARCH_GET_GS)].base;
            if p.mm.write(&k.ram, &mut k.frames, addr, &v.to_le_bytes()) {
                Ok(0)
            } else {
                Err(libc::EFAULT)
            }
        }
        _ => Err(libc::EINVAL),
    }
}
