//! Processes: each user process is one host process of the minikernel, so
//! pids, process groups, `wait4`, `kill` between processes, descriptors and
//! pipes are the host's own (forwarded), and only memory is the
//! minikernel's business.
//!
//! - [`fork`] (`fork`, `vfork`, `clone` without `CLONE_VM`, or with
//!   `CLONE_VM|CLONE_VFORK` as `posix_spawn` uses it): the parent shares its
//!   frames copy-on-write with a new page table (both lose `RW`, each frame's
//!   share count goes up; [`crate::mm::Mm::fork`]) and invalidates its own
//!   translations, then the minikernel forks on the host; the child forgets
//!   the parent's vmspace and frame share, takes an idle vmspace from the
//!   pool (or creates one) pointing at the new table, and returns 0 to the
//!   user program. At exit a process leaves its vmspace in the pool. Guest RAM and the vmspace registry are shared by the
//!   host processes of a guest (ABI sections 2 and 7), and so is the frame
//!   pool ([`crate::ram::Frames`]).
//! - [`thread`] (`clone` with `CLONE_THREAD`): a new thread of the same
//!   process, on a host thread of its own that RUNs the same vmspace (see
//!   [`crate::trap`]).
//! - [`execve`]: the new program is loaded into a new address space; on
//!   success the old one is freed and the vmspace's window is pointed at the
//!   new tables (`MADV_SETMAP` drops every host translation).
//! - [`finish`]: at exit the vmspace is destroyed and every frame goes back
//!   to the pool; a process killed by a signal dies of that signal on the
//!   host, so its parent's `wait4` sees it (the first process exits with
//!   128 + signal instead, as a shell reports it).
//!
//! This module owns the process life cycle; it builds on [`crate::kernel`]
//! (state and types) and is called by `syscall` and `main`.

use std::path::PathBuf;

use vkabi::{TrapFrame, VextFrame};

use crate::exec;
use crate::kernel::{Exit, Kernel, Proc, Thread, WINDOW_BASE};
use crate::mm::Mm;

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
/// `clone`'s flag for a thread of the caller's process.
pub const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;

/// `clone(flags, newsp, ptid, ctid, tls)` (and `fork`/`vfork` with
/// `flags = SIGCHLD`): a child process with a copy of the address space.
/// Threads (`CLONE_THREAD`) are [`thread`]; `CLONE_VM` without
/// `CLONE_VFORK` or `CLONE_THREAD` is `ENOSYS`.
pub fn fork(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> Result<u64, i32> {
    let (flags, newsp, ptid, ctid, tls) = (a[0], a[1], a[2], a[3], a[4]);
    if flags & CLONE_THREAD != 0 || (flags & CLONE_VM != 0 && flags & CLONE_VFORK == 0) {
        return Err(libc::ENOSYS);
    }
    let t0 = std::time::Instant::now();
    let sp = vkabi::PAGE_SIZE * (p.tf.tf_rsp / vkabi::PAGE_SIZE);
    let hot = sp.saturating_sub(vkabi::PAGE_SIZE)..sp.saturating_add(vkabi::PAGE_SIZE);
    let forked = p.mm.fork(&k.ram, &mut k.frames, hot);
    // The parent's writable leaves lost RW: their host translations must
    // go (a few ranges one by one, many at once; on failure, everything).
    let inval = match &forked {
        Ok((_, lost)) if lost.len() <= 8 => {
            lost.iter().try_for_each(|&(s, e)| p.vm.inval(s, e - s))
        }
        _ => p.vm.inval(WINDOW_BASE, k.user_max - WINDOW_BASE),
    };
    let (child_mm, _) = forked.map_err(|_| libc::ENOMEM)?;
    inval.map_err(|e| e.errno.0)?;
    let t1 = std::time::Instant::now();
    // SAFETY: the child touches no lock another host thread could hold:
    // the guest's lock is held by this thread, and the C library makes
    // malloc safe after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EAGAIN);
        child_mm.pt.destroy(&k.ram, &mut k.frames);
        return Err(e);
    }
    if pid > 0 {
        k.stats.forks += 1;
        k.stats.fork_mm_ns += (t1 - t0).as_nanos() as u64;
        k.stats.fork_host_ns += t1.elapsed().as_nanos() as u64;
        // The copy's frames belong to the child now.
        if flags & CLONE_PARENT_SETTID != 0 {
            p.mm.write(&k.ram, &mut k.frames, ptid, &pid.to_le_bytes());
        }
        return Ok(pid as u64);
    }
    // The child: the frames this process held are its parent's; no
    // signal is pending for it.
    k.frames.forget_local();
    crate::signal::clear_pending();
    // As Linux's fork: the child starts with no robust list (its C library
    // registers its own).
    p.robust_list = 0;
    k.top = false;
    // Each process counts what it does itself.
    k.stats = crate::kernel::Stats::default();
    let t2 = std::time::Instant::now();
    let vm = match k.vmspace(&child_mm) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("minikernel: fork: {e}");
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(1) }
        }
    };
    k.stats.fork_vmspace_ns = t2.elapsed().as_nanos() as u64;
    std::mem::forget(std::mem::replace(&mut p.vm, vm));
    p.mm = child_mm;
    // SAFETY: getpid and getppid cannot fail.
    (p.pid, p.ppid) = unsafe { (libc::getpid(), libc::getppid()) };
    // The forking thread is the child's only one.
    (p.tid, p.threads) = (p.pid, 1);
    if newsp != 0 {
        p.tf.tf_rsp = newsp;
    }
    if flags & CLONE_SETTLS != 0 {
        p.vf.vx_tls[0].base = tls;
    }
    if flags & CLONE_CHILD_SETTID != 0 {
        p.mm.write(&k.ram, &mut k.frames, ctid, &p.pid.to_le_bytes());
    }
    Ok(0)
}

/// `clone(CLONE_VM|CLONE_THREAD|..., newsp, ptid, ctid, tls)`: the state
/// a new thread starts with (the thread loop starts its host thread, then
/// [`thread_started`] answers the caller). `CLONE_THREAD` needs `CLONE_VM`
/// and `CLONE_SIGHAND`, as on Linux.
pub fn thread(p: &mut Proc, a: [u64; 6]) -> Result<Box<Thread>, i32> {
    const CLONE_SIGHAND: u64 = 0x800;
    const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
    let (flags, newsp, ctid, tls) = (a[0], a[1], a[3], a[4]);
    if flags & CLONE_VM == 0 || flags & CLONE_SIGHAND == 0 || flags & CLONE_VFORK != 0 {
        return Err(libc::EINVAL);
    }
    let mut t = p.thread();
    t.tf.tf_rax = 0;
    if newsp != 0 {
        t.tf.tf_rsp = newsp;
    }
    if flags & CLONE_SETTLS != 0 {
        t.vf.vx_tls[0].base = tls;
    }
    t.altstack = [0, crate::signal::SS_DISABLE, 0];
    t.saved_mask = None;
    t.robust_list = 0;
    t.clear_tid = if flags & CLONE_CHILD_CLEARTID != 0 {
        ctid
    } else {
        0
    };
    Ok(Box::new(t))
}

/// The caller of [`thread`]'s `clone`, now that the thread runs as host
/// thread `tid`: the tid words are written and `clone` answers `tid`.
pub fn thread_started(k: &mut Kernel, p: &mut Proc, tid: i32) {
    let (flags, ptid, ctid) = (p.tf.tf_rdi, p.tf.tf_rdx, p.tf.tf_r10);
    if flags & CLONE_PARENT_SETTID != 0 {
        p.mm.write(&k.ram, &mut k.frames, ptid, &tid.to_le_bytes());
    }
    if flags & CLONE_CHILD_SETTID != 0 {
        p.mm.write(&k.ram, &mut k.frames, ctid, &tid.to_le_bytes());
    }
    p.threads += 1;
    p.tf.tf_rax = tid as u64;
}

/// The NULL-terminated array of strings at `va` (argv, envp).
fn strings(k: &mut Kernel, p: &mut Proc, va: u64) -> Result<Vec<Vec<u8>>, i32> {
    let mut out = Vec::new();
    if va == 0 {
        return Ok(out);
    }
    for i in 0.. {
        let mut w = [0u8; 8];
        if !p.mm.read(&k.ram, &mut k.frames, va + i * 8, &mut w) {
            return Err(libc::EFAULT);
        }
        let s = u64::from_le_bytes(w);
        if s == 0 {
            break;
        }
        if i > 65536 {
            return Err(libc::E2BIG);
        }
        out.push(p.mm.cstr(&k.ram, &mut k.frames, s, 128 << 10)?);
    }
    Ok(out)
}

/// `execve(path, argv, envp)`: on success the process runs the new program
/// (its registers are the new program's start); on failure nothing changed.
pub fn execve(k: &mut Kernel, p: &mut Proc, a: [u64; 6]) -> Result<u64, i32> {
    let path = p.mm.cstr(&k.ram, &mut k.frames, a[0], 4096)?;
    let argv = strings(k, p, a[1])?;
    let envp = strings(k, p, a[2])?;
    let path = if path == b"/proc/self/exe" {
        p.exe.clone()
    } else {
        PathBuf::from(String::from_utf8_lossy(&path).into_owned())
    };
    let t0 = std::time::Instant::now();
    let mut mm = Mm::new(&k.ram, &mut k.frames, k.user_max).map_err(|_| libc::ENOMEM)?;
    let start = match exec::load(&k.ram, &mut k.frames, &mut mm, &path, &argv, &envp) {
        Ok(start) => start,
        Err(e) => {
            mm.pt.destroy(&k.ram, &mut k.frames);
            return Err(e.errno());
        }
    };
    let old = std::mem::replace(&mut p.mm, mm);
    if let Err(e) =
        p.vm.setmap(WINDOW_BASE, k.user_max - WINDOW_BASE, p.mm.pt.master())
    {
        eprintln!("minikernel: execve: {e}");
        // SAFETY: _exit ends this process at once.
        unsafe { libc::_exit(1) }
    }
    old.pt.destroy(&k.ram, &mut k.frames);
    p.tf = TrapFrame {
        tf_rip: start.entry,
        tf_rsp: start.rsp,
        tf_rflags: vkabi::RFLAGS_USER_SET,
        ..TrapFrame::default()
    };
    p.vf = VextFrame::default();
    let old_sig = std::mem::take(&mut p.sig);
    for (i, (new, old)) in p.sig.actions.iter_mut().zip(old_sig.actions).enumerate() {
        if old[0] == 1 {
            *new = old; // SIG_IGN survives exec
        } else if old[0] > 1 {
            crate::signal::set_host_action(i as i32 + 1, 0); // handlers do not
        }
    }
    p.sig.mask = old_sig.mask;
    p.exe = std::fs::canonicalize(&path).unwrap_or(path);
    p.cmdline = crate::kernel::cmdline(&argv);
    k.stats.execs += 1;
    k.stats.exec_ns += t0.elapsed().as_nanos() as u64;
    Ok(0)
}

/// End this process: destroy its vmspace, give its frames back, and exit
/// with `exit` (dying of the signal for a killed child process).
pub fn finish(k: &mut Kernel, p: Proc, exit: Exit) -> ! {
    let Proc {
        vm, mm, threads, ..
    } = p;
    // The vmspace goes to the pool for the next fork's child when no
    // other thread can still be inside RUN in it; else it is destroyed.
    if threads == 1 {
        let id = vm.into_id();
        if !crate::ram::give_vmspace(&k.ram, id) {
            drop(vkguest::Vmspace::adopt(id));
        }
    } else {
        drop(vm);
    }
    // Other threads may still run in the vmspace until this process
    // exits: their frames stay out of the pool.
    if threads == 1 {
        mm.pt.destroy(&k.ram, &mut k.frames);
        k.frames.release(&k.ram);
    }
    match exit {
        Exit::Code(code) => std::process::exit(code & 0xff),
        Exit::Signal(sig) if k.top => std::process::exit(128 + sig),
        Exit::Signal(sig) => {
            // SAFETY: resetting a disposition, unblocking and raising the
            // signal on this process, which should die of it; no core file.
            unsafe {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(sig);
            }
            std::process::exit(128 + sig)
        }
    }
}
