//! The agent: machine code vkrun copies into a guest process so that a
//! thread of vkrun's making can run system calls in the guest's mm (the
//! mmaps that install VPAGETABLE translations) without stopping any guest
//! thread. Driven through a control page shared with the supervisor.
//!
//! Layout of the control page (all little-endian):
//! - `0x00` `req: u32`, futex: the supervisor bumps it to post a batch;
//! - `0x04` `done: u32`, futex: the agent sets it to `req` when the batch ran;
//! - `0x08` `count: u32`: operations in the batch;
//! - `0x10` `sigset: u64`: all ones (the agent blocks every signal);
//! - `0x40` operations, 64 bytes each: `nr, a0..a5` in, `ret` out.
//!
//! Code page: `clone` gadget at offset 0 (the parent traps with `int3`, the
//! child jumps into the loop); the loop waits on `req` (`FUTEX_WAIT`, shared:
//! the page is a `MAP_SHARED` memfd mapping), runs the batch, publishes
//! `done` and wakes it. It keeps no state in memory but `r14` (last request)
//! and `r15` (the control page), and uses no stack.

use std::arch::global_asm;

/// Offset of `req` in the control page.
pub const CTL_REQ: usize = 0x00;
/// Offset of `done`.
pub const CTL_DONE: usize = 0x04;
/// Offset of `count`.
pub const CTL_COUNT: usize = 0x08;
/// Offset of the all-ones signal set.
pub const CTL_SIGSET: usize = 0x10;
/// Offset of the first operation.
pub const CTL_OPS: usize = 0x40;
/// Size of one operation.
pub const OP_SIZE: usize = 64;
/// Operations per batch.
pub const MAX_OPS: usize = (4096 - CTL_OPS) / OP_SIZE;

global_asm!(
    ".pushsection .text.vkrun_agent,\"ax\",@progbits",
    ".p2align 4",
    ".globl vkrun_agent_code_start",
    ".hidden vkrun_agent_code_start",
    "vkrun_agent_code_start:",
    // clone gadget: r15 = control page; the parent returns the child's tid.
    "syscall",
    "test rax, rax",
    "jz 2f",
    "int3",
    "2:",
    // rt_sigprocmask(SIG_SETMASK, &sigset, NULL, 8)
    "mov eax, 14",
    "mov edi, 2",
    "lea rsi, [r15 + 0x10]",
    "xor edx, edx",
    "mov r10d, 8",
    "syscall",
    "mov r14d, dword ptr [r15]",
    "3:",
    // futex(&req, FUTEX_WAIT, r14d, NULL)
    "mov eax, 202",
    "mov rdi, r15",
    "xor esi, esi",
    "mov edx, r14d",
    "xor r10d, r10d",
    "syscall",
    "mov eax, dword ptr [r15]",
    "cmp eax, r14d",
    "je 3b",
    "mov r14d, eax",
    "mov r13d, dword ptr [r15 + 8]",
    "lea rbx, [r15 + 0x40]",
    "4:",
    "test r13d, r13d",
    "jz 5f",
    "mov rax, qword ptr [rbx]",
    "mov rdi, qword ptr [rbx + 8]",
    "mov rsi, qword ptr [rbx + 16]",
    "mov rdx, qword ptr [rbx + 24]",
    "mov r10, qword ptr [rbx + 32]",
    "mov r8, qword ptr [rbx + 40]",
    "mov r9, qword ptr [rbx + 48]",
    "syscall",
    "mov qword ptr [rbx + 56], rax",
    "add rbx, 64",
    "dec r13d",
    "jmp 4b",
    "5:",
    "mov dword ptr [r15 + 4], r14d",
    // futex(&done, FUTEX_WAKE, 1)
    "mov eax, 202",
    "lea rdi, [r15 + 4]",
    "mov esi, 1",
    "mov edx, 1",
    "syscall",
    "jmp 3b",
    ".globl vkrun_agent_code_end",
    ".hidden vkrun_agent_code_end",
    "vkrun_agent_code_end:",
    ".popsection",
);

unsafe extern "C" {
    static vkrun_agent_code_start: u8;
    static vkrun_agent_code_end: u8;
}

/// The agent's machine code, to be copied to the start of the code page.
pub fn code() -> &'static [u8] {
    let start = &raw const vkrun_agent_code_start;
    let end = &raw const vkrun_agent_code_end;
    let len = end as usize - start as usize;
    // SAFETY: both symbols delimit the assembled block above in our own
    // read-only text, which lives for the whole program.
    unsafe { std::slice::from_raw_parts(start, len) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_code_starts_with_the_clone_gadget() {
        let code = super::code();
        assert_eq!(&code[..2], &[0x0f, 0x05], "syscall");
        assert!(code.len() > 64 && code.len() < 4096, "{}", code.len());
        assert!(code.contains(&0xcc), "int3 for the parent");
    }
}
