//! Numbers of the host's ABI that vkrun needs, each defined once: from
//! `libc` where it has them, written out (with their header) where not.

/// `SI_KERNEL`: `si_code` of a signal the kernel raised itself.
pub const SI_KERNEL: i32 = libc::SI_KERNEL;
/// `SEGV_MAPERR`, `SEGV_ACCERR` (`<asm-generic/siginfo.h>`; not in `libc`).
pub const SEGV_MAPERR: i32 = 1;
pub const SEGV_ACCERR: i32 = 2;
/// `AUDIT_ARCH_X86_64`, `AUDIT_ARCH_I386` (`<linux/audit.h>`; not in
/// `libc`): `seccomp_data.arch` of a 64-bit and of a 32-bit call.
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `uretprobe(2)`, x86-64 system call 335 (Linux 6.11; not in `libc`),
/// which every seccomp filter lets through.
pub const NR_URETPROBE: u64 = 335;
/// The x86 page-fault vector, as `REG_TRAPNO` reports it.
pub const X86_TRAP_PF: u64 = 14;
/// Host user selectors of x86-64 Linux (`__USER_CS`, `__USER_DS`).
pub const USER_CS: u64 = 0x33;
pub const USER_SS: u64 = 0x2b;
/// Indices into `ucontext_t.uc_mcontext.gregs` (x86-64).
pub const REG_R8: usize = libc::REG_R8 as usize;
pub const REG_R9: usize = libc::REG_R9 as usize;
pub const REG_R10: usize = libc::REG_R10 as usize;
pub const REG_R11: usize = libc::REG_R11 as usize;
pub const REG_R12: usize = libc::REG_R12 as usize;
pub const REG_R13: usize = libc::REG_R13 as usize;
pub const REG_R14: usize = libc::REG_R14 as usize;
pub const REG_R15: usize = libc::REG_R15 as usize;
pub const REG_RDI: usize = libc::REG_RDI as usize;
pub const REG_RSI: usize = libc::REG_RSI as usize;
pub const REG_RBP: usize = libc::REG_RBP as usize;
pub const REG_RBX: usize = libc::REG_RBX as usize;
pub const REG_RDX: usize = libc::REG_RDX as usize;
pub const REG_RAX: usize = libc::REG_RAX as usize;
pub const REG_RCX: usize = libc::REG_RCX as usize;
pub const REG_RSP: usize = libc::REG_RSP as usize;
pub const REG_RIP: usize = libc::REG_RIP as usize;
pub const REG_EFL: usize = libc::REG_EFL as usize;
pub const REG_ERR: usize = libc::REG_ERR as usize;
pub const REG_TRAPNO: usize = libc::REG_TRAPNO as usize;
pub const REG_CR2: usize = libc::REG_CR2 as usize;
/// Byte offset of `uc_mcontext.gregs` in `ucontext_t`.
pub const UC_GREGS: u64 = std::mem::offset_of!(libc::ucontext_t, uc_mcontext.gregs) as u64;
/// Kernel-internal restart codes a withdrawn system call leaves in `rax`
/// (`<linux/errno.h>`, never seen by user code).
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucontext_layout_is_the_kernels() {
        // x86-64: uc_flags, uc_link, uc_stack (24 bytes), then mcontext.
        assert_eq!(UC_GREGS, 40);
        assert_eq!((REG_R8, REG_EFL), (0, 17));
        assert_eq!((REG_ERR, REG_TRAPNO, REG_CR2), (19, 20, 22));
    }
}
