//! Why control came back from user code: the context's report (the
//! registers its handler saved and the signal that stopped it), the typed
//! exit it comes to ([`Trap`]: DragonFly's `tf_trapno`, `tf_err`,
//! `tf_addr`), and the frames RUN takes in and gives back. Pure.

use vkabi::{
    PGEX_I, PGEX_P, PGEX_U, PGEX_W, RFLAGS_USER_MASK, RFLAGS_USER_SET, T_ALIGNFLT, T_ARITHTRAP,
    T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SEGNPFLT, T_SIGNAL,
    T_STKFLT, T_SYSCALL80, T_TRCTRAP, T_XMMFLT, TrapFrame, VextFrame,
};

use super::context::{Context, Pending};
use crate::sys::abi::{
    AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, NR_URETPROBE, SEGV_ACCERR, SI_KERNEL, USER_CS, USER_SS,
};
use crate::sys::stub::{
    CX_ADDR, CX_CODE, CX_FS_OUT, CX_GS_OUT, CX_OUT, CX_SIG, CX_SYSCALL, GREGS, GREGS_IN, REG_CR2,
    REG_EFL, REG_ERR, REG_R8, REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
    REG_RAX, REG_RBP, REG_RBX, REG_RCX, REG_RDI, REG_RDX, REG_RIP, REG_RSI, REG_RSP, REG_TRAPNO,
};
use std::sync::atomic::Ordering;

/// Whether `addr` is canonical on x86-64 (bits 63..47 all equal): the only
/// values an FS or GS base can hold.
pub(super) fn canonical(addr: u64) -> bool {
    let top = (addr as i64) >> 47;
    top == 0 || top == -1
}

/// The registers to run with: `tf`, sanitised.
pub(super) fn gregs_of(tf: &TrapFrame) -> [u64; GREGS_IN] {
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

/// What the context reported.
#[derive(Debug, Clone, Copy)]
pub(super) struct Report {
    pub sig: u32,
    pub code: i32,
    pub addr: u64,
    pub syscall: u64,
    pub gregs: [u64; GREGS],
    pub fs: u64,
    pub gs: u64,
}

impl Report {
    pub(super) fn read(ctx: &Context) -> Self {
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

    pub(super) fn hw_trapno(&self) -> u64 {
        self.gregs[REG_TRAPNO]
    }
}

/// A trap as the ABI reports it: `tf_trapno`, `tf_err`, `tf_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Trap {
    pub trapno: u64,
    pub err: u64,
    pub addr: u64,
}

/// The ABI's trap for a signal the context caught (x86 exception numbers in
/// `REG_TRAPNO` to DragonFly's `T_*`).
pub(super) fn trap_of(r: &Report) -> Trap {
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

impl Report {
    /// Since Linux 6.11, system call 335 (`uretprobe`) runs past every
    /// seccomp filter; made from anywhere but a uprobe trampoline it sets
    /// rax to -1 and raises `SIGILL` (`SI_KERNEL`) just after the
    /// `syscall`. It is the user code's system call all the same: report it
    /// as one, with its number back in rax (the upper half of rax, ignored
    /// by the kernel, is lost). Nothing else raises that `SIGILL` with rcx
    /// equal to rip, as only `syscall` leaves them.
    pub(super) fn undo_uretprobe(&mut self) {
        let g = &mut self.gregs;
        if self.sig == libc::SIGILL as u32
            && self.code == SI_KERNEL
            && g[REG_RCX] == g[REG_RIP]
            && g[REG_RAX] == u64::MAX
        {
            self.sig = libc::SIGSYS as u32;
            self.syscall = NR_URETPROBE | u64::from(AUDIT_ARCH_X86_64) << 32;
            g[REG_RAX] = NR_URETPROBE;
        }
    }
}

/// The frame to copy out: the report's registers into the frame copied in.
pub(super) fn frame_of(p: &Pending, r: &Report, trap: Trap) -> (TrapFrame, VextFrame) {
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

/// The report's registers as the next run's input (a retried instruction).
pub(super) fn in_regs(r: &Report) -> [u64; GREGS_IN] {
    let mut g = [0u64; GREGS_IN];
    g.copy_from_slice(&r.gregs[..GREGS_IN]);
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::stub::KICK_SIGNAL;

    fn report(sig: i32, hw: u64, err: u64) -> Report {
        let mut gregs = [0u64; GREGS];
        gregs[REG_TRAPNO] = hw;
        gregs[REG_ERR] = err;
        gregs[REG_CR2] = 0x1234_5000;
        Report {
            sig: sig as u32,
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
}
