//! The trap loop on top of the minikernel: each thread of the user process
//! runs with `vmspace_ctl(RUN)` on its own host thread until it exits, or
//! the process exits or is killed ([`run`]).
//!
//! The threads of a process share the minikernel's state and the process
//! ([`Guest`]) under one lock, held while a trap is served and released
//! while the thread RUNs and during host calls that may block
//! ([`syscall::Blocked`]: `read`, `write`, `futex` waits, sleeps, `wait4`,
//! `poll`, `rt_sigsuspend`). Each thread's registers, signal mask and
//! alternate stack are its own ([`Thread`]); it RUNs the process's vmspace,
//! in which the host gives it an execution context of its own.
//!
//! Each RUN comes back with one event:
//!
//! - `T_FAST_SYSCALL`: the system call is served by [`crate::syscall`]; its
//!   result goes in `tf_rax` and RUN continues after the `syscall`
//!   instruction;
//! - `T_PAGEFLT`: demand paging ([`Mm::fault`](crate::mm::Mm::fault)): a
//!   zeroed frame for an anonymous page, a copy (or the frame taken over)
//!   for a write to a copy-on-write page after `fork`; an address outside
//!   every area, or an access the area forbids, raises `SIGSEGV`;
//! - `T_SIGNAL`: a host signal for the minikernel arrived (its handler, if
//!   any, has run and recorded it): RUN again;
//! - any other trap raises the signal Linux would send ([`signal::force`]):
//!   its handler runs, or the process dies of it.
//!
//! Before each RUN a pending signal gets its action ([`signal::deliver`]):
//! a handler frame, or the end of the process.
//!
//! A killed process ends the minikernel with status 128 + signal, as a
//! shell reports it; `exit_group(code)` ends it with `code`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vkabi::hypercall::Errno;
use vkabi::{
    PAGE_SIZE, T_ALIGNFLT, T_ARITHTRAP, T_BOUND, T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_FPOPFLT,
    T_OFLOW, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SEGNPFLT, T_SIGNAL, T_STKFLT, T_SYSCALL80,
    T_TRCTRAP, T_TSSFLT, T_XMMFLT,
};
use vkguest::Vmspace;

use crate::kernel::{Exit, Kernel, KernelError, Proc, Thread};
use crate::mm::{Fault, page_down};
use crate::syscall::{Blocked, Outcome};
use crate::{process, signal, syscall};

/// The minikernel's state and its process, shared by the process's
/// threads. `p` is taken when the process ends (under the lock, which the
/// ending thread then keeps).
#[derive(Debug)]
pub struct Guest {
    k: Kernel,
    p: Option<Proc>,
}

type Shared = Arc<Mutex<Guest>>;

/// The guest's lock (a thread that panicked left nothing half-done that
/// matters more than going on).
fn lock(g: &Shared) -> MutexGuard<'_, Guest> {
    g.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Run process `p` until it exits or is killed; ends the minikernel.
pub fn run(k: Kernel, p: Proc) -> ! {
    let t = p.thread();
    let g = Arc::new(Mutex::new(Guest { k, p: Some(p) }));
    thread_main(&g, t);
    // The first thread exited with others left, which end the process.
    loop {
        std::thread::park();
    }
}

/// A thread's life; returns when the thread exits (not the last one).
fn thread_main(g: &Shared, mut t: Thread) {
    if let Err(e) = thread_loop(g, &mut t) {
        eprintln!("minikernel: {e}");
        std::process::exit(1);
    }
}

/// End the process with `exit` (the guard stays held: no other thread
/// runs any more).
fn end(mut guard: MutexGuard<'_, Guest>, exit: Exit) -> ! {
    let Some(p) = guard.p.take() else {
        loop {
            std::thread::park();
        }
    };
    let k = &mut guard.k;
    if std::env::var("MINIKERNEL_STATS").is_ok_and(|v| v == "1") {
        let s = k.stats;
        let name = p.exe.file_name().unwrap_or(p.exe.as_os_str());
        eprintln!(
            "minikernel: {} (pid {}) ran in a vmspace: {} runs, ended by {} syscalls, \
             {} page faults served ({} stale: a translation the host had dropped), {} signals",
            name.to_string_lossy(),
            p.pid,
            s.runs,
            s.syscalls,
            s.page_faults,
            s.stale_faults,
            s.signals,
        );
        if s.forks + s.execs + s.cow_copies + s.cow_reuses > 0 {
            eprintln!("{}", s.fork_line());
        }
    }
    process::finish(k, p, exit)
}

/// What a served trap leaves the thread loop to do.
enum Step {
    Run,
    Exit(Exit),
    Block(Blocked),
    Spawn(Box<Thread>),
    ThreadExit,
}

/// Run thread `t` of the guest until it exits.
fn thread_loop(g: &Shared, t: &mut Thread) -> Result<(), KernelError> {
    let mut last_fault = (u64::MAX, 0u32);
    loop {
        let vm = {
            let mut guard = lock(g);
            let Guest { k, p } = &mut *guard;
            let Some(p) = p.as_mut() else { return Ok(()) };
            p.enter(t);
            if let Some(exit) = signal::deliver(k, p) {
                end(guard, exit);
            }
            // Frames the minikernel replaced under the program (copies on
            // write made while serving it) must not stay in the host's
            // translations.
            if let Some((lo, hi)) = p.mm.take_stale() {
                p.vm.inval(lo, hi - lo)?;
            }
            p.leave(t);
            p.vm.id()
        };
        match Vmspace::run_id(vm, &mut t.tf, &mut t.vf) {
            Ok(()) => {}
            // A signal arrived before the user code started (e.g. a
            // child's SIGCHLD): the frame is intact, RUN again.
            Err(e) if e.errno == Errno::EINTR => {
                lock(g).k.stats.signals += 1;
                continue;
            }
            Err(e) => {
                // The process may be ending (its vmspace gone): the
                // ending thread holds the lock until the process exits.
                let guard = lock(g);
                if guard.p.is_none() {
                    loop {
                        std::thread::park();
                    }
                }
                return Err(e.into());
            }
        }
        let mut guard = lock(g);
        let step = {
            let Guest { k, p } = &mut *guard;
            let Some(p) = p.as_mut() else { return Ok(()) };
            p.enter(t);
            let step = serve_trap(k, p, &mut last_fault)?;
            p.leave(t);
            step
        };
        match step {
            Step::Run => {}
            Step::Exit(exit) => end(guard, exit),
            Step::ThreadExit => return Ok(()),
            Step::Block(b) => {
                drop(guard);
                let ret = b.call();
                let mut guard = lock(g);
                let Guest { k, p } = &mut *guard;
                let Some(p) = p.as_mut() else { return Ok(()) };
                p.enter(t);
                if let Some(exit) = syscall::complete(k, p, b, ret) {
                    end(guard, exit);
                }
                p.leave(t);
            }
            Step::Spawn(new) => {
                let tid = spawn(g, *new);
                let Guest { k, p } = &mut *guard;
                let Some(p) = p.as_mut() else { return Ok(()) };
                p.enter(t);
                match tid {
                    Ok(tid) => process::thread_started(k, p, tid),
                    Err(e) => p.tf.tf_rax = (-i64::from(e)) as u64,
                }
                p.leave(t);
            }
        }
    }
}

/// Start thread `t` on a host thread of its own; its tid.
fn spawn(g: &Shared, mut t: Thread) -> Result<i32, i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let g = Arc::clone(g);
    std::thread::Builder::new()
        .spawn(move || {
            // SAFETY: gettid cannot fail.
            t.tid = unsafe { libc::gettid() };
            let _ = tx.send(t.tid);
            thread_main(&g, t);
        })
        .map_err(|_| libc::EAGAIN)?;
    rx.recv().map_err(|_| libc::EAGAIN)
}

/// Serve the trap in `p.tf` (the served thread's).
fn serve_trap(
    k: &mut Kernel,
    p: &mut Proc,
    last_fault: &mut (u64, u32),
) -> Result<Step, KernelError> {
    k.stats.runs += 1;
    match p.tf.tf_trapno {
        T_FAST_SYSCALL => {
            k.stats.syscalls += 1;
            return Ok(match syscall::serve(k, p)? {
                Outcome::Done(None) => Step::Run,
                Outcome::Done(Some(exit)) => Step::Exit(exit),
                Outcome::Block(b) => Step::Block(b),
                Outcome::Spawn(t) => Step::Spawn(t),
                Outcome::ThreadExit => Step::ThreadExit,
            });
        }
        T_PAGEFLT => {
            let (addr, err) = (p.tf.tf_addr, p.tf.tf_err);
            match p.mm.fault(&k.ram, &mut k.frames, addr, err)? {
                Fault::Mapped => k.stats.page_faults += 1,
                Fault::Cow { start, end, copied } => {
                    k.stats.cow_copies += copied;
                    k.stats.cow_reuses += (end - start) / PAGE_SIZE - copied;
                    if copied > 0 {
                        p.vm.inval(start, end - start)?;
                    }
                }
                Fault::Segv => {
                    // SEGV_ACCERR inside an area, SEGV_MAPERR outside.
                    let code = if p.mm.find(addr).is_some() { 2 } else { 1 };
                    if let Some(exit) = signal::force(k, p, libc::SIGSEGV, code, addr) {
                        return Ok(Step::Exit(exit));
                    }
                }
                Fault::Stale => {
                    k.stats.stale_faults += 1;
                    let page = page_down(addr);
                    *last_fault = if last_fault.0 == page {
                        (page, last_fault.1 + 1)
                    } else {
                        (page, 1)
                    };
                    if last_fault.1 > 3 {
                        return Err(KernelError::Unresolved { addr, err });
                    }
                    p.vm.inval(page, PAGE_SIZE)?;
                }
            }
        }
        T_SIGNAL => k.stats.signals += 1,
        trapno => {
            let Some((sig, code, addr)) = trap_signal(trapno, p.tf.tf_rip) else {
                return Err(KernelError::UnexpectedTrap {
                    trapno,
                    rip: p.tf.tf_rip,
                });
            };
            if let Some(exit) = signal::force(k, p, sig, code, addr) {
                return Ok(Step::Exit(exit));
            }
        }
    }
    Ok(Step::Run)
}

/// The signal Linux sends for user trap `trapno` at `rip`, with its
/// `si_code` and `si_addr`, or `None` for a trap user code cannot raise.
fn trap_signal(trapno: u64, rip: u64) -> Option<(i32, i32, u64)> {
    Some(match trapno {
        T_PRIVINFLT => (libc::SIGILL, 2, rip), // ILL_ILLOPN
        T_FPOPFLT => (libc::SIGILL, 2, rip),
        T_BPTFLT | T_TRCTRAP => (libc::SIGTRAP, signal::SI_KERNEL, 0),
        T_DIVIDE => (libc::SIGFPE, 1, rip), // FPE_INTDIV
        T_OFLOW => (libc::SIGFPE, 2, rip),  // FPE_INTOVF
        T_ARITHTRAP | T_XMMFLT => (libc::SIGFPE, 0, rip),
        T_PROTFLT | T_SEGNPFLT | T_STKFLT | T_TSSFLT | T_BOUND | T_SYSCALL80 => {
            (libc::SIGSEGV, signal::SI_KERNEL, 0)
        }
        T_ALIGNFLT => (libc::SIGBUS, 1, 0), // BUS_ADRALN
        _ => return None,
    })
}
