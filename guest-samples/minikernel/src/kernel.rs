//! The minikernel's state and the types every part of it shares: guest RAM
//! and its frames ([`Kernel`]), the user process ([`Proc`]: its vmspace,
//! address space, registers and signal state), how it ended ([`Exit`]),
//! counters, tracing and the minikernel's own errors ([`KernelError`]).
//!
//! Modules stack one way: this one uses only what lies below it (`exec`,
//! `mm`, `ram`), none of the modules that serve a process; `process` (fork,
//! exec, exit) uses it, `syscall` (system calls) uses both, and `trap` (the
//! RUN loop) sits on top.

use std::path::PathBuf;

use vkabi::{TrapFrame, VextFrame, VkInfo};
use vkguest::{HypercallError, Vmspace};

use crate::exec::{self, ExecError};
use crate::mm::Mm;
use crate::ram::{Frames, OutOfMemory, Ram};

/// The first address of the user window (page index = `va >> 12`).
pub const WINDOW_BASE: u64 = crate::mm::MIN_ADDR;

/// Why the minikernel itself failed (as opposed to its user process).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A hypercall failed.
    #[error(transparent)]
    Hypercall(#[from] HypercallError),
    /// Guest RAM could not be mapped or is full.
    #[error("guest RAM: {0}")]
    Ram(String),
    /// The program could not be loaded.
    #[error("{path}: {source}")]
    Exec {
        /// The program.
        path: String,
        /// Why.
        source: ExecError,
    },
    /// A trap user code cannot raise.
    #[error("RUN returned trap {trapno} at rip {rip:#x}")]
    UnexpectedTrap {
        /// `tf_trapno`.
        trapno: u64,
        /// `tf_rip`.
        rip: u64,
    },
    /// The host kept faulting on a page the tables allow.
    #[error("T_PAGEFLT at {addr:#x} (err {err:#x}) repeats although the page is mapped")]
    Unresolved {
        /// `tf_addr`.
        addr: u64,
        /// `tf_err`.
        err: u64,
    },
}

impl From<OutOfMemory> for KernelError {
    fn from(e: OutOfMemory) -> Self {
        KernelError::Ram(e.to_string())
    }
}

/// Signal dispositions, masks and the alternate stack ([`crate::signal`]).
#[derive(Clone, Debug)]
pub struct Signals {
    /// `struct sigaction` (kernel layout: handler, flags, restorer, mask)
    /// per signal 1..=64.
    pub actions: [[u64; 4]; 64],
    /// The blocked set.
    pub mask: u64,
    /// `stack_t`: sp, flags, size.
    pub altstack: [u64; 3],
    /// The mask to restore after `rt_sigsuspend` (what its handler's frame
    /// saves).
    pub saved_mask: Option<u64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            actions: [[0; 4]; 64],
            mask: 0,
            altstack: [0, 2, 0], // SS_DISABLE
            saved_mask: None,
        }
    }
}

/// A user process.
#[derive(Debug)]
pub struct Proc {
    /// Its vmspace.
    pub vm: Vmspace,
    /// Its memory.
    pub mm: Mm,
    /// Its registers (valid between RUNs).
    pub tf: TrapFrame,
    /// Its FS and GS bases.
    pub vf: VextFrame,
    /// Its pid (the host process's).
    pub pid: i32,
    /// The thread being served (its host thread's tid).
    pub tid: i32,
    /// Its threads.
    pub threads: usize,
    /// The served thread's `set_tid_address` / `CLONE_CHILD_CLEARTID`
    /// word (0: none), cleared and woken at the thread's exit.
    pub clear_tid: u64,
    /// The served thread's `set_robust_list` head (0: none), walked at
    /// the thread's exit.
    pub robust_list: u64,
    /// Its parent's pid.
    pub ppid: i32,
    /// Its signal state.
    pub sig: Signals,
    /// The program it runs (what `/proc/self/exe` names).
    pub exe: PathBuf,
    /// Its arguments, each NUL-terminated (what `/proc/self/cmdline`
    /// holds).
    pub cmdline: Vec<u8>,
}

/// `argv` as `/proc/PID/cmdline` shows it.
pub fn cmdline(argv: &[Vec<u8>]) -> Vec<u8> {
    argv.iter()
        .flat_map(|a| a.iter().copied().chain([0]))
        .collect()
}

/// What each thread of a process has of its own; the process's fields of
/// the same names hold the served thread's while it is served
/// ([`Proc::enter`], [`Proc::leave`]).
#[derive(Clone, Debug)]
pub struct Thread {
    /// Registers.
    pub tf: TrapFrame,
    /// FS and GS bases.
    pub vf: VextFrame,
    /// Host tid.
    pub tid: i32,
    /// Blocked signals.
    pub mask: u64,
    /// `sigaltstack`.
    pub altstack: [u64; 3],
    /// `rt_sigsuspend`'s mask to restore.
    pub saved_mask: Option<u64>,
    /// The clear-tid word.
    pub clear_tid: u64,
    /// The robust-futex list head.
    pub robust_list: u64,
}

impl Proc {
    /// The state of the thread being served.
    pub fn thread(&self) -> Thread {
        Thread {
            tf: self.tf,
            vf: self.vf,
            tid: self.tid,
            mask: self.sig.mask,
            altstack: self.sig.altstack,
            saved_mask: self.sig.saved_mask,
            clear_tid: self.clear_tid,
            robust_list: self.robust_list,
        }
    }

    /// Serve thread `t` (its host mask already is `t.mask`).
    pub fn enter(&mut self, t: &Thread) {
        self.tf = t.tf;
        self.vf = t.vf;
        self.tid = t.tid;
        self.sig.mask = t.mask;
        self.sig.altstack = t.altstack;
        self.sig.saved_mask = t.saved_mask;
        self.clear_tid = t.clear_tid;
        self.robust_list = t.robust_list;
    }

    /// Save the served thread's state to `t`.
    pub fn leave(&self, t: &mut Thread) {
        *t = self.thread();
    }
}

/// How the user process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `exit_group(code)`.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

/// What the minikernel served, for `MINIKERNEL_STATS=1`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// RUN calls.
    pub runs: u64,
    /// System calls served.
    pub syscalls: u64,
    /// Page faults served with a fresh page.
    pub page_faults: u64,
    /// Stale translations invalidated.
    pub stale_faults: u64,
    /// `T_SIGNAL` exits.
    pub signals: u64,
    /// Forks made (by this process).
    pub forks: u64,
    /// Nanoseconds spent copying or sharing the address space for them.
    pub fork_mm_ns: u64,
    /// Nanoseconds spent in the host's `fork` (parent side).
    pub fork_host_ns: u64,
    /// Nanoseconds the child spent creating its vmspace (create, window,
    /// `MADV_SETMAP`), once per process started by a fork.
    pub fork_vmspace_ns: u64,
    /// Successful `execve`s, and nanoseconds spent loading the program
    /// and pointing the window at it.
    pub execs: u64,
    /// See [`Stats::execs`].
    pub exec_ns: u64,
    /// Copy-on-write faults served with a copy, and with the frame taken
    /// over (its last user).
    pub cow_copies: u64,
    /// See [`Stats::cow_copies`].
    pub cow_reuses: u64,
}

impl Stats {
    /// The line `--stats` prints for the timing of forks and execs.
    pub fn fork_line(&self) -> String {
        let us = |ns: u64, n: u64| {
            if n == 0 {
                0.0
            } else {
                ns as f64 / n as f64 / 1000.0
            }
        };
        format!(
            "minikernel: {} forks (address space {:.0} µs, host fork {:.0} µs each), \
             vmspace {:.0} µs, {} execs ({:.0} µs each), {} cow copies, {} cow reuses",
            self.forks,
            us(self.fork_mm_ns, self.forks),
            us(self.fork_host_ns, self.forks),
            self.fork_vmspace_ns as f64 / 1000.0,
            self.execs,
            us(self.exec_ns, self.execs),
            self.cow_copies,
            self.cow_reuses,
        )
    }
}

/// Tracing of system calls (`MINIKERNEL_TRACE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trace {
    /// Nothing.
    Off,
    /// Unknown system calls (`MINIKERNEL_TRACE=1`).
    Unknown,
    /// Every system call and its result (`MINIKERNEL_TRACE=all`).
    All,
}

/// The minikernel: guest RAM and its frames.
#[derive(Debug)]
pub struct Kernel {
    /// The direct map.
    pub ram: Ram,
    /// Free frames.
    pub frames: Frames,
    /// `ram_fd`, moved to a high descriptor the user program cannot touch.
    pub ram_fd: i32,
    /// `vk_info.user_max`.
    pub user_max: u64,
    /// Counters.
    pub stats: Stats,
    /// Tracing.
    pub trace: Trace,
    /// Whether this is the first process (not a forked child).
    pub top: bool,
    /// The minikernel's duplicates of the descriptors behind shared file
    /// mappings ([`crate::mm::Backing`]), which the user program cannot
    /// name.
    pub map_fds: Vec<i32>,
}

/// Where `ram_fd` is moved (out of the way of the user program's fds).
const RAM_FD_MIN: i32 = 1000;

impl Kernel {
    /// Map guest RAM and move `ram_fd` out of the user program's way.
    pub fn boot(info: &VkInfo) -> Result<Kernel, KernelError> {
        // SAFETY: fcntl on a descriptor this process owns; close of the old
        // number after it was duplicated.
        let fd = unsafe {
            let fd = libc::fcntl(info.ram_fd, libc::F_DUPFD_CLOEXEC, RAM_FD_MIN);
            if fd >= 0 {
                libc::close(info.ram_fd);
            }
            fd
        };
        if fd < 0 {
            return Err(KernelError::Ram(format!(
                "moving ram_fd: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ram = Ram::map(fd, info.ram_size)
            .map_err(|e| KernelError::Ram(format!("mmap of ram_fd: {e}")))?;
        let frames = Frames::new(&ram);
        let trace = match std::env::var("MINIKERNEL_TRACE").as_deref() {
            Ok("all") => Trace::All,
            Ok("") | Ok("0") | Err(_) => Trace::Off,
            Ok(_) => Trace::Unknown,
        };
        Ok(Kernel {
            ram,
            frames,
            ram_fd: fd,
            user_max: info.user_max,
            stats: Stats::default(),
            trace,
            top: true,
            map_fds: Vec::new(),
        })
    }

    /// Whether `fd` is one of the minikernel's own descriptors (its RAM, its
    /// file mappings' copies, the fast RUN's listeners of `vkabi`).
    pub fn reserved_fd(&self, fd: u64) -> bool {
        fd as i32 == self.ram_fd
            || self.map_fds.contains(&(fd as i32))
            || vkabi::fastrun::holds_fd(fd as i32)
    }

    /// A vmspace with its window pointing at `mm`'s tables: an idle one
    /// from the pool ([`crate::ram::take_vmspace`]) if there is one, else
    /// a new one.
    pub fn vmspace(&self, mm: &Mm) -> Result<Vmspace, KernelError> {
        let len = self.user_max - WINDOW_BASE;
        while let Some(id) = crate::ram::take_vmspace(&self.ram) {
            let vm = Vmspace::adopt(id);
            if vm.setmap(WINDOW_BASE, len, mm.pt.master()).is_ok() {
                return Ok(vm);
            }
            // Gone (or broken): drop it and try the next.
        }
        let vm = Vmspace::create()?;
        vm.map_vpagetable(WINDOW_BASE, len, WINDOW_BASE, self.ram_fd)?;
        vm.setmap(WINDOW_BASE, len, mm.pt.master())?;
        Ok(vm)
    }

    /// A process running `path` with `argv` and `envp`.
    pub fn spawn(
        &mut self,
        path: PathBuf,
        argv: &[Vec<u8>],
        envp: &[Vec<u8>],
    ) -> Result<Proc, KernelError> {
        let mut mm = Mm::new(&self.ram, &mut self.frames, self.user_max)?;
        let start = exec::load(&self.ram, &mut self.frames, &mut mm, &path, argv, envp).map_err(
            |source| KernelError::Exec {
                path: path.display().to_string(),
                source,
            },
        )?;
        let vm = self.vmspace(&mm)?;
        // SAFETY: getpid and getppid cannot fail.
        let (pid, ppid) = unsafe { (libc::getpid(), libc::getppid()) };
        let exe = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Proc {
            vm,
            mm,
            tf: TrapFrame {
                tf_rip: start.entry,
                tf_rsp: start.rsp,
                tf_rflags: vkabi::RFLAGS_USER_SET,
                ..TrapFrame::default()
            },
            vf: VextFrame::default(),
            pid,
            tid: pid,
            threads: 1,
            clear_tid: 0,
            robust_list: 0,
            ppid,
            sig: Signals::default(),
            exe,
            cmdline: cmdline(argv),
        })
    }
}
