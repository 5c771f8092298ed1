//! The agent: machine code vkrun copies into a guest process so that a
//! thread of vkrun's making can run system calls in the guest's mm (the
//! mmaps that install VPAGETABLE translations) without stopping any guest
//! thread. Driven through a control page shared with the supervisor.
//!
//! Layout of the control page (all little-endian):
//! - `0x00` `req: u32`, futex: the supervisor bumps it to post a batch;
//! - `0x3000` (response page) `done: u32`, futex: the agent sets it to `req`
//!   when the batch ran; `0x3040` one `i64` result per operation;
//! - `0x08` `count: u32`: operations in the batch;
//! - `0x10` `sigset: u64`: all ones (the agent blocks every signal);
//! - `0x40` operations, 64 bytes each: `nr, a0..a5`.
//!
//! Code page: `clone` gadget at offset 0 (the parent traps with `int3`, the
//! child jumps into the loop); the loop, starting from `done`, waits on `req`
//! (`FUTEX_WAIT`, shared:
//! the page is a `MAP_SHARED` memfd mapping), runs the batch, publishes
//! `done` and wakes it. It keeps no state in memory but `r14` (last request)
//! and `r15` (the control page), and uses no stack.
//!
//! The **resolver** (second gadget, at [`resolver_gadget`] in the code page)
//! is the fast path of VPAGETABLE faults, run by a second agent thread: it
//! reads the guest's userfaultfd, walks the plain 4-level case of the VPTEs
//! (A/M by `lock cmpxchg`, exactly as the `vpte` walker does), installs the
//! page with one `mmap` of RAM and wakes the faulting thread, all without
//! leaving the guest process. Anything else (superpages, failed walks,
//! neighbours that a prefault run could batch, a full ring, an exhausted VMA
//! budget, fast path disabled) is forwarded to the supervisor through a ring
//! in the resolver page. Several resolver threads may serve one uffd (one
//! per CPU, so that a fault is resolved on the CPU that took it): each
//! keeps its message, the page and the wake range in 64 bytes of its own
//! stack, and takes the lock for everything shared (the rings, the budget,
//! the counter), forwarding included; it waits for room in a full forward
//! ring without the lock. Layout of the resolver page (`r15` in the
//! resolver):
//! - `0x000 lock: u32`: futex mutex shared with the supervisor (0 free,
//!   1 held, 2 held with waiters), held across walk and install;
//! - `0x004 enabled: u32`, `0x008 ram_base`, `0x010 ram_size`, `0x018 ram_fd`,
//!   `0x020 uffd` (u64 each);
//! - `0x028 fwd_head`, `0x02c fwd_tail`, `0x030 ins_head`, `0x034 ins_tail`
//!   (u32, heads written by the resolver, tails by the supervisor);
//! - `0x038 budget: u32` installs left, `0x03c nwin: u32` windows in the table;
//! - `0x040 resolved: u64`, `0x048 sup_wake: u32` (futex the supervisor
//!   sleeps on), `0x050 sigset: u64`;
//! - `0x060` window table: [`RES_MAX_WINDOWS`] × `{start, end, off, master}`;
//! - `0x400` forward ring: [`RES_FWD_SLOTS`] raw `uffd_msg`s (32 bytes);
//! - `0x800` install ring: [`RES_INS_SLOTS`] × `{va, len}`.

use std::arch::global_asm;

/// Offset of `req` in the control page.
pub const CTL_REQ: usize = 0x00;
/// Offset of the response page (the agent's writes: `done`, then one
/// result per operation). Apart from the control page, which a vmspace's
/// stub maps read-only: user code there cannot forge requests.
pub const CTL_RESP: usize = 0x3000;
/// Offset of `done`.
pub const CTL_DONE: usize = CTL_RESP;
/// Offset of the first operation's result (`i64` each).
pub const CTL_RET: usize = CTL_RESP + 0x40;
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

/// Resolver page: the lock word.
pub const RES_LOCK: usize = 0x000;
/// Resolver page: fast path enabled.
pub const RES_ENABLED: usize = 0x004;
/// Resolver page: guest address of the resolver's RAM mapping.
pub const RES_RAM_BASE: usize = 0x008;
/// Resolver page: RAM size.
pub const RES_RAM_SIZE: usize = 0x010;
/// Resolver page: the guest's RAM descriptor for installs.
pub const RES_RAM_FD: usize = 0x018;
/// Resolver page: the guest's userfaultfd descriptor.
pub const RES_UFFD: usize = 0x020;
/// Resolver page: forward ring head (resolver) and tail (supervisor).
pub const RES_FWD_HEAD: usize = 0x028;
/// See [`RES_FWD_HEAD`].
pub const RES_FWD_TAIL: usize = 0x02c;
/// Resolver page: install ring head (resolver) and tail (supervisor).
pub const RES_INS_HEAD: usize = 0x030;
/// See [`RES_INS_HEAD`].
pub const RES_INS_TAIL: usize = 0x034;
/// Resolver page: installs the resolver may still make.
pub const RES_BUDGET: usize = 0x038;
/// Resolver page: windows in the table.
pub const RES_NWIN: usize = 0x03c;
/// Resolver page: faults resolved by the resolver.
pub const RES_RESOLVED: usize = 0x040;
/// Resolver page: the futex word the supervisor waits on.
pub const RES_SUP_WAKE: usize = 0x048;
/// Resolver page: all-ones signal set.
pub const RES_SIGSET: usize = 0x050;
/// Resolver page: the window table.
pub const RES_WINDOWS: usize = 0x060;
/// Windows the table holds (the others are served by the supervisor).
pub const RES_MAX_WINDOWS: usize = (0x300 - RES_WINDOWS) / 32;
/// Resolver page: the forward ring.
pub const RES_FWD_RING: usize = 0x400;
/// Forward ring slots.
pub const RES_FWD_SLOTS: u32 = 32;
/// Resolver page: the install ring.
pub const RES_INS_RING: usize = 0x800;
/// Install ring slots.
pub const RES_INS_SLOTS: u32 = 128;

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
    // Start from the last *completed* request: one posted before this
    // thread first ran is then still seen as pending.
    "mov r14d, dword ptr [r15 + {resp}]",
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
    "lea r12, [r15 + {resp} + 0x40]",
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
    "mov qword ptr [r12], rax",
    "add rbx, 64",
    "add r12, 8",
    "dec r13d",
    "jmp 4b",
    "5:",
    "mov dword ptr [r15 + {resp}], r14d",
    // futex(&done, FUTEX_WAKE, 1)
    "mov eax, 202",
    "lea rdi, [r15 + {resp}]",
    "mov esi, 1",
    "mov edx, 1",
    "syscall",
    "jmp 3b",
    // ---- a plain system call for injection at any stop ----
    ".globl vkrun_syscall_gadget",
    ".hidden vkrun_syscall_gadget",
    "vkrun_syscall_gadget:",
    "syscall",
    "int3",
    // ---- resolver: its clone gadget ----
    ".p2align 4",
    ".globl vkrun_resolver_gadget",
    ".hidden vkrun_resolver_gadget",
    "vkrun_resolver_gadget:",
    "syscall",
    "test rax, rax",
    "jz 20f",
    "int3",
    "20:",
    // block every signal
    "mov eax, 14",
    "mov edi, 2",
    "lea rsi, [r15 + 0x50]",
    "xor edx, edx",
    "mov r10d, 8",
    "syscall",
    // this resolver's own state, on its own stack (several resolvers share
    // the page): the message at [rsp], the wake range at [rsp + 0x20], the
    // faulting page at [rsp + 0x30]
    "sub rsp, 64",
    // ---- read one uffd message ----
    "21:",
    "xor eax, eax",
    "mov rdi, qword ptr [r15 + 0x20]",
    "mov rsi, rsp",
    "mov edx, 32",
    "syscall",
    "cmp rax, 32",
    "je 22f",
    "cmp rax, -4",
    "je 21b",
    "cmp rax, -11",
    "je 21b",
    // the uffd is gone (mm exited): end the thread
    "mov eax, 60",
    "xor edi, edi",
    "syscall",
    "22:",
    // ---- take the lock (the rings, budget and counters are shared) ----
    "call 72f",
    "cmp byte ptr [rsp], 0x12",
    "jne 59f",
    "cmp dword ptr [r15 + 4], 0",
    "je 59f",
    "mov rbp, qword ptr [r15 + 0x08]",
    "mov rbx, qword ptr [r15 + 0x10]",
    "mov r8, qword ptr [rsp + 0x10]",
    "and r8, -4096",
    "mov qword ptr [rsp + 0x30], r8",
    // find the window
    "mov r9d, dword ptr [r15 + 0x3c]",
    "lea r10, [r15 + 0x60]",
    "25:",
    "test r9d, r9d",
    "jz 59f",
    "cmp r8, qword ptr [r10]",
    "jb 26f",
    "cmp r8, qword ptr [r10 + 8]",
    "jae 26f",
    "jmp 27f",
    "26:",
    "add r10, 32",
    "dec r9d",
    "jmp 25b",
    "27:",
    // pindex = (page - start + off) >> 12
    "mov r11, r8",
    "sub r11, qword ptr [r10]",
    "add r11, qword ptr [r10 + 16]",
    "jc 59f",
    "shr r11, 12",
    "mov rdx, qword ptr [r10 + 24]",
    // write access?
    "mov r13, qword ptr [rsp + 0x08]",
    "and r13d, 1",
    // need = V | (write ? RW : 0); upd = A | (write ? M : 0)
    "mov r14d, 1",
    "mov esi, 0x20",
    "test r13d, r13d",
    "jz 28f",
    "or r14d, 2",
    "or esi, 0x40",
    "28:",
    // master: needs its bits, no PS (superpages take the slow path)
    "mov rax, rdx",
    "and rax, r14",
    "cmp rax, r14",
    "jne 59f",
    "test edx, 0x80",
    "jnz 59f",
    "mov rdi, rdx",
    "and edi, 2",
    "mov r9, rdx",
    "shr r9, 63",
    "mov ecx, 36",
    // ---- one level: rdx = entry pointing at the next table ----
    "30:",
    "mov r12, 0x000FFFFFFFFFF000",
    "and r12, rdx",
    "lea rax, [r12 + 4096]",
    "cmp rax, rbx",
    "ja 59f",
    "sub ecx, 9",
    "mov r10, r11",
    "shr r10, cl",
    "and r10d, 511",
    "lea r10, [r12 + r10 * 8]",
    "mov rax, qword ptr [rbp + r10]",
    "31:",
    // the entry's own checks
    "mov r12, rax",
    "and r12, r14",
    "cmp r12, r14",
    "jne 59f",
    "test ecx, ecx",
    "jz 32f",
    // an inner entry: no PS; its table inside RAM
    "test eax, 0x80",
    "jnz 59f",
    "mov r12, 0x000FFFFFFFFFF000",
    "and r12, rax",
    "add r12, 4096",
    "cmp r12, rbx",
    "ja 59f",
    "jmp 33f",
    "32:",
    // the leaf: its page inside RAM
    "mov r12, 0x000FFFFFFFFFF000",
    "and r12, rax",
    "add r12, 4096",
    "cmp r12, rbx",
    "ja 59f",
    "33:",
    // set A (and M) by compare-and-swap, re-checking a changed entry
    "mov r12, rax",
    "or r12, rsi",
    "cmp r12, rax",
    "je 34f",
    "lock cmpxchg qword ptr [rbp + r10], r12",
    "jne 31b",
    "mov rax, r12",
    "34:",
    "mov r12, rax",
    "and r12d, 2",
    "and edi, r12d",
    "mov r12, rax",
    "shr r12, 63",
    "or r9, r12",
    "mov rdx, rax",
    "test ecx, ecx",
    "jnz 30b",
    // ---- leaf in rdx, its entry at rbp+r10 ----
    // a neighbour with V|A whose frame continues this one could join a
    // prefault run: the slow path batches those
    "mov rax, 0x000FFFFFFFFFF000",
    "and rax, rdx",
    "mov r12, r10",
    "and r12, 4095",
    "jz 35f",
    "mov r8, qword ptr [rbp + r10 - 8]",
    "mov ecx, r8d",
    "and ecx, 0x21",
    "cmp ecx, 0x21",
    "jne 35f",
    "mov rcx, 0x000FFFFFFFFFF000",
    "and rcx, r8",
    "add rcx, 4096",
    "cmp rcx, rax",
    "je 59f",
    "35:",
    "cmp r12, 4088",
    "je 36f",
    "mov r8, qword ptr [rbp + r10 + 8]",
    "mov ecx, r8d",
    "and ecx, 0x21",
    "cmp ecx, 0x21",
    "jne 36f",
    "mov rcx, 0x000FFFFFFFFFF000",
    "and rcx, r8",
    "sub rcx, 4096",
    "cmp rcx, rax",
    "je 59f",
    "36:",
    // room in the VMA budget and the install ring?
    "cmp dword ptr [r15 + 0x38], 0",
    "je 59f",
    "mov eax, dword ptr [r15 + 0x30]",
    "sub eax, dword ptr [r15 + 0x34]",
    "cmp eax, 128",
    "jae 59f",
    // prot = R | W (all RW and (M or write)) | X (no NX)
    "mov r10d, 1",
    "test edi, edi",
    "jz 37f",
    "test edx, 0x40",
    "jnz 38f",
    "test r13d, r13d",
    "jz 37f",
    "38:",
    "or r10d, 2",
    "37:",
    "test r9, r9",
    "jnz 39f",
    "or r10d, 4",
    "39:",
    // mmap(page, 4096, prot, MAP_SHARED|MAP_FIXED|(write ? MAP_POPULATE : 0), ram_fd, pa)
    "mov eax, 9",
    "mov rdi, qword ptr [rsp + 0x30]",
    "mov esi, 4096",
    "mov r12, rdx",
    "mov rdx, r10",
    "mov r10d, 0x11",
    "test r13d, r13d",
    "jz 40f",
    "or r10d, 0x8000",
    "40:",
    "mov r8, qword ptr [r15 + 0x18]",
    "mov r9, 0x000FFFFFFFFFF000",
    "and r9, r12",
    "syscall",
    "cmp rax, -4096",
    "ja 59f",
    // record the install, spend budget, count
    "mov eax, dword ptr [r15 + 0x30]",
    "mov ecx, eax",
    "and ecx, 127",
    "shl ecx, 4",
    "mov rdi, qword ptr [rsp + 0x30]",
    "mov qword ptr [r15 + rcx + 0x800], rdi",
    "mov qword ptr [r15 + rcx + 0x808], 4096",
    "inc eax",
    "mov dword ptr [r15 + 0x30], eax",
    "dec dword ptr [r15 + 0x38]",
    "inc qword ptr [r15 + 0x40]",
    // unlock, then wake the faulting thread
    "call 70f",
    "mov rax, qword ptr [rsp + 0x30]",
    "mov qword ptr [rsp + 0x20], rax",
    "mov qword ptr [rsp + 0x28], 4096",
    "mov eax, 16",
    "mov rdi, qword ptr [r15 + 0x20]",
    "mov esi, 0x8010AA02",
    "lea rdx, [rsp + 0x20]",
    "syscall",
    "jmp 21b",
    // ---- forward to the supervisor (holding the lock: the ring's head
    // is shared by every resolver) ----
    "59:",
    "mov eax, dword ptr [r15 + 0x28]",
    "mov ecx, eax",
    "sub ecx, dword ptr [r15 + 0x2c]",
    "cmp ecx, 32",
    "jb 61f",
    // ring full: wait for the supervisor to take some, without the lock
    // (it may need the lock to serve what it took)
    "mov r12d, dword ptr [r15 + 0x2c]",
    "call 70f",
    "mov eax, 202",
    "lea rdi, [r15 + 0x2c]",
    "xor esi, esi",
    "mov edx, r12d",
    "xor r10d, r10d",
    "syscall",
    "call 72f",
    "jmp 59b",
    "61:",
    "mov ecx, eax",
    "and ecx, 31",
    "shl ecx, 5",
    "movdqu xmm0, xmmword ptr [rsp]",
    "movdqu xmm1, xmmword ptr [rsp + 0x10]",
    "movdqu xmmword ptr [r15 + rcx + 0x400], xmm0",
    "movdqu xmmword ptr [r15 + rcx + 0x410], xmm1",
    "inc eax",
    "mov dword ptr [r15 + 0x28], eax",
    "lock inc dword ptr [r15 + 0x48]",
    "call 70f",
    "mov eax, 202",
    "lea rdi, [r15 + 0x48]",
    "mov esi, 1",
    "mov edx, 1",
    "syscall",
    "jmp 21b",
    // ---- lock (a call, on the resolver's stack) ----
    "72:",
    "xor eax, eax",
    "mov ecx, 1",
    "lock cmpxchg dword ptr [r15], ecx",
    "je 74f",
    "73:",
    "mov ecx, 2",
    "xchg ecx, dword ptr [r15]",
    "test ecx, ecx",
    "je 74f",
    "mov eax, 202",
    "mov rdi, r15",
    "xor esi, esi",
    "mov edx, 2",
    "xor r10d, r10d",
    "syscall",
    "jmp 73b",
    "74:",
    "ret",
    // ---- unlock (a call: the only stack use, on the agent's stack) ----
    "70:",
    "xor eax, eax",
    "xchg eax, dword ptr [r15]",
    "cmp eax, 2",
    "jne 71f",
    "mov eax, 202",
    "mov rdi, r15",
    "mov esi, 1",
    "mov edx, 1",
    "syscall",
    "71:",
    "ret",
    ".globl vkrun_agent_code_end",
    ".hidden vkrun_agent_code_end",
    "vkrun_agent_code_end:",
    ".popsection",
    resp = const CTL_RESP,
);

unsafe extern "C" {
    static vkrun_agent_code_start: u8;
    static vkrun_resolver_gadget: u8;
    static vkrun_syscall_gadget: u8;
    static vkrun_agent_code_end: u8;
}

/// Offset in the code page of `syscall; int3`.
pub fn syscall_gadget() -> usize {
    let start = &raw const vkrun_agent_code_start;
    let gadget = &raw const vkrun_syscall_gadget;
    gadget as usize - start as usize
}

/// Offset in the code page of the resolver's `clone` gadget.
pub fn resolver_gadget() -> usize {
    let start = &raw const vkrun_agent_code_start;
    let gadget = &raw const vkrun_resolver_gadget;
    gadget as usize - start as usize
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
        let r = super::resolver_gadget();
        assert!(r > 0 && r < code.len());
        assert_eq!(
            &code[r..r + 2],
            &[0x0f, 0x05],
            "the resolver's gadget starts with syscall"
        );
    }
}

/// The system calls the agent of a vmspace stub may make once set up: those
/// that edit its own mm and serve its userfaultfd. The agent's control page
/// lies in the stub, where the vmspace's user code can write it; this
/// filter (on the agent threads) keeps forged requests from reaching
/// anything else on the host (`EPERM`).
pub fn vmspace_agent_filter() -> Vec<libc::sock_filter> {
    use crate::sys::abi::AUDIT_ARCH_X86_64;
    use crate::sys::seccomp::{JEQ_K, LD_W_ABS, RET_K, jump, stmt};
    let allowed = [
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_ioctl,
        libc::SYS_futex,
        libc::SYS_read,
        libc::SYS_close,
        libc::SYS_rt_sigprocmask,
        libc::SYS_exit,
    ];
    let n = allowed.len();
    let mut f = vec![
        stmt(LD_W_ABS, 4),
        // not x86-64: deny (jump over the list to the EPERM return)
        jump(JEQ_K, AUDIT_ARCH_X86_64, 0, (n + 1) as u8),
        stmt(LD_W_ABS, 0),
    ];
    for (i, nr) in allowed.iter().enumerate() {
        // match: jump to the ALLOW after the EPERM return
        f.push(jump(JEQ_K, *nr as u32, (n - i) as u8, 0));
    }
    f.push(stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    f.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    f
}

#[cfg(test)]
mod filter_tests {
    #[test]
    fn the_vmspace_agent_filter_is_well_formed() {
        let f = super::vmspace_agent_filter();
        let n = f.len();
        // every jump lands inside the program, on a return
        for (i, insn) in f.iter().enumerate() {
            if insn.code == crate::sys::seccomp::JEQ_K {
                for off in [insn.jt, insn.jf] {
                    let to = i + 1 + off as usize;
                    assert!(to < n, "jump {i} out of range");
                }
                let allow = i + 1 + insn.jt as usize;
                if i > 1 {
                    assert_eq!(allow, n - 1, "a listed call allows");
                }
            }
        }
        assert_eq!(f[n - 1].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(f[n - 2].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    }
}
