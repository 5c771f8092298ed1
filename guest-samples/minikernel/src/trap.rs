//! The trap loop on top of the minikernel: the user process runs with
//! `vmspace_ctl(RUN)` until it exits or is killed ([`run`]).
//!
//! Each RUN comes back with one event:
//!
//! - `T_FAST_SYSCALL`: the system call is served by [`crate::syscall`]; its
//!   result goes in `tf_rax` and RUN continues after the `syscall`
//!   instruction;
//! - `T_PAGEFLT`: demand paging ([`Mm::fault`](crate::mm::Mm::fault)): a
//!   zeroed frame for an anonymous page; an address outside every area, or
//!   an access the area forbids, raises `SIGSEGV`;
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

use vkabi::hypercall::Errno;
use vkabi::{
    PAGE_SIZE, T_ALIGNFLT, T_ARITHTRAP, T_BOUND, T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_FPOPFLT,
    T_OFLOW, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SEGNPFLT, T_SIGNAL, T_STKFLT, T_SYSCALL80,
    T_TRCTRAP, T_TSSFLT, T_XMMFLT,
};

use crate::kernel::{Exit, Kernel, KernelError, Proc};
use crate::mm::{Fault, page_down};
use crate::{signal, syscall};

/// Run `p` until it exits or is killed.
pub fn run(k: &mut Kernel, p: &mut Proc) -> Result<Exit, KernelError> {
    let mut last_fault = (u64::MAX, 0u32);
    loop {
        if let Some(exit) = signal::deliver(k, p) {
            return Ok(exit);
        }
        match p.vm.run(&mut p.tf, &mut p.vf) {
            Ok(()) => {}
            // A signal arrived before the user code started (e.g. a
            // child's SIGCHLD): the frame is intact, RUN again.
            Err(e) if e.errno == Errno::EINTR => {
                k.stats.signals += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        k.stats.runs += 1;
        match p.tf.tf_trapno {
            T_FAST_SYSCALL => {
                k.stats.syscalls += 1;
                if let Some(exit) = syscall::serve(k, p)? {
                    return Ok(exit);
                }
            }
            T_PAGEFLT => {
                let (addr, err) = (p.tf.tf_addr, p.tf.tf_err);
                match p.mm.fault(&k.ram, &mut k.frames, addr, err)? {
                    Fault::Mapped => k.stats.page_faults += 1,
                    Fault::Segv => {
                        // SEGV_ACCERR inside an area, SEGV_MAPERR outside.
                        let code = if p.mm.find(addr).is_some() { 2 } else { 1 };
                        if let Some(exit) = signal::force(k, p, libc::SIGSEGV, code, addr) {
                            return Ok(exit);
                        }
                    }
                    Fault::Stale => {
                        k.stats.stale_faults += 1;
                        let page = page_down(addr);
                        last_fault = if last_fault.0 == page {
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
                    return Ok(exit);
                }
            }
        }
    }
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
