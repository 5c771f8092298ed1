//! The user programs the vkernel runs in its vmspace, as byte blobs.
//!
//! They are written in assembly in `user.s` (shared with the C twin,
//! `guest-samples/c/vmspace_demo.c`; see that file's header for the
//! conventions: position independent, arguments in `rdi`/`rsi`, stack top in
//! `rsp`, Linux system call numbers). Each blob lives between a start and an
//! end symbol in a read-only section of this binary; the vkernel copies its
//! bytes into guest RAM frames and maps them in the vmspace, and never runs
//! them where they are.

use std::arch::global_asm;

global_asm!(include_str!("user.s"), options(raw, att_syntax));

// The blob boundaries defined in user.s. Only their addresses are used.
unsafe extern "C" {
    static vmspace_user_demo_start: u8;
    static vmspace_user_demo_end: u8;
    static vmspace_user_syscall_loop_start: u8;
    static vmspace_user_syscall_loop_end: u8;
    static vmspace_user_touch_start: u8;
    static vmspace_user_touch_end: u8;
}

/// Linux's `write` system call number, as the user programs use it.
pub const SYS_WRITE: u64 = 1;
/// Linux's `getpid`.
pub const SYS_GETPID: u64 = 39;
/// Linux's `exit`.
pub const SYS_EXIT: u64 = 60;
/// Linux's `exit_group` (served like `exit`: the user process has one thread).
pub const SYS_EXIT_GROUP: u64 = 231;

/// One of the user programs of `user.s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `demo(heap)`: a sieve, a Fibonacci table and a deep recursion over
    /// demand-paged heap and stack; prints three lines and exits 0.
    Demo,
    /// `syscall_loop(n)`: a marker `getpid`, then `n` more; exits 0 (1 if
    /// an answer differs from the first).
    SyscallLoop,
    /// `touch(base, n)`: a marker `getpid`, then a store of `i` into the
    /// first word of page `i` of `base` for `i` in `0..n`; exits 0.
    Touch,
}

impl Program {
    /// The program's machine code; the entry point is its first byte.
    pub fn code(self) -> &'static [u8] {
        let (start, end) = match self {
            Program::Demo => (
                &raw const vmspace_user_demo_start,
                &raw const vmspace_user_demo_end,
            ),
            Program::SyscallLoop => (
                &raw const vmspace_user_syscall_loop_start,
                &raw const vmspace_user_syscall_loop_end,
            ),
            Program::Touch => (
                &raw const vmspace_user_touch_start,
                &raw const vmspace_user_touch_end,
            ),
        };
        let len = (end as usize)
            .checked_sub(start as usize)
            .expect("user.s puts each end symbol after its start symbol");
        // SAFETY: user.s defines both symbols in one allocated, read-only
        // section (.rodata.vmspace_user), the end after the start, with the
        // blob's bytes between them; the linker keeps the section whole and
        // nothing writes it, so the bytes are initialised and immutable for
        // the life of the program.
        unsafe { std::slice::from_raw_parts(start, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_small_and_end_in_their_last_instruction() {
        for p in [Program::Demo, Program::SyscallLoop, Program::Touch] {
            let code = p.code();
            assert!(!code.is_empty() && code.len() < 4096, "{p:?}");
        }
        // The demo's strings are at its end: the last one is NUL-terminated.
        assert!(Program::Demo.code().ends_with(b") by recursion: \0"));
        // The loops end in `syscall; ud2` (0f 05 0f 0b).
        for p in [Program::SyscallLoop, Program::Touch] {
            assert!(p.code().ends_with(&[0x0f, 0x05, 0x0f, 0x0b]), "{p:?}");
        }
    }
}
