//! The fast RUN: `vmspace_ctl(id, VMSPACE_CTL_RUN, tf, vf)` without vkrun on
//! the path (ABI section 7, "The fast RUN").
//!
//! Each (vmspace, guest thread) pair has an execution context in the
//! vmspace's stub process, a thread that runs the user code and reports
//! every trap through a control block. The raw hypercall hands the
//! registers to vkrun, which posts them to the block and waits for the
//! report. Here the calling thread does that itself: it asks vkrun once for
//! its context's block ([`VMSPACE_CTL_FASTINFO`]), maps it, and from then on
//! writes the registers into the block, wakes the context and sleeps on the
//! block until the context reports. vkrun stays off the path; it keeps the
//! parts only it can do (signals during RUN, faults its walk cannot
//! resolve, a dead stub) and offers the fast path only when RUNs are not
//! traced.
//!
//! The C header (`vkernel.h`) implements the same protocol in C; the
//! constants here are the contract between the two and vkrun (a test
//! checks the header against them, and vkrun's block layout is defined
//! from them).
//!
//! The block is shared with the user code of the vmspace, which can write
//! it: nothing read from it is trusted beyond the RUN it belongs to (a
//! forged report only misleads this RUN of that user code).

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering, fence};

use crate::Hypercall;
use crate::hypercall::{Errno, hypercall, syscall6};
use crate::{
    PGEX_I, PGEX_P, PGEX_U, PGEX_W, RFLAGS_USER_MASK, RFLAGS_USER_SET, T_ALIGNFLT, T_ARITHTRAP,
    T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SEGNPFLT, T_SIGNAL,
    T_STKFLT, T_SYSCALL80, T_TRCTRAP, T_XMMFLT, TrapFrame, VMSPACE_CTL_RUN, VextFrame,
};

/// `vmspace_ctl(id, VMSPACE_CTL_FASTINFO, NULL, NULL)`: vkrun's own command
/// (not DragonFly's; a number no DragonFly command uses). Returns `fd | (page << 32)`: a new close-on-exec
/// descriptor of the file holding the calling thread's execution context
/// for vmspace `id`, and the page of that file where its block is. The
/// caller maps that one page shared and closes the descriptor.
/// `EOPNOTSUPP` when vkrun does not offer the fast path (RUNs traced,
/// `vkrun --run=hypercall`), and the errors of RUN otherwise.
pub const VMSPACE_CTL_FASTINFO: i32 = 0x564B_0001;

/// `CX_OPEN` while vkrun offers the fast path on the context ("RUN1").
pub const OPEN_MAGIC: u32 = 0x3143_5552;

/// Block: the context's state (futex it sleeps on between runs).
pub const CX_STATE: usize = 0x000;
/// Block: reports made (futex the waiter sleeps on).
pub const CX_SEQ: usize = 0x004;
/// Block: non-zero while someone wants the running user code interrupted.
pub const CX_KICK: usize = 0x008;
/// Block: the report's signal number.
pub const CX_SIG: usize = 0x010;
/// Block: the report's `si_code`.
pub const CX_CODE: usize = 0x014;
/// Block: the report's `si_addr`.
pub const CX_ADDR: usize = 0x018;
/// Block: `si_syscall` and `si_arch` of a `SIGSYS` report.
pub const CX_SYSCALL: usize = 0x020;
/// Block: FS base at the report.
pub const CX_FS_OUT: usize = 0x028;
/// Block: GS base at the report.
pub const CX_GS_OUT: usize = 0x030;
/// Block: FS base to run with.
pub const CX_FS_IN: usize = 0x038;
/// Block: GS base to run with.
pub const CX_GS_IN: usize = 0x040;
/// Block: [`OPEN_MAGIC`] while the fast path is offered.
pub const CX_OPEN: usize = 0x060;
/// Block: non-zero while the guest thread is inside a fast RUN.
pub const CX_BUSY: usize = 0x064;
/// Block: vkrun blocked the thread's signals to hold one until RUN returns.
pub const CX_MASK_HELD: usize = 0x068;
/// Block: the kick is for a fault whose walk failed.
pub const CX_FAULT: usize = 0x06C;
/// Block: the thread's signal mask before vkrun blocked it.
pub const CX_SAVED_MASK: usize = 0x070;
/// Block: the failed fault's address.
pub const CX_FAULT_ADDR: usize = 0x078;
/// Block: the failed fault's `PGEX_*` bits.
pub const CX_FAULT_ERR: usize = 0x080;
/// Block: the stub's pid.
pub const CX_STUB_PID: usize = 0x088;
/// Block: the context's thread id.
pub const CX_CTX_TID: usize = 0x08C;
/// Block: `CLOCK_MONOTONIC` ns when vkrun kicked the context for a signal.
pub const CX_KICK_AT: usize = 0x090;
/// Block: fast RUNs made (vkrun adds them to `vkrun.runs`).
pub const CX_N_RUNS: usize = 0x098;
/// Block: fast RUNs that ended with a system call.
pub const CX_N_SYSCALL: usize = 0x0A0;
/// Block: fast RUNs that ended with `T_PAGEFLT`.
pub const CX_N_PAGEFAULT: usize = 0x0A8;
/// Block: fast RUNs that ended with another trap.
pub const CX_N_TRAP: usize = 0x0B0;
/// Block: fast RUNs that ended for a signal.
pub const CX_N_SIGNAL: usize = 0x0B8;
/// Block: 1 if the context reports through a seccomp user notification
/// (its handler makes system call [`NR_REPORT`], which its own filter turns
/// into `SECCOMP_RET_USER_NOTIF`, and sleeps until the notification is
/// answered: the answer is the next "go"); 0 if it reports by futex.
pub const CX_NOTIF: usize = 0x0C0;
/// Block: the context's listener descriptor, in the stub.
pub const CX_LISTENER: usize = 0x0C4;
/// Block: the id of the notification the context waits on (written by
/// whoever received it; the next "go" answers it).
pub const CX_NOTIF_ID: usize = 0x0C8;
/// Block: held (1) by whoever receives the context's notification: a
/// receive blocks until a notification comes, so only one waiter may look
/// (it checks one is pending under the lock).
pub const CX_RECV_LOCK: usize = 0x0D0;
/// Block: registers to run with, `ucontext` `gregs` order, `REG_R8` to
/// `REG_EFL` ([`GREGS_IN`] of them).
pub const CX_IN: usize = 0x100;
/// Block: the 23 `gregs` at the report.
pub const CX_OUT: usize = 0x200;
/// Registers a run takes in.
pub const GREGS_IN: usize = 18;
/// `gregs` at a report.
pub const GREGS: usize = 23;

/// `CX_STATE`: the context waits in its handler.
pub const STATE_WAIT: u32 = 0;
/// `CX_STATE`: registers are posted; run them.
pub const STATE_GO: u32 = 1;
/// `CX_STATE`: the user code runs.
pub const STATE_RUNNING: u32 = 2;
/// `CX_STATE`: the context is ending.
pub const STATE_EXIT: u32 = 3;

/// The system call a context's handler reports with in notification mode
/// (in vkrun's reserved range: no kernel implements it).
pub const NR_REPORT: u64 = 0x0DF0_0FFF;

/// `vmspace_ctl(id, VMSPACE_CTL_FASTINFO, tf, NULL)` with `tf` =
/// [`FASTINFO_LISTENER`]: the context's listener instead (a new
/// close-on-exec descriptor the library keeps), `EOPNOTSUPP` if the
/// context reports by futex.
pub const FASTINFO_LISTENER: u64 = 1;

/// The signal that kicks a context out of its user code (`SIGURG`).
pub const KICK_SIGNAL: u32 = 23;

/// `gregs` indices (`<sys/ucontext.h>`).
pub mod reg {
    #![allow(missing_docs)]
    pub const R8: usize = 0;
    pub const R9: usize = 1;
    pub const R10: usize = 2;
    pub const R11: usize = 3;
    pub const R12: usize = 4;
    pub const R13: usize = 5;
    pub const R14: usize = 6;
    pub const R15: usize = 7;
    pub const RDI: usize = 8;
    pub const RSI: usize = 9;
    pub const RBP: usize = 10;
    pub const RBX: usize = 11;
    pub const RDX: usize = 12;
    pub const RAX: usize = 13;
    pub const RCX: usize = 14;
    pub const RSP: usize = 15;
    pub const RIP: usize = 16;
    pub const EFL: usize = 17;
    pub const ERR: usize = 19;
    pub const TRAPNO: usize = 20;
    pub const CR2: usize = 22;
}

/// How long one wait for a report lasts before the waiter checks that the
/// context lives (ns).
const POLL_NS: i64 = 100_000_000;
/// How long a context may ignore a kick for a signal (ns), as vkrun's own
/// bound (5 s).
const KICK_TIMEOUT_NS: u64 = 5_000_000_000;

const SIGSYS: u32 = 31;
const SIGSEGV: u32 = 11;
const SIGBUS: u32 = 7;
const SIGILL: u32 = 4;
const SIGTRAP: u32 = 5;
const SIGFPE: u32 = 8;
const SEGV_ACCERR: i32 = 2;
const SI_KERNEL: i32 = 0x80;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const NR_URETPROBE: u64 = 335;
const USER_CS: u64 = 0x33;
const USER_SS: u64 = 0x2b;

/// What a context reported.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// The signal that stopped the user code.
    pub sig: u32,
    /// Its `si_code`.
    pub code: i32,
    /// Its `si_addr`.
    pub addr: u64,
    /// `si_syscall | si_arch << 32` of a `SIGSYS`.
    pub syscall: u64,
    /// The interrupted registers (`ucontext` `gregs`).
    pub gregs: [u64; GREGS],
    /// FS base.
    pub fs: u64,
    /// GS base.
    pub gs: u64,
}

/// A trap as the ABI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trap {
    /// `tf_trapno`.
    pub trapno: u64,
    /// `tf_err`.
    pub err: u64,
    /// `tf_addr`.
    pub addr: u64,
}

impl Report {
    /// Since Linux 6.11, system call 335 (`uretprobe`) runs past every
    /// seccomp filter; made from anywhere but a uprobe trampoline it sets
    /// rax to -1 and raises `SIGILL` (`SI_KERNEL`) just after the `syscall`.
    /// It is the user code's system call all the same: report it as one,
    /// with its number back in rax.
    pub fn undo_uretprobe(&mut self) {
        let g = &mut self.gregs;
        if self.sig == SIGILL
            && self.code == SI_KERNEL
            && g[reg::RCX] == g[reg::RIP]
            && g[reg::RAX] == u64::MAX
        {
            self.sig = SIGSYS;
            self.syscall = NR_URETPROBE | u64::from(AUDIT_ARCH_X86_64) << 32;
            g[reg::RAX] = NR_URETPROBE;
        }
    }

    /// The ABI's trap for the signal the context caught (x86 exception
    /// numbers to DragonFly's `T_*`).
    pub fn trap(&self) -> Trap {
        let hw = self.gregs[reg::TRAPNO];
        let err = self.gregs[reg::ERR];
        let plain = |trapno| Trap {
            trapno,
            err,
            addr: 0,
        };
        match self.sig {
            SIGSYS if (self.syscall >> 32) as u32 == AUDIT_ARCH_I386 => Trap {
                trapno: T_SYSCALL80,
                err: 0,
                addr: 0,
            },
            SIGSYS => Trap {
                trapno: T_FAST_SYSCALL,
                err: 2,
                addr: 0,
            },
            // The hardware says "not present" for a page never touched; a
            // mapping that denies the access (SEGV_ACCERR) is a protection
            // fault whatever the host page table held.
            SIGSEGV if hw == 14 => Trap {
                trapno: T_PAGEFLT,
                err: err & (PGEX_P | PGEX_W | PGEX_U | PGEX_I)
                    | if self.code == SEGV_ACCERR { PGEX_P } else { 0 },
                addr: self.gregs[reg::CR2],
            },
            SIGSEGV if hw == 11 => plain(T_SEGNPFLT),
            SIGSEGV if hw == 12 => plain(T_STKFLT),
            SIGSEGV => plain(T_PROTFLT),
            SIGBUS if hw == 17 => plain(T_ALIGNFLT),
            // A shared mapping beyond the end of RAM.
            SIGBUS => Trap {
                trapno: T_PAGEFLT,
                err: PGEX_U,
                addr: self.addr,
            },
            SIGILL => plain(T_PRIVINFLT),
            SIGTRAP if hw == 1 => plain(T_TRCTRAP),
            SIGTRAP => plain(T_BPTFLT),
            SIGFPE if hw == 16 => plain(T_ARITHTRAP),
            SIGFPE if hw == 19 => plain(T_XMMFLT),
            SIGFPE => plain(T_DIVIDE),
            _ => Trap {
                trapno: T_SIGNAL,
                err: 0,
                addr: 0,
            },
        }
    }

    /// Write the report's registers and `trap` into `tf` and the bases into
    /// `vf` (the other fields of `tf` stay as they were).
    pub fn write_frame(&self, trap: Trap, tf: &mut TrapFrame, vf: &mut VextFrame) {
        let g = &self.gregs;
        tf.tf_r8 = g[reg::R8];
        tf.tf_r9 = g[reg::R9];
        tf.tf_r10 = g[reg::R10];
        tf.tf_r11 = g[reg::R11];
        tf.tf_r12 = g[reg::R12];
        tf.tf_r13 = g[reg::R13];
        tf.tf_r14 = g[reg::R14];
        tf.tf_r15 = g[reg::R15];
        tf.tf_rdi = g[reg::RDI];
        tf.tf_rsi = g[reg::RSI];
        tf.tf_rbp = g[reg::RBP];
        tf.tf_rbx = g[reg::RBX];
        tf.tf_rdx = g[reg::RDX];
        tf.tf_rax = g[reg::RAX];
        tf.tf_rcx = g[reg::RCX];
        tf.tf_rsp = g[reg::RSP];
        tf.tf_rip = g[reg::RIP];
        tf.tf_rflags = g[reg::EFL];
        tf.tf_cs = USER_CS;
        tf.tf_ss = USER_SS;
        tf.tf_trapno = trap.trapno;
        tf.tf_err = trap.err;
        tf.tf_addr = trap.addr;
        vf.vx_tls[0].base = self.fs;
        vf.vx_tls[1].base = self.gs;
    }
}

/// The registers a run takes in, from `tf`, sanitised (ABI section 7).
pub fn gregs_in(tf: &TrapFrame) -> [u64; GREGS_IN] {
    let mut g = [0u64; GREGS_IN];
    g[reg::R8] = tf.tf_r8;
    g[reg::R9] = tf.tf_r9;
    g[reg::R10] = tf.tf_r10;
    g[reg::R11] = tf.tf_r11;
    g[reg::R12] = tf.tf_r12;
    g[reg::R13] = tf.tf_r13;
    g[reg::R14] = tf.tf_r14;
    g[reg::R15] = tf.tf_r15;
    g[reg::RDI] = tf.tf_rdi;
    g[reg::RSI] = tf.tf_rsi;
    g[reg::RBP] = tf.tf_rbp;
    g[reg::RBX] = tf.tf_rbx;
    g[reg::RDX] = tf.tf_rdx;
    g[reg::RAX] = tf.tf_rax;
    g[reg::RCX] = tf.tf_rcx;
    g[reg::RSP] = tf.tf_rsp;
    g[reg::RIP] = tf.tf_rip;
    g[reg::EFL] = tf.tf_rflags & RFLAGS_USER_MASK | RFLAGS_USER_SET;
    g
}

/// Whether `addr` is canonical on x86-64: the only values an FS or GS base
/// can hold.
pub fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

// ----- the wrapper -----

const NR_MMAP: u64 = 9;
const NR_MUNMAP: u64 = 11;
const NR_RT_SIGPROCMASK: u64 = 14;
const NR_CLOSE: u64 = 3;
const NR_GETPID: u64 = 39;
const NR_GETTID: u64 = 186;
const NR_FUTEX: u64 = 202;
const NR_CLOCK_GETTIME: u64 = 228;
const NR_TGKILL: u64 = 234;
const NR_IOCTL: u64 = 16;
const NR_POLL: u64 = 7;
const SECCOMP_IOCTL_NOTIF_RECV: u64 = 0xC050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: u64 = 0xC018_2101;
const POLLIN: u16 = 1;
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const ESRCH: i64 = 3;
const ETIMEDOUT: i64 = 110;
const EOPNOTSUPP: i32 = 95;
const ENOSYS: i32 = 38;
const EINVAL: i32 = 22;
const EIO: i32 = 5;

/// One thread's context for one vmspace, mapped.
struct Entry {
    tid: AtomicU32,
    id: AtomicU64,
    block: AtomicU64,
    /// The context's listener (notification mode), or -1.
    listener: AtomicI32,
    /// The last RUN returned a data `T_PAGEFLT`: its retry takes the
    /// hypercall, where vkrun installs the page the vkernel has just
    /// mapped before the user code runs (it saves the user code a second
    /// fault through vkrun's fault thread).
    retry: AtomicU32,
}

const ENTRIES: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry {
    tid: AtomicU32::new(0),
    id: AtomicU64::new(0),
    block: AtomicU64::new(0),
    listener: AtomicI32::new(-1),
    retry: AtomicU32::new(0),
};

/// The cache of blocks: (thread, vmspace) to the block mapped in this
/// process. A thread only reads and writes entries it claimed (by its
/// thread id), so a forked child, whose threads have other ids, never uses
/// its parent's contexts.
static CACHE: [Entry; ENTRIES] = [EMPTY; ENTRIES];

/// Whether descriptor `fd` is one this library holds (a context's
/// listener, kept for the fast RUN). A vkernel that closes or replaces
/// descriptors on its user programs' behalf (`close`, `dup2`, a
/// `close_fds` loop) must leave these alone, as it leaves its RAM alone:
/// a listener closed under the library leaves its fast RUN waiting on a
/// context that reports to nobody.
///
/// ```
/// assert!(!vkabi::fastrun::holds_fd(1));
/// ```
pub fn holds_fd(fd: i32) -> bool {
    fd >= 0
        && CACHE
            .iter()
            .any(|e| e.listener.load(Ordering::Relaxed) == fd)
}

/// Set once vkrun said it does not offer the fast path (or is absent).
static OFF: AtomicU32 = AtomicU32::new(0);

fn sys(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: only called below with calls whose pointer arguments (if
    // any) are valid for them.
    unsafe { syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

fn gettid() -> u32 {
    sys(NR_GETTID, [0; 6]) as u32
}

fn now_ns() -> u64 {
    let mut ts = [0i64; 2];
    sys(NR_CLOCK_GETTIME, [1, ts.as_mut_ptr() as u64, 0, 0, 0, 0]);
    (ts[0] as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts[1] as u64)
}

/// A mapped block, and the context's listener (-1: it reports by futex).
#[derive(Clone, Copy)]
struct Block(u64, i32);

impl Block {
    fn w(&self, off: usize) -> &AtomicU32 {
        // SAFETY: the block is a 4096-byte shared mapping of this process
        // that lives until its entry is dropped (only by this thread);
        // every offset used is below 4096 and aligned.
        unsafe { &*((self.0 + off as u64) as *const AtomicU32) }
    }

    fn q(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as for `w`.
        unsafe { &*((self.0 + off as u64) as *const AtomicU64) }
    }

    fn wake(&self, off: usize) {
        // A shared futex: the context and vkrun map the same file.
        sys(NR_FUTEX, [self.0 + off as u64, FUTEX_WAKE, 1, 0, 0, 0]);
    }

    fn wait(&self, off: usize, val: u32) -> i64 {
        let ts = [0i64, POLL_NS];
        sys(
            NR_FUTEX,
            [
                self.0 + off as u64,
                FUTEX_WAIT,
                u64::from(val),
                ts.as_ptr() as u64,
                0,
                0,
            ],
        )
    }

    fn report(&self) -> Report {
        let mut gregs = [0u64; GREGS];
        for (i, g) in gregs.iter_mut().enumerate() {
            *g = self.q(CX_OUT + 8 * i).load(Ordering::Relaxed);
        }
        Report {
            sig: self.w(CX_SIG).load(Ordering::Relaxed),
            code: self.w(CX_CODE).load(Ordering::Relaxed) as i32,
            addr: self.q(CX_ADDR).load(Ordering::Relaxed),
            syscall: self.q(CX_SYSCALL).load(Ordering::Relaxed),
            gregs,
            fs: self.q(CX_FS_OUT).load(Ordering::Relaxed),
            gs: self.q(CX_GS_OUT).load(Ordering::Relaxed),
        }
    }

    fn post(&self, g: &[u64], fs: u64, gs: u64) {
        for (i, v) in g.iter().take(GREGS_IN).enumerate() {
            self.q(CX_IN + 8 * i).store(*v, Ordering::Relaxed);
        }
        self.q(CX_FS_IN).store(fs, Ordering::Relaxed);
        self.q(CX_GS_IN).store(gs, Ordering::Relaxed);
        self.w(CX_STATE).store(STATE_GO, Ordering::Release);
        self.go();
    }

    /// Wake the context to look at its state: answer the notification it
    /// sleeps in (the answer wakes it on this CPU), or wake its futex.
    fn go(&self) {
        if self.1 < 0 {
            self.wake(CX_STATE);
            return;
        }
        for _ in 0..2 {
            let resp = [self.q(CX_NOTIF_ID).load(Ordering::Acquire), 0, 0];
            let r = sys(
                NR_IOCTL,
                [
                    self.1 as u64,
                    SECCOMP_IOCTL_NOTIF_SEND,
                    resp.as_ptr() as u64,
                    0,
                    0,
                    0,
                ],
            );
            // Refused: the report it answers was handled before it was
            // received (vkrun's waiter does that): receive it, answer it.
            if r == 0 || !self.recv(POLL_NS / 1_000_000) {
                return;
            }
        }
    }

    /// Answer the notification just received with `ENOSYS` (the user
    /// code's own report call).
    fn refuse(&self) {
        let resp = [
            self.q(CX_NOTIF_ID).load(Ordering::Acquire),
            0,
            (-ENOSYS) as u32 as u64,
        ];
        sys(
            NR_IOCTL,
            [
                self.1 as u64,
                SECCOMP_IOCTL_NOTIF_SEND,
                resp.as_ptr() as u64,
                0,
                0,
                0,
            ],
        );
    }

    /// Receive the context's next report notification within `ms`; its id
    /// is kept for the next "go".
    fn recv(&self, ms: i64) -> bool {
        let mut pfd = [self.1 as u32 as u64 | (u64::from(POLLIN) << 32)];
        let n = sys(NR_POLL, [pfd.as_mut_ptr() as u64, 1, ms as u64, 0, 0, 0]);
        let revents = (pfd[0] >> 48) as u16;
        if n <= 0 {
            return false;
        }
        if revents & POLLIN == 0 {
            // No task left on the filter: the stub is dying.
            self.wait(CX_SEQ, self.w(CX_SEQ).load(Ordering::Acquire));
            return false;
        }
        // One receiver at a time, and only while one is pending: a receive
        // with none pending would block for good.
        if !self.lock_recv() {
            return false;
        }
        let mut pfd = [self.1 as u32 as u64 | (u64::from(POLLIN) << 32)];
        let pending = sys(NR_POLL, [pfd.as_mut_ptr() as u64, 1, 0, 0, 0, 0]) == 1
            && (pfd[0] >> 48) as u16 & POLLIN != 0;
        let mut notif = [0u64; 10];
        let r = if pending {
            sys(
                NR_IOCTL,
                [
                    self.1 as u64,
                    SECCOMP_IOCTL_NOTIF_RECV,
                    notif.as_mut_ptr() as u64,
                    0,
                    0,
                    0,
                ],
            )
        } else {
            -1
        };
        if r == 0 {
            self.q(CX_NOTIF_ID).store(notif[0], Ordering::Release);
        }
        self.w(CX_RECV_LOCK).store(0, Ordering::Release);
        r == 0
    }

    /// Take the receive lock; a holder that keeps it for long (the user
    /// code can write the block) loses it.
    fn lock_recv(&self) -> bool {
        let lock = self.w(CX_RECV_LOCK);
        for _ in 0..100 {
            if lock
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            let ts = [0i64, 1_000_000];
            sys(
                NR_FUTEX,
                [
                    self.0 + CX_RECV_LOCK as u64,
                    FUTEX_WAIT,
                    1,
                    ts.as_ptr() as u64,
                    0,
                    0,
                ],
            );
        }
        lock.store(1, Ordering::Release);
        true
    }

    fn count(&self, off: usize) {
        self.q(off).fetch_add(1, Ordering::Relaxed);
    }
}

/// The block of this thread's context in vmspace `id`, mapped: from the
/// cache, or asked of vkrun. `None`: take the hypercall.
fn block_for(id: u64, tid: u32) -> Option<(usize, Block)> {
    for (i, e) in CACHE.iter().enumerate() {
        if e.tid.load(Ordering::Relaxed) == tid && e.id.load(Ordering::Relaxed) == id {
            let b = e.block.load(Ordering::Relaxed);
            return Some((i, Block(b, e.listener.load(Ordering::Relaxed))));
        }
    }
    if OFF.load(Ordering::Relaxed) != 0 {
        return None;
    }
    // SAFETY: FASTINFO reads no guest memory.
    let r = unsafe {
        hypercall(
            Hypercall::VmspaceCtl,
            [id, VMSPACE_CTL_FASTINFO as u64, 0, 0, 0, 0],
        )
    };
    if r == -(i64::from(EOPNOTSUPP)) || r == -(i64::from(ENOSYS)) {
        OFF.store(1, Ordering::Relaxed);
        return None;
    }
    if r < 0 {
        return None; // the hypercall gives the error
    }
    let fd = r as u32 as u64;
    let page = (r as u64) >> 32;
    let at = sys(NR_MMAP, [0, 4096, 3, 1, fd, page << 12]);
    sys(NR_CLOSE, [fd, 0, 0, 0, 0, 0]);
    if (-4095..0).contains(&at) {
        return None;
    }
    // The context's listener, if it reports by notification.
    // SAFETY: FASTINFO reads no guest memory.
    let l = unsafe {
        hypercall(
            Hypercall::VmspaceCtl,
            [id, VMSPACE_CTL_FASTINFO as u64, FASTINFO_LISTENER, 0, 0, 0],
        )
    };
    let listener = if (0..i64::from(i32::MAX)).contains(&l) {
        l as i32
    } else {
        -1
    };
    // SAFETY: `at` is the page just mapped.
    let notif = unsafe { &*((at as u64 + CX_NOTIF as u64) as *const AtomicU32) };
    if listener < 0 && notif.load(Ordering::Acquire) != 0 {
        // The context reports by notification but the listener did not
        // come (a signal interrupted the question): the hypercall this
        // time, the question again next time.
        sys(NR_MUNMAP, [at as u64, 4096, 0, 0, 0, 0]);
        return None;
    }
    let Some(slot) = claim(tid) else {
        sys(NR_MUNMAP, [at as u64, 4096, 0, 0, 0, 0]);
        close(listener);
        return None;
    };
    let e = &CACHE[slot];
    e.id.store(id, Ordering::Relaxed);
    e.block.store(at as u64, Ordering::Relaxed);
    e.listener.store(listener, Ordering::Relaxed);
    Some((slot, Block(at as u64, listener)))
}

fn close(fd: i32) {
    if fd >= 0 {
        sys(NR_CLOSE, [fd as u64, 0, 0, 0, 0, 0]);
    }
}

/// A free cache entry, claimed for `tid`: an empty one, or one whose thread
/// is gone (not a thread of this process).
fn claim(tid: u32) -> Option<usize> {
    for (i, e) in CACHE.iter().enumerate() {
        if e.tid
            .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return Some(i);
        }
    }
    let pid = sys(NR_GETPID, [0; 6]) as u64;
    for (i, e) in CACHE.iter().enumerate() {
        let owner = e.tid.load(Ordering::Relaxed);
        if owner != tid
            && sys(NR_TGKILL, [pid, u64::from(owner), 0, 0, 0, 0]) == -ESRCH
            && e.tid
                .compare_exchange(owner, tid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            sys(
                NR_MUNMAP,
                [e.block.load(Ordering::Relaxed), 4096, 0, 0, 0, 0],
            );
            close(e.listener.swap(-1, Ordering::Relaxed));
            return Some(i);
        }
    }
    None
}

/// Forget entry `slot` (its context closed): unmap the block.
fn drop_entry(slot: usize) {
    let e = &CACHE[slot];
    e.retry.store(0, Ordering::Relaxed);
    let block = e.block.swap(0, Ordering::Relaxed);
    close(e.listener.swap(-1, Ordering::Relaxed));
    e.id.store(0, Ordering::Relaxed);
    e.tid.store(0, Ordering::Release);
    if block != 0 {
        sys(NR_MUNMAP, [block, 4096, 0, 0, 0, 0]);
    }
}

/// The end of a fast RUN: not busy any more, and the signals vkrun held
/// during it are let through (they are delivered now, after `tf` is
/// written: the handler runs once RUN has returned).
fn finish(b: Block) {
    b.w(CX_KICK).store(0, Ordering::Relaxed);
    b.q(CX_KICK_AT).store(0, Ordering::Relaxed);
    b.w(CX_BUSY).store(0, Ordering::SeqCst);
    if b.w(CX_MASK_HELD).swap(0, Ordering::SeqCst) != 0 {
        let mask = b.q(CX_SAVED_MASK).load(Ordering::Relaxed);
        sys(
            NR_RT_SIGPROCMASK,
            [2, &mask as *const u64 as u64, 0, 8, 0, 0],
        );
    }
}

/// `vmspace_ctl(id, cmd, tf, vf)` on the fast path. `None`: not taken (not
/// RUN, not offered, the context closed); make the hypercall instead.
pub fn run(id: u64, cmd: i32, tf: &mut TrapFrame, vf: &mut VextFrame) -> Option<Result<(), Errno>> {
    if cmd != VMSPACE_CTL_RUN || id == 0 || OFF.load(Ordering::Relaxed) != 0 {
        return None;
    }
    // Not taken: the hypercall (whose end vkrun sees).
    let tid = gettid();
    let r = run_fast(id, tid, tf, vf).unwrap_or_else(|| raw(id, tf, vf));
    if let Some(slot) = find(id, tid) {
        let fault = tf.tf_trapno == T_PAGEFLT && tf.tf_err & PGEX_I == 0;
        CACHE[slot]
            .retry
            .store(u32::from(fault && r.is_ok()), Ordering::Relaxed);
    }
    Some(r)
}

/// This thread's cache entry for vmspace `id`.
fn find(id: u64, tid: u32) -> Option<usize> {
    CACHE
        .iter()
        .position(|e| e.tid.load(Ordering::Relaxed) == tid && e.id.load(Ordering::Relaxed) == id)
}

fn run_fast(
    id: u64,
    tid: u32,
    tf: &mut TrapFrame,
    vf: &mut VextFrame,
) -> Option<Result<(), Errno>> {
    if !vf.vx_tls.iter().all(|t| canonical(t.base)) {
        return Some(Err(Errno(EINVAL)));
    }
    let (slot, b) = block_for(id, tid)?;
    if CACHE[slot].retry.swap(0, Ordering::Relaxed) != 0 {
        return None;
    }
    // A kick (and its time) left from a signal that stopped the thread
    // just as the last RUN ended is not this RUN's: cleared before busy.
    b.w(CX_KICK).store(0, Ordering::Relaxed);
    b.q(CX_KICK_AT).store(0, Ordering::Relaxed);
    b.w(CX_BUSY).store(1, Ordering::SeqCst);
    if b.w(CX_OPEN).load(Ordering::SeqCst) != OPEN_MAGIC
        || b.w(CX_STATE).load(Ordering::Acquire) != STATE_WAIT
    {
        // Closed (destroyed, its stub dead, its thread gone) or not
        // offered: the hypercall says what becomes of it.
        finish(b);
        drop_entry(slot);
        return None;
    }
    let mut seen = b.w(CX_SEQ).load(Ordering::Acquire);
    b.post(&gregs_in(tf), vf.vx_tls[0].base, vf.vx_tls[1].base);
    loop {
        if b.1 >= 0 {
            // Notification mode: each report is one notification; receive
            // it before reading the report, so that the next "go" answers
            // it.
            if !b.recv(POLL_NS / 1_000_000) {
                if b.w(CX_OPEN).load(Ordering::Acquire) != OPEN_MAGIC || !alive(b) {
                    finish(b);
                    drop_entry(slot);
                    return Some(Err(Errno(EIO)));
                }
                if b.w(CX_SEQ).load(Ordering::Acquire) == seen {
                    if b.w(CX_STATE).load(Ordering::Acquire) == STATE_GO {
                        // Not picked up: the notification the go answered
                        // was received by someone else (vkrun's waiter of
                        // an earlier, interrupted RUN, still looking):
                        // answer the one it keeps.
                        b.go();
                    }
                    continue;
                }
                // Reported, and received by that waiter (the id is in the
                // block): read the report.
            } else if b.w(CX_SEQ).load(Ordering::Acquire) == seen {
                // A notification without a report: the user code made the
                // report call itself (it can jump to the handler's
                // `syscall`), so it fails for it with ENOSYS; or a context
                // that was not picked up parked again: go again.
                if b.w(CX_STATE).load(Ordering::Acquire) == STATE_GO {
                    b.go();
                } else {
                    b.refuse();
                }
                continue;
            }
        }
        let seq = b.w(CX_SEQ).load(Ordering::Acquire);
        if seq == seen {
            if b.w(CX_OPEN).load(Ordering::Acquire) != OPEN_MAGIC {
                // The stub died (vkrun closed the block and woke us).
                finish(b);
                drop_entry(slot);
                return Some(Err(Errno(EIO)));
            }
            if b.wait(CX_SEQ, seq) == -ETIMEDOUT && !alive(b) {
                finish(b);
                drop_entry(slot);
                return Some(Err(Errno(EIO)));
            }
            continue;
        }
        seen = seq;
        fence(Ordering::Acquire);
        let mut r = b.report();
        r.undo_uretprobe();
        let trap = if r.sig == KICK_SIGNAL {
            if b.w(CX_FAULT).swap(0, Ordering::AcqRel) != 0 {
                // Kicked out of a fault vkrun's walk could not resolve.
                Trap {
                    trapno: T_PAGEFLT,
                    err: b.q(CX_FAULT_ERR).load(Ordering::Relaxed),
                    addr: b.q(CX_FAULT_ADDR).load(Ordering::Relaxed),
                }
            } else if b.w(CX_KICK).load(Ordering::Acquire) != 0 {
                r.trap() // a signal for this thread: T_SIGNAL
            } else {
                // A kick meant for an earlier run: carry on.
                b.post(&r.gregs, r.fs, r.gs);
                continue;
            }
        } else {
            r.trap()
        };
        if trap.trapno == T_PAGEFLT && r.sig == SIGSEGV {
            // A fault in a window that vkrun may resolve (a read-only page
            // written, a page being re-armed): only vkrun can tell, so the
            // run goes on through the hypercall, from where it stopped.
            r.write_frame(trap, tf, vf);
            let held = b.w(CX_MASK_HELD).load(Ordering::Acquire) != 0;
            finish(b);
            if held {
                // A signal waits: RUN ends for it instead.
                tf.tf_trapno = T_SIGNAL;
                tf.tf_err = 0;
                tf.tf_addr = 0;
                b.count(CX_N_RUNS);
                b.count(CX_N_SIGNAL);
                return Some(Ok(()));
            }
            return Some(raw(id, tf, vf));
        }
        r.write_frame(trap, tf, vf);
        b.count(CX_N_RUNS);
        b.count(match trap.trapno {
            T_FAST_SYSCALL | T_SYSCALL80 => CX_N_SYSCALL,
            T_PAGEFLT => CX_N_PAGEFAULT,
            T_SIGNAL => CX_N_SIGNAL,
            _ => CX_N_TRAP,
        });
        finish(b);
        return Some(Ok(()));
    }
}

/// Whether the context can still report: its thread lives and a kick for
/// a signal has not been ignored for too long.
fn alive(b: Block) -> bool {
    let pid = b.w(CX_STUB_PID).load(Ordering::Relaxed);
    let tid = b.w(CX_CTX_TID).load(Ordering::Relaxed);
    if pid == 0
        || tid == 0
        || sys(NR_TGKILL, [u64::from(pid), u64::from(tid), 0, 0, 0, 0]) == -ESRCH
    {
        return false;
    }
    let at = b.q(CX_KICK_AT).load(Ordering::Relaxed);
    !(at != 0 && now_ns().saturating_sub(at) > KICK_TIMEOUT_NS)
}

// The block's words fit the first page, before the registers.
const _: () = {
    assert!(CX_OUT + 8 * GREGS <= 0x300);
    assert!(CX_IN + 8 * GREGS_IN <= CX_OUT);
    assert!(CX_RECV_LOCK + 4 <= CX_IN);
};

/// The raw hypercall.
pub fn raw(id: u64, tf: &mut TrapFrame, vf: &mut VextFrame) -> Result<(), Errno> {
    // SAFETY: `tf` and `vf` are valid, exclusive references of the ABI's sizes.
    crate::hypercall::result(unsafe {
        hypercall(
            Hypercall::VmspaceCtl,
            [
                id,
                VMSPACE_CTL_RUN as u64,
                tf as *mut TrapFrame as u64,
                vf as *mut VextFrame as u64,
                0,
                0,
            ],
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sig: u32, hw: u64, err: u64) -> Report {
        let mut gregs = [0u64; GREGS];
        gregs[reg::TRAPNO] = hw;
        gregs[reg::ERR] = err;
        gregs[reg::CR2] = 0x1234_5000;
        Report {
            sig,
            code: 0,
            addr: 0,
            syscall: u64::from(AUDIT_ARCH_X86_64) << 32,
            gregs,
            fs: 0,
            gs: 0,
        }
    }

    #[test]
    fn host_traps_map_to_dragonfly_numbers() {
        let t = |sig, hw, err| report(sig, hw, err).trap().trapno;
        assert_eq!(t(SIGSYS, 0, 0), T_FAST_SYSCALL);
        assert_eq!(t(SIGTRAP, 3, 0), T_BPTFLT);
        assert_eq!(t(SIGTRAP, 1, 0), T_TRCTRAP);
        assert_eq!(t(SIGILL, 6, 0), T_PRIVINFLT);
        assert_eq!(t(SIGSEGV, 13, 0), T_PROTFLT);
        assert_eq!(t(SIGFPE, 0, 0), T_DIVIDE);
        assert_eq!(t(KICK_SIGNAL, 0, 0), T_SIGNAL);
        let mut r = report(SIGSYS, 0, 0);
        r.syscall = u64::from(AUDIT_ARCH_I386) << 32;
        assert_eq!(r.trap().trapno, T_SYSCALL80);
        let pf = report(SIGSEGV, 14, 0x26).trap();
        assert_eq!(
            pf,
            Trap {
                trapno: T_PAGEFLT,
                err: PGEX_W | PGEX_U,
                addr: 0x1234_5000
            }
        );
        let mut ro = report(SIGSEGV, 14, PGEX_W | PGEX_U);
        ro.code = SEGV_ACCERR;
        assert_eq!(ro.trap().err, PGEX_P | PGEX_W | PGEX_U);
    }

    #[test]
    fn frames_are_sanitised() {
        let tf = TrapFrame {
            tf_rflags: u64::MAX,
            ..TrapFrame::default()
        };
        assert_eq!(gregs_in(&tf)[reg::EFL], 0x27_4DD5 | 0x202);
        assert!(canonical(0x7fff_ffff_ffff) && !canonical(0x8000_0000_0000));
    }
}
