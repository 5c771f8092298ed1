//! `vmspace_ctl(VMSPACE_CTL_RUN)`: running guest user code in a vmspace
//! (ABI section 7).
//!
//! Each (vmspace, guest thread) pair has an execution context: a thread in
//! the vmspace's stub, not traced, that runs the user code under a filter
//! trapping every system call, and reports every trap from its signal
//! handler through its block in the stub region (see
//! [`crate::sys::stub`]). No ptrace stop is on the path of a RUN. One RUN is
//! four hand-offs:
//!
//! 1. the guest's RUN reaches a hypercall thread (user notification), which
//!    copies the frame in, posts the registers to the block and wakes the
//!    context ([`start`]);
//! 2. the context returns from its handler into the user code;
//! 3. the user code traps; the handler writes the registers to the block and
//!    wakes the same hypercall thread, asleep on the block ([`Waiter`]);
//! 4. that thread copies the frame out and answers the notification.
//!
//! The thread that starts a RUN finishes it. A separate waiter thread was
//! one more task on the path: on one CPU, each task woken preempts its
//! waker, which must run again later just to go to sleep (5.5 context
//! switches per RUN instead of 4, about 3 µs). The pool of hypercall
//! threads keeps another one receiving when other guest tasks may call
//! meanwhile ([`crate::hypercall::Server`]).
//!
//! A signal for the calling guest thread interrupts its wait for the answer
//! (the kernel withdraws the notification) and stops it for the tracer
//! ([`interrupt`]): the tracer kicks the context out of the user code, the
//! waiter writes the frame with `tf_trapno = 0`, and the tracer makes the
//! interrupted RUN return 0 before the signal is delivered. If the user code
//! had not started, RUN returns `EINTR` instead. A notification withdrawn
//! without a stop (the call restarts) finds its RUN still in flight and
//! takes it over.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{
    Hypercall, PGEX_I, PGEX_P, PGEX_U, PGEX_W, RFLAGS_USER_MASK, RFLAGS_USER_SET, T_ALIGNFLT,
    T_ARITHTRAP, T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SEGNPFLT,
    T_SIGNAL, T_STKFLT, T_SYSCALL80, T_TRCTRAP, T_XMMFLT, TrapFrame, VextFrame,
};

use crate::lock;
use crate::remote::{self, RemoteAddr};
use crate::stats::Stats;
use crate::sys::futex;
use crate::sys::seccomp::{Notification, NotifyFd};
use crate::sys::stub::{
    CX_ADDR, CX_CODE, CX_FS_IN, CX_FS_OUT, CX_GS_IN, CX_GS_OUT, CX_IN, CX_KICK, CX_OUT, CX_SEQ,
    CX_SIG, CX_STATE, CX_SYSCALL, GREGS, GREGS_IN, KICK_SIGNAL, REG_CR2, REG_EFL, REG_ERR, REG_R8,
    REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15, REG_RAX, REG_RBP, REG_RBX,
    REG_RCX, REG_RDI, REG_RDX, REG_RIP, REG_RSI, REG_RSP, REG_TRAPNO, STATE_EXIT, STATE_GO,
    STATE_WAIT,
};
use crate::trace::TraceWriter;
use crate::vmspace::Vmspace;
use crate::vpt::{StubFault, Vpt};

/// Host user selectors of x86-64 Linux (`__USER_CS`, `__USER_DS`).
const USER_CS: u64 = 0x33;
const USER_SS: u64 = 0x2b;
/// `si_code` of a `SIGSEGV` for an access the mapping denies.
const SEGV_ACCERR: i32 = 2;
/// `si_arch` of `SIGSYS` for a 32-bit system call (`int 0x80`).
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// How long the tracer waits for a kicked context before declaring its stub
/// broken.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiter checks that its stub is alive.
const WAITER_POLL: Duration = Duration::from_millis(100);
/// Kernel-internal restart codes a withdrawn notification leaves in `rax`.
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;

/// What the waiters need: where answers go and what they count and trace.
#[derive(Debug)]
pub struct RunEnv {
    pub notify: Arc<NotifyFd>,
    pub stats: Arc<Stats>,
    pub trace: Arc<Mutex<TraceWriter>>,
    pub vpt: Arc<Vpt>,
}

/// A RUN in flight.
#[derive(Debug, Clone)]
struct Pending {
    /// Which run of the context this is (its waiter's ticket).
    run_no: u64,
    /// The notification to answer (a restarted call replaces it).
    notif: u64,
    args: [u64; 6],
    /// The frame as copied in (fields the run does not change come back).
    tf: TrapFrame,
    vf: VextFrame,
    when: SystemTime,
    started: Instant,
}

#[derive(Debug, Default)]
struct RunState {
    run: Option<Pending>,
    /// The last run ended with `T_PAGEFLT` for a data access: (rip, address,
    /// write). If the next RUN retries that instruction, its page is
    /// resolved before the user code runs.
    retry: Option<(u64, u64, bool)>,
    /// Runs started so far.
    runs: u64,
    /// A RUN whose frame was written but whose answer found the notification
    /// withdrawn: its result, for the tracer or the restarted call.
    completed: Option<i64>,
    /// The tracer interrupted the run for a signal; it waits for `done`.
    interrupt: bool,
    done: Option<i64>,
}

/// One execution context: a (vmspace, guest thread) pair.
#[derive(Debug)]
pub struct Context {
    pub vm: Arc<Vmspace>,
    /// Block index in the stub region.
    pub slot: usize,
    /// The context's thread in the stub.
    pub tid: Pid,
    /// The guest thread it serves.
    pub guest: Pid,
    state: Mutex<RunState>,
    cond: Condvar,
    /// Reports seen by the waiter.
    seen: AtomicU32,
    /// The context is being destroyed: its waiter ends.
    closed: AtomicBool,
    /// A fault whose walk failed, for the kick it sent: (address, `PGEX`).
    fault: Mutex<Option<(u64, u64)>>,
}

impl Context {
    /// A context whose thread `tid` has made its first report.
    pub fn new(vm: Arc<Vmspace>, slot: usize, tid: Pid, guest: Pid, seen: u32) -> Self {
        Self {
            vm,
            slot,
            tid,
            guest,
            state: Mutex::new(RunState::default()),
            cond: Condvar::new(),
            seen: AtomicU32::new(seen),
            closed: AtomicBool::new(false),
            fault: Mutex::new(None),
        }
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        self.vm.block_word(self.slot, off)
    }

    fn qword(&self, off: usize) -> &AtomicU64 {
        self.vm.block_qword(self.slot, off)
    }

    /// Whether the context has ended (its guest thread died, or its thread
    /// in the stub is gone).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether a RUN of this context is in flight or unanswered.
    pub fn busy(&self) -> bool {
        let st = lock(&self.state);
        st.run.is_some() || st.completed.is_some()
    }

    /// End the context: its thread exits, its waiter returns.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut st = lock(&self.state);
        if st.interrupt {
            st.done = Some(-(Errno::EIO as i64));
            self.cond.notify_all();
        }
        drop(st);
        self.word(CX_STATE).store(STATE_EXIT, Ordering::Release);
        let _ = futex::wake(self.word(CX_STATE));
        let _ = futex::wake(self.word(CX_SEQ));
        // If its user code is running (its guest thread died inside RUN),
        // kick it into the handler, which then sees EXIT.
        self.word(CX_KICK).store(1, Ordering::Release);
        let _ = self.vm.kick(self.tid);
    }

    /// The context's user code is waiting on a fault whose walk failed:
    /// interrupt it to report `T_PAGEFLT` at `addr` with `pgex`.
    pub fn fault(&self, addr: u64, pgex: u64) {
        *lock(&self.fault) = Some((addr, pgex));
        self.word(CX_KICK).store(1, Ordering::Release);
        let _ = self.vm.kick(self.tid);
    }

    /// Post registers and go. (The kick flag is left alone: a kick for this
    /// run may already be on its way.)
    fn post(&self, gregs: &[u64; GREGS_IN], fs: u64, gs: u64) {
        for (i, v) in gregs.iter().enumerate() {
            self.qword(CX_IN + 8 * i).store(*v, Ordering::Relaxed);
        }
        self.qword(CX_FS_IN).store(fs, Ordering::Relaxed);
        self.qword(CX_GS_IN).store(gs, Ordering::Relaxed);
        self.word(CX_STATE).store(STATE_GO, Ordering::Release);
        let _ = futex::wake(self.word(CX_STATE));
    }
}

/// Read `tf` and `vf` of a RUN from the guest thread.
fn copy_in(tid: Pid, tf: u64, vf: u64) -> Result<(TrapFrame, VextFrame), Errno> {
    let mut t = [0u8; size_of::<TrapFrame>()];
    let mut v = [0u8; size_of::<VextFrame>()];
    remote::read_two(tid, (RemoteAddr(tf), &mut t), (RemoteAddr(vf), &mut v))
        .map_err(|_| Errno::EFAULT)?;
    Ok((TrapFrame::from_bytes(&t), VextFrame::from_bytes(&v)))
}

/// Whether `addr` is canonical on x86-64 (bits 63..47 all equal): the only
/// values an FS or GS base can hold.
fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

/// The registers to run with: `tf`, sanitised.
fn gregs_of(tf: &TrapFrame) -> [u64; GREGS_IN] {
    let mut g = [0u64; GREGS_IN];
    g[REG_R8] = tf.tf_r8;
    g[REG_R9] = tf.tf_r9;
    g[REG_R10] = tf.tf_r10;
    g[REG_R11] = tf.tf_r11;
    g[REG_R12] = tf.tf_r12;
    g[REG_R13] = tf.tf_r13;
    g[REG_R14] = tf.tf_r14;
    g[REG_R15] = tf.tf_r15;
    g[REG_RDI] = tf.tf_rdi;
    g[REG_RSI] = tf.tf_rsi;
    g[REG_RBP] = tf.tf_rbp;
    g[REG_RBX] = tf.tf_rbx;
    g[REG_RDX] = tf.tf_rdx;
    g[REG_RAX] = tf.tf_rax;
    g[REG_RCX] = tf.tf_rcx;
    g[REG_RSP] = tf.tf_rsp;
    g[REG_RIP] = tf.tf_rip;
    g[REG_EFL] = tf.tf_rflags & RFLAGS_USER_MASK | RFLAGS_USER_SET;
    g
}

/// How [`start`] left a RUN.
pub enum Started {
    /// Answer the notification with this now.
    Done(Result<i64, Errno>),
    /// The user code runs: the caller waits for it with this waiter, which
    /// answers.
    Wait(Waiter),
    /// Nothing to answer: the same call restarted while its run is in flight
    /// (the thread waiting for that run answers), or a call withdrawn before
    /// it ran.
    Nothing,
}

/// Start `vmspace_ctl(id, RUN, tf, vf)` for notification `n` in context
/// `ctx` (on a hypercall thread).
pub fn start(ctx: &Arc<Context>, n: &Notification, env: &Arc<RunEnv>) -> Started {
    let mut st = lock(&ctx.state);
    if let Some(v) = st.completed.take() {
        // The answer to a withdrawn notification, for its restart.
        return Started::Done(crate::inject::errno_or(v));
    }
    if let Some(run) = st.run.as_mut() {
        // The same call, restarted after its notification was withdrawn.
        run.notif = n.id;
        return Started::Nothing;
    }
    if ctx.vm.is_dead() {
        return Started::Done(Err(Errno::EIO));
    }
    let (tf, vf) = match copy_in(ctx.guest, n.args[2], n.args[3]) {
        Ok(f) => f,
        Err(e) => return Started::Done(Err(e)),
    };
    if !vf.vx_tls.iter().all(|t| canonical(t.base)) {
        // `wrfsbase` would fault in the context's handler and take the
        // whole stub down; natively no FS or GS base can be non-canonical.
        return Started::Done(Err(Errno::EINVAL));
    }
    let run = Pending {
        run_no: st.runs + 1,
        notif: n.id,
        args: n.args,
        tf,
        vf,
        when: SystemTime::now(),
        started: Instant::now(),
    };
    // A signal may have withdrawn the call since it was received; then the
    // tracer, which takes this lock to end the guest thread's run, found
    // none, and the call has already returned EINTR or restarted. Running
    // its frame now would write a frame the guest no longer expects and
    // hand its result to the next RUN. Once the run is recorded below, a
    // signal finds it and ends it. (strace's words for a call a signal
    // interrupted before it did anything.)
    if !env.notify.id_valid(n.id) {
        env.stats.count_hypercall(Some(Hypercall::VmspaceCtl), true);
        let text = "= ? ERESTARTSYS (To be restarted if SA_RESTART is set)";
        trace_run(&env.trace, ctx.guest, &run, text, None);
        return Started::Nothing;
    }
    env.stats.runs.fetch_add(1, Ordering::Relaxed);
    if let Some((rip, addr, write)) = st.retry.take()
        && rip == tf.tf_rip
    {
        // The vkernel most likely filled the VPTE and retries: spare the
        // user code a second fault (two hand-offs through the fault
        // thread).
        env.vpt.prefault(ctx.vm.stub, addr, write, ctx.guest);
    }
    // The context sleeps until it is posted: a report not yet seen is stale
    // (a kick that landed after the last run ended).
    ctx.seen
        .store(ctx.word(CX_SEQ).load(Ordering::Acquire), Ordering::Relaxed);
    let run_no = run.run_no;
    st.runs = run_no;
    st.run = Some(run);
    // Post without the lock: the context may run (and report) at once.
    drop(st);
    ctx.post(&gregs_of(&tf), vf.vx_tls[0].base, vf.vx_tls[1].base);
    Started::Wait(Waiter {
        ctx: Arc::clone(ctx),
        env: Arc::clone(env),
        run_no,
    })
}

/// What the context reported.
#[derive(Debug, Clone, Copy)]
struct Report {
    sig: u32,
    code: i32,
    addr: u64,
    syscall: u64,
    gregs: [u64; GREGS],
    fs: u64,
    gs: u64,
}

impl Report {
    fn read(ctx: &Context) -> Self {
        let mut gregs = [0u64; GREGS];
        for (i, g) in gregs.iter_mut().enumerate() {
            *g = ctx.qword(CX_OUT + 8 * i).load(Ordering::Relaxed);
        }
        Self {
            sig: ctx.word(CX_SIG).load(Ordering::Acquire),
            code: ctx.word(CX_CODE).load(Ordering::Relaxed) as i32,
            addr: ctx.qword(CX_ADDR).load(Ordering::Relaxed),
            syscall: ctx.qword(CX_SYSCALL).load(Ordering::Relaxed),
            gregs,
            fs: ctx.qword(CX_FS_OUT).load(Ordering::Relaxed),
            gs: ctx.qword(CX_GS_OUT).load(Ordering::Relaxed),
        }
    }

    fn hw_trapno(&self) -> u64 {
        self.gregs[REG_TRAPNO]
    }
}

/// A trap as the ABI reports it: `tf_trapno`, `tf_err`, `tf_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trap {
    pub trapno: u64,
    pub err: u64,
    pub addr: u64,
}

/// The ABI's trap for a signal the context caught (x86 exception numbers in
/// `REG_TRAPNO` to DragonFly's `T_*`).
fn trap_of(r: &Report) -> Trap {
    let sig = r.sig as i32;
    let hw = r.hw_trapno();
    let err = r.gregs[REG_ERR];
    let plain = |trapno| Trap {
        trapno,
        err,
        addr: 0,
    };
    match sig {
        libc::SIGSYS => {
            if (r.syscall >> 32) as u32 == AUDIT_ARCH_I386 {
                Trap {
                    trapno: T_SYSCALL80,
                    err: 0,
                    addr: 0,
                }
            } else {
                Trap {
                    trapno: T_FAST_SYSCALL,
                    err: 2,
                    addr: 0,
                }
            }
        }
        // The hardware says "not present" for a page never touched; a
        // mapping that denies the access (SEGV_ACCERR) is a protection
        // fault whatever the host page table held.
        libc::SIGSEGV if hw == 14 => Trap {
            trapno: T_PAGEFLT,
            err: err & (PGEX_P | PGEX_W | PGEX_U | PGEX_I)
                | if r.code == SEGV_ACCERR { PGEX_P } else { 0 },
            addr: r.gregs[REG_CR2],
        },
        libc::SIGSEGV if hw == 11 => plain(T_SEGNPFLT),
        libc::SIGSEGV if hw == 12 => plain(T_STKFLT),
        libc::SIGSEGV => plain(T_PROTFLT),
        libc::SIGBUS if hw == 17 => plain(T_ALIGNFLT),
        // A shared mapping beyond the end of RAM.
        libc::SIGBUS => Trap {
            trapno: T_PAGEFLT,
            err: PGEX_U,
            addr: r.addr,
        },
        libc::SIGILL => plain(T_PRIVINFLT),
        libc::SIGTRAP if hw == 1 => plain(T_TRCTRAP),
        libc::SIGTRAP => plain(T_BPTFLT),
        libc::SIGFPE if hw == 16 => plain(T_ARITHTRAP),
        libc::SIGFPE if hw == 19 => plain(T_XMMFLT),
        libc::SIGFPE => plain(T_DIVIDE),
        _ => Trap {
            trapno: T_SIGNAL,
            err: 0,
            addr: 0,
        },
    }
}

/// `uretprobe(2)`, Linux's system call 335 on x86-64 (6.11), which every
/// seccomp filter lets through.
const NR_URETPROBE: u64 = 335;
/// `si_code` of a signal the kernel raised itself.
const SI_KERNEL: i32 = 0x80;

impl Report {
    /// Since Linux 6.11, system call 335 (`uretprobe`) runs past every
    /// seccomp filter; made from anywhere but a uprobe trampoline it sets
    /// rax to -1 and raises `SIGILL` (`SI_KERNEL`) just after the
    /// `syscall`. It is the user code's system call all the same: report it
    /// as one, with its number back in rax (the upper half of rax, ignored
    /// by the kernel, is lost). Nothing else raises that `SIGILL` with rcx
    /// equal to rip, as only `syscall` leaves them.
    fn undo_uretprobe(&mut self) {
        let g = &mut self.gregs;
        if self.sig == libc::SIGILL as u32
            && self.code == SI_KERNEL
            && g[REG_RCX] == g[REG_RIP]
            && g[REG_RAX] == u64::MAX
        {
            self.sig = libc::SIGSYS as u32;
            self.syscall = NR_URETPROBE | u64::from(crate::sys::seccomp::AUDIT_ARCH_X86_64) << 32;
            g[REG_RAX] = NR_URETPROBE;
        }
    }
}

/// The frame to copy out: the report's registers into the frame copied in.
fn frame_of(p: &Pending, r: &Report, trap: Trap) -> (TrapFrame, VextFrame) {
    let g = &r.gregs;
    let mut tf = p.tf;
    tf.tf_r8 = g[REG_R8];
    tf.tf_r9 = g[REG_R9];
    tf.tf_r10 = g[REG_R10];
    tf.tf_r11 = g[REG_R11];
    tf.tf_r12 = g[REG_R12];
    tf.tf_r13 = g[REG_R13];
    tf.tf_r14 = g[REG_R14];
    tf.tf_r15 = g[REG_R15];
    tf.tf_rdi = g[REG_RDI];
    tf.tf_rsi = g[REG_RSI];
    tf.tf_rbp = g[REG_RBP];
    tf.tf_rbx = g[REG_RBX];
    tf.tf_rdx = g[REG_RDX];
    tf.tf_rax = g[REG_RAX];
    tf.tf_rcx = g[REG_RCX];
    tf.tf_rsp = g[REG_RSP];
    tf.tf_rip = g[REG_RIP];
    tf.tf_rflags = g[REG_EFL];
    tf.tf_cs = USER_CS;
    tf.tf_ss = USER_SS;
    tf.tf_trapno = trap.trapno;
    tf.tf_err = trap.err;
    tf.tf_addr = trap.addr;
    let mut vf = p.vf;
    vf.vx_tls[0].base = r.fs;
    vf.vx_tls[1].base = r.gs;
    (tf, vf)
}

/// The end of one RUN: the hypercall thread that started it sleeps on the
/// block's report counter until the run is answered.
pub struct Waiter {
    ctx: Arc<Context>,
    env: Arc<RunEnv>,
    /// The run it finishes.
    run_no: u64,
}

impl Waiter {
    /// Wait for the context's reports until the RUN is answered or taken
    /// back by the tracer, the context closes, or `stop` is set. `idle`
    /// runs whenever a wait times out (every [`WAITER_POLL`]).
    pub fn finish(self, stop: &AtomicBool, idle: impl Fn()) {
        let ctx = &*self.ctx;
        loop {
            if lock(&ctx.state).run.as_ref().map(|p| p.run_no) != Some(self.run_no) {
                return; // answered, or taken back by the tracer
            }
            let seq = ctx.word(CX_SEQ).load(Ordering::Acquire);
            if seq == ctx.seen.load(Ordering::Relaxed) {
                if ctx.closed.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
                    return;
                }
                if ctx.vm.is_dead() {
                    self.fail_pending(Errno::EIO, "the vmspace's host process died");
                    return;
                }
                let _ = futex::wait(ctx.word(CX_SEQ), seq, WAITER_POLL);
                if ctx.word(CX_SEQ).load(Ordering::Acquire) != seq {
                    continue;
                }
                idle();
                if lock(&ctx.state).run.is_some()
                    && !crate::vmspace::task_alive(ctx.vm.stub, ctx.tid)
                {
                    // The context's thread is gone (user code jumped into
                    // vkrun's code and ended it): this context is broken.
                    // Closed first: the answer lets the guest RUN again at
                    // once, and that RUN must find a fresh context.
                    ctx.closed.store(true, Ordering::Release);
                    self.fail_pending(Errno::EIO, "the execution context's thread ended");
                    return;
                }
                continue;
            }
            ctx.seen.store(seq, Ordering::Relaxed);
            self.on_report(Report::read(ctx));
        }
    }

    /// The stub or the context's thread died: fail the RUN in flight.
    fn fail_pending(&self, errno: Errno, why: &str) {
        let ctx = &*self.ctx;
        let mut st = lock(&ctx.state);
        let Some(p) = st.run.take() else {
            return;
        };
        tracing::warn!(vmspace = format_args!("{:#x}", p.args[0]), guest = %ctx.guest, "RUN failed: {why}");
        self.answer(&mut st, &p, Err(errno));
    }

    fn on_report(&self, mut r: Report) {
        r.undo_uretprobe();
        let ctx = &*self.ctx;
        let mut st = lock(&ctx.state);
        let Some(p) = st.run.clone() else {
            return; // a report nobody asked for (user code jumping around)
        };
        let mut trap = trap_of(&r);
        if r.sig as i32 == KICK_SIGNAL {
            if let Some((addr, err)) = lock(&ctx.fault).take() {
                // Kicked out of a fault the walk could not resolve.
                trap = Trap {
                    trapno: T_PAGEFLT,
                    err,
                    addr,
                };
                if !st.interrupt {
                    ctx.word(CX_KICK).store(0, Ordering::Release);
                }
            } else if !st.interrupt {
                // A kick meant for an earlier run: carry on.
                ctx.post(&in_regs(&r), r.fs, r.gs);
                return;
            }
        }
        if trap.trapno == T_PAGEFLT && r.sig as i32 == libc::SIGSEGV && !st.interrupt {
            // A window fault the host resolves (read-only page written,
            // page being re-armed), or a failed walk with its own error bits.
            match self
                .env
                .vpt
                .on_stub_fault(ctx.vm.stub, trap.addr, trap.err, ctx.guest)
            {
                StubFault::Retry => {
                    ctx.post(&in_regs(&r), r.fs, r.gs);
                    return;
                }
                StubFault::Report(err) => trap.err = err,
            }
        }
        st.run = None;
        st.retry = (trap.trapno == T_PAGEFLT && trap.err & PGEX_I == 0)
            .then(|| (r.gregs[REG_RIP], trap.addr, trap.err & PGEX_W != 0));
        let (tf, vf) = frame_of(&p, &r, trap);
        let written = remote::write_two(
            ctx.guest,
            (RemoteAddr(p.args[2]), &tf.to_bytes()),
            (RemoteAddr(p.args[3]), &vf.to_bytes()),
        )
        .map_err(|_| Errno::EFAULT);
        let stats = &self.env.stats;
        let exits = match trap.trapno {
            T_FAST_SYSCALL | T_SYSCALL80 => &stats.run_exits_syscall,
            T_PAGEFLT => &stats.run_exits_pagefault,
            T_SIGNAL => &stats.run_exits_signal,
            _ => &stats.run_exits_trap,
        };
        exits.fetch_add(1, Ordering::Relaxed);
        let result = written.map(|()| 0);
        self.trace(&p, result, Some((trap, tf.tf_rip)));
        if st.interrupt {
            st.interrupt = false;
            ctx.word(CX_KICK).store(0, Ordering::Release);
            st.done = Some(raw(result));
            ctx.cond.notify_all();
            return;
        }
        self.respond(&mut st, &p, result);
    }

    /// Answer a RUN that ends without a report (its stub died).
    fn answer(&self, st: &mut RunState, p: &Pending, result: Result<i64, Errno>) {
        self.trace(p, result, None);
        if st.interrupt {
            st.interrupt = false;
            st.done = Some(raw(result));
            self.ctx.cond.notify_all();
            return;
        }
        self.respond(st, p, result);
    }

    fn respond(&self, st: &mut RunState, p: &Pending, result: Result<i64, Errno>) {
        self.env
            .stats
            .count_hypercall(Some(Hypercall::VmspaceCtl), result.is_err());
        match self.env.notify.respond(p.notif, result) {
            Ok(()) => {}
            // Withdrawn (a signal): the tracer or the restarted call takes it.
            Err(Errno::ENOENT) => st.completed = Some(raw(result)),
            Err(errno) => tracing::warn!(%errno, "answering RUN failed"),
        }
    }

    fn trace(&self, p: &Pending, result: Result<i64, Errno>, trap: Option<(Trap, u64)>) {
        let text = crate::trace::format_result(result, false);
        trace_run(&self.env.trace, self.ctx.guest, p, &text, trap);
    }
}

/// The trace line of a finished RUN, if the trace wants it:
/// `vmspace_ctl(...) = 0 (T_FAST_SYSCALL rip=...)`.
fn trace_run(
    trace: &Mutex<TraceWriter>,
    guest: Pid,
    p: &Pending,
    result: &str,
    trap: Option<(Trap, u64)>,
) {
    let mut trace = lock(trace);
    let set = *trace.set();
    if !(set.runs || set.hypercall(Some(Hypercall::VmspaceCtl))) {
        return;
    }
    let n = Notification {
        id: p.notif,
        tid: guest.as_raw(),
        nr: Hypercall::VmspaceCtl.nr(),
        args: p.args,
    };
    let mut text = format!(
        "{} {result}",
        crate::hypercall::format_call(Some(Hypercall::VmspaceCtl), &n),
    );
    if let Some((trap, rip)) = trap {
        text.push_str(&format!(" ({})", format_trap(trap, rip)));
    }
    let took = trace.wants_durations().then(|| p.started.elapsed());
    trace.line(guest.as_raw(), p.when, &text, took);
}

/// The report's registers as the next run's input (a retried instruction).
fn in_regs(r: &Report) -> [u64; GREGS_IN] {
    let mut g = [0u64; GREGS_IN];
    g.copy_from_slice(&r.gregs[..GREGS_IN]);
    g
}

fn raw(result: Result<i64, Errno>) -> i64 {
    result.unwrap_or_else(|e| -(e as i64))
}

/// DragonFly's name of a trap number.
pub fn trap_name(trapno: u64) -> Option<&'static str> {
    Some(match trapno {
        T_SIGNAL => "T_SIGNAL",
        T_PRIVINFLT => "T_PRIVINFLT",
        T_BPTFLT => "T_BPTFLT",
        T_ARITHTRAP => "T_ARITHTRAP",
        T_PROTFLT => "T_PROTFLT",
        T_TRCTRAP => "T_TRCTRAP",
        T_PAGEFLT => "T_PAGEFLT",
        T_ALIGNFLT => "T_ALIGNFLT",
        T_DIVIDE => "T_DIVIDE",
        T_SEGNPFLT => "T_SEGNPFLT",
        T_STKFLT => "T_STKFLT",
        T_XMMFLT => "T_XMMFLT",
        T_SYSCALL80 => "T_SYSCALL80",
        T_FAST_SYSCALL => "T_FAST_SYSCALL",
        _ => return None,
    })
}

/// A trap for the trace: `T_FAST_SYSCALL rip=0x401002`,
/// `T_PAGEFLT addr=0x1000 err=W|U rip=...`.
pub fn format_trap(trap: Trap, rip: u64) -> String {
    let name = trap_name(trap.trapno).map_or_else(|| trap.trapno.to_string(), str::to_owned);
    if trap.trapno == T_PAGEFLT {
        let bits = [(PGEX_P, "P"), (PGEX_W, "W"), (PGEX_U, "U"), (PGEX_I, "I")];
        let err = crate::trace::format_flags(trap.err, &bits, "0");
        format!("{name} addr={:#x} err={err} rip={rip:#x}", trap.addr)
    } else {
        format!("{name} rip={rip:#x}")
    }
}

/// The tracer found guest thread `ctx.guest` in a signal-delivery-stop with
/// `rax` = `ret` while its RUN in `ctx` was in flight or unanswered: the
/// value its RUN must return (the tracer sets `rax` to it), or `None` if its
/// RUN is not concerned.
pub fn interrupt(ctx: &Context, ret: i64, trace: &Mutex<TraceWriter>) -> Option<i64> {
    if ![
        -ERESTARTSYS,
        -ERESTARTNOINTR,
        -ERESTARTNOHAND,
        -(libc::EINTR as i64),
    ]
    .contains(&ret)
    {
        return None;
    }
    let mut st = lock(&ctx.state);
    if let Some(v) = st.completed.take() {
        return Some(v);
    }
    st.run.as_ref()?;
    // Not picked up yet: take the run back; RUN fails with EINTR.
    if ctx
        .word(CX_STATE)
        .compare_exchange(STATE_GO, STATE_WAIT, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        if let Some(p) = st.run.take() {
            let text = crate::trace::format_result(Err(Errno::EINTR), false);
            trace_run(trace, ctx.guest, &p, &text, None);
        }
        // Its waiter is asleep on the report counter: let it go.
        let _ = futex::wake(ctx.word(CX_SEQ));
        ctx.vm
            .stats()
            .count_hypercall(Some(Hypercall::VmspaceCtl), true);
        return Some(-(libc::EINTR as i64));
    }
    st.interrupt = true;
    st.done = None;
    ctx.word(CX_KICK).store(1, Ordering::Release);
    let _ = ctx.vm.kick(ctx.tid);
    let deadline = Instant::now() + KICK_TIMEOUT;
    while st.done.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(guest = %ctx.guest, "a vmspace context did not stop; killing its stub");
            ctx.vm.mark_dead();
            st.run = None;
            st.interrupt = false;
            let _ = futex::wake(ctx.word(CX_SEQ));
            return Some(-(Errno::EIO as i64));
        }
        st = ctx
            .cond
            .wait_timeout(st, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    ctx.vm
        .stats()
        .count_hypercall(Some(Hypercall::VmspaceCtl), false);
    st.done.take()
}

/// Whether RUN's thread `tid` may be reporting in this context now: used
/// by tests of the pure parts.
#[cfg(test)]
mod tests {
    use super::*;

    fn report(sig: i32, hw: u64, err: u64) -> Report {
        let mut gregs = [0u64; GREGS];
        gregs[REG_TRAPNO] = hw;
        gregs[REG_ERR] = err;
        gregs[REG_CR2] = 0x1234_5000;
        Report {
            sig: sig as u32,
            code: 0,
            addr: 0,
            syscall: u64::from(crate::sys::seccomp::AUDIT_ARCH_X86_64) << 32,
            gregs,
            fs: 0,
            gs: 0,
        }
    }

    #[test]
    fn host_traps_map_to_dragonfly_numbers() {
        let t = |sig, hw, err| trap_of(&report(sig, hw, err)).trapno;
        assert_eq!(t(libc::SIGSYS, 0, 0), T_FAST_SYSCALL);
        assert_eq!(t(libc::SIGTRAP, 3, 0), T_BPTFLT);
        assert_eq!(t(libc::SIGTRAP, 1, 0), T_TRCTRAP);
        assert_eq!(t(libc::SIGILL, 6, 0), T_PRIVINFLT);
        assert_eq!(t(libc::SIGSEGV, 13, 0), T_PROTFLT);
        assert_eq!(t(libc::SIGFPE, 0, 0), T_DIVIDE);
        assert_eq!(t(KICK_SIGNAL, 0, 0), T_SIGNAL);
        let mut r = report(libc::SIGSYS, 0, 0);
        r.syscall = u64::from(AUDIT_ARCH_I386) << 32;
        assert_eq!(trap_of(&r).trapno, T_SYSCALL80);
        let pf = trap_of(&report(libc::SIGSEGV, 14, 0x26));
        assert_eq!(
            pf,
            Trap {
                trapno: T_PAGEFLT,
                err: PGEX_W | PGEX_U,
                addr: 0x1234_5000
            }
        );
        assert_eq!(trap_of(&report(libc::SIGSYS, 0, 0)).err, 2);
        let mut ro = report(libc::SIGSEGV, 14, PGEX_W | PGEX_U);
        ro.code = SEGV_ACCERR;
        assert_eq!(trap_of(&ro).err, PGEX_P | PGEX_W | PGEX_U);
    }

    #[test]
    fn uretprobe_is_a_system_call() {
        let mut r = report(libc::SIGILL, 3, 0);
        r.code = SI_KERNEL;
        r.gregs[REG_RIP] = 0x40_0002;
        r.gregs[REG_RCX] = 0x40_0002;
        r.gregs[REG_RAX] = u64::MAX;
        let mut ud2 = r;
        r.undo_uretprobe();
        assert_eq!(trap_of(&r).trapno, T_FAST_SYSCALL);
        assert_eq!(r.gregs[REG_RAX], NR_URETPROBE);
        // A real invalid opcode stays one.
        ud2.code = 2; // ILL_ILLOPN
        ud2.undo_uretprobe();
        assert_eq!(trap_of(&ud2).trapno, T_PRIVINFLT);
    }

    #[test]
    fn only_canonical_bases_pass() {
        assert!(canonical(0));
        assert!(canonical(0x7fff_ffff_ffff));
        assert!(canonical(0xffff_8000_0000_0000));
        assert!(!canonical(0x8000_0000_0000));
        assert!(!canonical(0x5707_0000_0000_0027));
    }

    #[test]
    fn frames_are_sanitised() {
        let tf = TrapFrame {
            tf_rflags: u64::MAX,
            tf_cs: 0x8,
            ..TrapFrame::default()
        };
        // ABI section 7: `rflags &= 0x274DD5` then `|= 0x202`.
        assert_eq!(gregs_of(&tf)[REG_EFL], 0x27_4DD5 | 0x202);
        let tf = TrapFrame::default();
        assert_eq!(gregs_of(&tf)[REG_EFL], 0x202);
    }

    #[test]
    fn traps_are_traced_by_name() {
        let pf = Trap {
            trapno: T_PAGEFLT,
            err: PGEX_W | PGEX_U,
            addr: 0x1000,
        };
        assert_eq!(
            format_trap(pf, 0x401000),
            "T_PAGEFLT addr=0x1000 err=W|U rip=0x401000"
        );
        let sc = Trap {
            trapno: T_FAST_SYSCALL,
            err: 2,
            addr: 0,
        };
        assert_eq!(format_trap(sc, 0x401002), "T_FAST_SYSCALL rip=0x401002");
    }
}
