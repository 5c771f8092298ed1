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
//!   an access the area forbids, kills the process with `SIGSEGV`;
//! - `T_SIGNAL`: a host signal for the minikernel arrived (its handler, if
//!   any, has run): RUN again;
//! - any other trap kills the process with the signal Linux would send.
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
use crate::syscall;

/// Run `p` until it exits or is killed.
pub fn run(k: &mut Kernel, p: &mut Proc) -> Result<Exit, KernelError> {
    let mut last_fault = (u64::MAX, 0u32);
    loop {
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
                    Fault::Segv => return Ok(Exit::Signal(libc::SIGSEGV)),
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
                let Some(signal) = trap_signal(trapno) else {
                    return Err(KernelError::UnexpectedTrap {
                        trapno,
                        rip: p.tf.tf_rip,
                    });
                };
                return Ok(Exit::Signal(signal));
            }
        }
    }
}

/// The signal Linux sends for user trap `trapno`, or `None` for a trap
/// user code cannot raise.
fn trap_signal(trapno: u64) -> Option<i32> {
    Some(match trapno {
        T_PRIVINFLT | T_FPOPFLT => libc::SIGILL,
        T_BPTFLT | T_TRCTRAP => libc::SIGTRAP,
        T_ARITHTRAP | T_DIVIDE | T_OFLOW | T_XMMFLT => libc::SIGFPE,
        T_PROTFLT | T_SEGNPFLT | T_STKFLT | T_TSSFLT | T_BOUND | T_SYSCALL80 => libc::SIGSEGV,
        T_ALIGNFLT => libc::SIGBUS,
        _ => return None,
    })
}
