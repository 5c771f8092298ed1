//! vmspace stubs: host processes with an (almost) empty address space of
//! vkrun's own making, one per vmspace (ABI section 7).
//!
//! A stub is forked from the tracer thread. The child runs only raw system
//! calls: it waits until the tracer has seized it, leaves vkrun's session,
//! blocks every signal, closes every descriptor, and jumps into its region,
//! mapped by the parent at [`STUB_BASE`] (above `USER_MAX`, the ABI's
//! reserved 2 MiB) just for the fork. From there it unmaps everything below
//! `USER_MAX` and stops on `int3`: `[0, USER_MAX)` belongs to the vkernel.
//!
//! The same region holds the stub's execution contexts (see the code block
//! below and [`crate::run`]): threads that run guest user code with every
//! system call trapped, and report each trap through their block.

use std::arch::global_asm;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::USER_MAX;

/// Where a stub's region lives (in the stub; in vkrun only during a fork).
pub const STUB_BASE: u64 = USER_MAX + 0x10000;
/// The region: header (code, main stack, read-only data) and the execution
/// contexts. It ends below the agent's region (`USER_MAX + 0x100000`).
pub const STUB_LEN: u64 = 0xF0000;
/// Header: the code (two pages).
pub const CODE: u64 = 0;
/// Header: top of the main thread's stack.
pub const MAIN_STACK_TOP: u64 = 0x3000;
/// Header: the data page (`sock_fprog`, `sigaction`, signal set, scratch
/// path, filter program). Read-only in the stub.
pub const DATA: u64 = 0x3000;
/// Data page: `struct sock_fprog` of the context filter.
pub const DATA_FPROG: u64 = DATA;
/// Data page: `struct kernel_sigaction` of the context handler.
pub const DATA_SIGACTION: u64 = DATA + 0x10;
/// Data page: the signals a context unblocks.
pub const DATA_UNBLOCK: u64 = DATA + 0x30;
/// Data page: a NUL-terminated path for `open` (the RAM memfd).
pub const DATA_PATH: u64 = DATA + 0x40;
/// Data page: length of the path scratch.
pub const DATA_PATH_LEN: u64 = 0x1C0;
/// Data page: the filter's instructions.
pub const DATA_FILTER: u64 = DATA + 0x200;
/// First execution context.
pub const CONTEXTS: u64 = 0x10000;
/// One execution context: its control block and signal stack.
pub const CTX_SIZE: u64 = 0x4000;
/// Execution contexts a stub holds.
pub const MAX_CONTEXTS: usize = ((STUB_LEN - CONTEXTS) / CTX_SIZE) as usize;

/// Context block (offsets from its base, all little-endian):
/// `state` (futex the context sleeps on between runs).
pub const CX_STATE: usize = 0x000;
/// Reports made (futex vkrun sleeps on).
pub const CX_SEQ: usize = 0x004;
/// Non-zero while vkrun wants the running user code interrupted.
pub const CX_KICK: usize = 0x008;
/// The report: signal number (`u32::MAX`: the context failed to start,
/// `CX_ADDR` holds the error).
pub const CX_SIG: usize = 0x010;
/// The report: `si_code`.
pub const CX_CODE: usize = 0x014;
/// The report: `si_addr` (or `si_call_addr` of `SIGSYS`).
pub const CX_ADDR: usize = 0x018;
/// The report: `si_syscall` (low half) and `si_arch` (high half) of `SIGSYS`.
pub const CX_SYSCALL: usize = 0x020;
/// FS and GS bases at the report.
pub const CX_FS_OUT: usize = 0x028;
/// See [`CX_FS_OUT`].
pub const CX_GS_OUT: usize = 0x030;
/// FS and GS bases to run with.
pub const CX_FS_IN: usize = 0x038;
/// See [`CX_FS_IN`].
pub const CX_GS_IN: usize = 0x040;
/// The context's `stack_t` for `sigaltstack`.
pub const CX_ALTSTACK: usize = 0x048;
/// Registers to run with, in `ucontext` `gregs` order (`REG_R8` ..
/// `REG_EFL`: [`GREGS_IN`] of them).
pub const CX_IN: usize = 0x100;
/// Registers at the report, all 23 `gregs` (with `REG_ERR`, `REG_TRAPNO`,
/// `REG_CR2`).
pub const CX_OUT: usize = 0x200;
/// The block's words for the fast RUN and the report by
/// notification (defined once in `vkabi::fastrun`, which the guest
/// libraries implement: see there).
pub use vkabi::fastrun::{
    CX_BUSY, CX_CTX_TID, CX_KICK_AT, CX_LISTENER, CX_MASK_HELD, CX_N_PAGEFAULT, CX_N_RUNS,
    CX_N_SIGNAL, CX_N_SYSCALL, CX_N_TRAP, CX_NOTIF, CX_NOTIF_ID, CX_OPEN, CX_RECV_LOCK,
    CX_SAVED_MASK, CX_STUB_PID,
};
/// [`CX_OPEN`] while the fast path is offered.
pub const FAST_OPEN: u32 = vkabi::fastrun::OPEN_MAGIC;
/// The stack a context starts on (below its signal stack).
pub const CX_ENTRY_STACK: u64 = 0xF00;
/// The signal stack: from here to the block's end.
pub const CX_SIGSTACK: u64 = 0x1000;

/// `state`: the context sleeps in its handler (a report is available).
pub const STATE_WAIT: u32 = 0;
/// `state`: vkrun posted registers; run them.
pub const STATE_GO: u32 = 1;
/// `state`: the user code runs.
pub const STATE_RUNNING: u32 = 2;
/// `state`: end the context's thread.
pub const STATE_EXIT: u32 = 3;

/// `gregs` indices (`<sys/ucontext.h>`), defined once in [`super::abi`].
pub use super::abi::{
    REG_CR2, REG_EFL, REG_ERR, REG_R8, REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14,
    REG_R15, REG_RAX, REG_RBP, REG_RBX, REG_RCX, REG_RDI, REG_RDX, REG_RIP, REG_RSI, REG_RSP,
    REG_TRAPNO,
};
/// Registers vkrun sets for a run (`REG_R8` ..= `REG_EFL`).
pub const GREGS_IN: usize = 18;
/// All `gregs`.
pub const GREGS: usize = 23;

/// `SA_RESTORER` (x86-64 `<asm/signal.h>`).
const SA_RESTORER: u64 = 0x0400_0000;

/// The signal vkrun sends a context to interrupt its user code.
pub const KICK_SIGNAL: i32 = libc::SIGURG;
/// The signals a context handles: every synchronous trap, `SIGSYS` from its
/// filter, and the kick.
pub const CONTEXT_SIGNALS: [i32; 7] = [
    libc::SIGSYS,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGFPE,
    KICK_SIGNAL,
];

// The stub's code. The main thread enters at the start (from the forked
// child, on the main stack), unmaps everything below USER_MAX, makes the
// header read-only and stops on `int3` for good: vkrun drives it by
// ptrace through the gadgets.
//
// An execution context is a thread cloned at `clone_gadget` with r15 = its
// block (CLONE_UNTRACED: its signals reach its handler, not vkrun). It
// installs its signal stack and handler, unblocks its signals, installs the
// context filter (every system call traps with SIGSYS except futex
// WAIT/WAKE, rt_sigreturn and exit made from `handler_syscall`), and traps
// once to report that it is ready. From then on it lives in its handler:
// each signal writes the interrupted registers to the block, bumps `seq`
// and wakes vkrun, sleeps until vkrun posts new registers (`STATE_GO`),
// loads them into the signal frame and returns through `rt_sigreturn` into
// the user code. The FPU state stays in the frame between runs: it is the
// context's own.
global_asm!(
    ".pushsection .text.vkrun_stub,\"ax\",@progbits",
    ".p2align 4",
    ".globl vkrun_stub_code_start",
    ".hidden vkrun_stub_code_start",
    "vkrun_stub_code_start:",
    // munmap(0, USER_MAX): nothing of vkrun stays below USER_MAX
    "mov eax, 11",
    "xor edi, edi",
    "mov rsi, {user_max}",
    "syscall",
    // mprotect(header, DATA + 4096, PROT_READ | PROT_EXEC)
    "mov eax, 10",
    "mov rdi, {base}",
    "mov esi, {header_len}",
    "mov edx, 5",
    "syscall",
    "2:",
    "int3",
    "jmp 2b",
    // syscall gadget: vkrun runs system calls in the main thread here
    ".globl vkrun_stub_syscall_gadget",
    ".hidden vkrun_stub_syscall_gadget",
    "vkrun_stub_syscall_gadget:",
    "syscall",
    "int3",
    // clone gadget: the parent traps, the child becomes a context
    ".globl vkrun_stub_clone_gadget",
    ".hidden vkrun_stub_clone_gadget",
    "vkrun_stub_clone_gadget:",
    "syscall",
    "test rax, rax",
    "jz 3f",
    "int3",
    "3:",
    // sigaltstack(&block.altstack, NULL)
    "lea rdi, [r15 + {cx_altstack}]",
    "xor esi, esi",
    "mov eax, 131",
    "syscall",
    // rt_sigaction(sig, &data.sigaction, NULL, 8) for each signal
    "mov r14, {data}",
    "lea rbx, [rip + 7f]",
    "4:",
    "movzx edi, byte ptr [rbx]",
    "test edi, edi",
    "jz 5f",
    "lea rsi, [r14 + {d_sigaction}]",
    "xor edx, edx",
    "mov r10d, 8",
    "mov eax, 13",
    "syscall",
    "test rax, rax",
    "jnz 6f",
    "inc rbx",
    "jmp 4b",
    "5:",
    // rt_sigprocmask(SIG_UNBLOCK, &data.unblock, NULL, 8)
    "mov edi, 1",
    "lea rsi, [r14 + {d_unblock}]",
    "xor edx, edx",
    "mov r10d, 8",
    "mov eax, 14",
    "syscall",
    // prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    "mov edi, 38",
    "mov esi, 1",
    "xor edx, edx",
    "xor r10d, r10d",
    "xor r8d, r8d",
    "mov eax, 157",
    "syscall",
    // seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER, &data.fprog): the
    // listener is how the context reports; without one (an older kernel),
    // it reports by futex
    "mov edi, 1",
    "mov esi, 8",
    "lea rdx, [r14 + {d_fprog}]",
    "mov eax, 317",
    "syscall",
    "test rax, rax",
    "js 8f",
    "mov [r15 + {cx_listener}], eax",
    "mov dword ptr [r15 + {cx_notif}], 1",
    "jmp 9f",
    "8:",
    "mov edi, 1",
    "xor esi, esi",
    "lea rdx, [r14 + {d_fprog}]",
    "mov eax, 317",
    "syscall",
    "test rax, rax",
    "jnz 6f",
    "9:",
    // ready: any system call made here traps into the handler
    "mov eax, 39",
    "syscall",
    "ud2",
    // set-up failed: report the error, end the thread
    "6:",
    "mov [r15 + {cx_addr}], rax",
    "mov dword ptr [r15 + {cx_sig}], -1",
    "lock inc dword ptr [r15 + {cx_seq}]",
    "lea rdi, [r15 + {cx_seq}]",
    "mov esi, 1",
    "mov edx, 1",
    "mov eax, 202",
    "syscall",
    "mov eax, 60",
    "xor edi, edi",
    "syscall",
    "ud2",
    "7:",
    ".byte 31, 11, 7, 4, 5, 8, 23, 0",
    // The handler: rdi = signal, rsi = siginfo, rdx = ucontext; on the
    // signal stack, which lies in the block: the block is rsp rounded down.
    ".p2align 4",
    ".globl vkrun_stub_handler",
    ".hidden vkrun_stub_handler",
    "vkrun_stub_handler:",
    "mov r15, rsp",
    "and r15, {cx_mask}",
    "cmp edi, {kick}",
    "jne 10f",
    "cmp dword ptr [r15 + {cx_kick}], 0",
    "je 14f",
    "10:",
    "mov r12, rdx",
    "mov [r15 + {cx_sig}], edi",
    "mov eax, [rsi + 8]",
    "mov [r15 + {cx_code}], eax",
    "mov rax, [rsi + 16]",
    "mov [r15 + {cx_addr}], rax",
    "mov rax, [rsi + 24]",
    "mov [r15 + {cx_syscall}], rax",
    "lea rsi, [r12 + 40]",
    "lea rdi, [r15 + {cx_out}]",
    "mov ecx, 23",
    "rep movsq",
    "rdfsbase rax",
    "mov [r15 + {cx_fs_out}], rax",
    "rdgsbase rax",
    "mov [r15 + {cx_gs_out}], rax",
    // publish: state RUNNING -> WAIT (EXIT stays), seq += 1, wake vkrun
    "mov eax, {st_running}",
    "mov ecx, {st_wait}",
    "lock cmpxchg [r15 + {cx_state}], ecx",
    "lock inc dword ptr [r15 + {cx_seq}]",
    "lea rdi, [r15 + {cx_seq}]",
    "mov esi, 1",
    "mov edx, 1",
    "mov eax, 202",
    "call 20f",
    // wait for GO (or EXIT)
    "11:",
    "mov eax, [r15 + {cx_state}]",
    "cmp eax, {st_go}",
    "je 12f",
    "cmp eax, {st_exit}",
    "je 13f",
    // notification mode: report and sleep until answered (the answer is
    // the go); a failed report (no listener left) waits by futex instead
    "cmp dword ptr [r15 + {cx_notif}], 0",
    "je 15f",
    "mov rax, {nr_report}",
    "call 20f",
    "cmp rax, -38",
    "jne 11b",
    "15:",
    "lea rdi, [r15 + {cx_state}]",
    "xor esi, esi",
    "mov edx, eax",
    "xor r10d, r10d",
    "mov eax, 202",
    "call 20f",
    "jmp 11b",
    "12:",
    "mov eax, {st_go}",
    "mov ecx, {st_running}",
    "lock cmpxchg [r15 + {cx_state}], ecx",
    "jne 11b",
    "lea rsi, [r15 + {cx_in}]",
    "lea rdi, [r12 + 40]",
    "mov ecx, {gregs_in}",
    "rep movsq",
    // Sanitise what the block said (anyone who can write the block wrote
    // it: the guest's wrapper, or the user code): user rflags only, and
    // a non-canonical base (wrfsbase would fault here) becomes 0.
    "mov rax, [r12 + 40 + 8 * {reg_efl}]",
    "and eax, {efl_mask}",
    "or eax, {efl_set}",
    "mov [r12 + 40 + 8 * {reg_efl}], rax",
    "mov rax, [r15 + {cx_fs_in}]",
    "call 21f",
    "wrfsbase rax",
    "mov rax, [r15 + {cx_gs_in}]",
    "call 21f",
    "wrgsbase rax",
    "14:",
    "ret",
    "13:",
    "mov eax, 60",
    "xor edi, edi",
    "call 20f",
    "ud2",
    // rax = rax if canonical, else 0 (clobbers rcx)
    "21:",
    "mov rcx, rax",
    "sar rcx, 47",
    "inc rcx",
    "cmp rcx, 1",
    "jbe 22f",
    "xor eax, eax",
    "22:",
    "ret",
    // the only system call instruction the filter lets through
    ".p2align 4",
    ".globl vkrun_stub_handler_syscall",
    ".hidden vkrun_stub_handler_syscall",
    "vkrun_stub_handler_syscall:",
    "20:",
    "syscall",
    "ret",
    // sa_restorer: rt_sigreturn, through the same instruction
    ".globl vkrun_stub_restorer",
    ".hidden vkrun_stub_restorer",
    "vkrun_stub_restorer:",
    "mov eax, 15",
    "jmp 20b",
    ".globl vkrun_stub_code_end",
    ".hidden vkrun_stub_code_end",
    "vkrun_stub_code_end:",
    ".popsection",
    user_max = const USER_MAX,
    base = const STUB_BASE,
    header_len = const DATA + 0x1000,
    data = const STUB_BASE + DATA,
    d_sigaction = const DATA_SIGACTION - DATA,
    d_unblock = const DATA_UNBLOCK - DATA,
    d_fprog = const DATA_FPROG - DATA,
    cx_mask = const !(CTX_SIZE - 1),
    kick = const KICK_SIGNAL,
    cx_state = const CX_STATE,
    cx_seq = const CX_SEQ,
    cx_kick = const CX_KICK,
    cx_sig = const CX_SIG,
    cx_code = const CX_CODE,
    cx_addr = const CX_ADDR,
    cx_syscall = const CX_SYSCALL,
    cx_fs_out = const CX_FS_OUT,
    cx_gs_out = const CX_GS_OUT,
    cx_fs_in = const CX_FS_IN,
    cx_gs_in = const CX_GS_IN,
    cx_altstack = const CX_ALTSTACK,
    cx_in = const CX_IN,
    cx_notif = const CX_NOTIF,
    cx_listener = const CX_LISTENER,
    nr_report = const vkabi::fastrun::NR_REPORT,
    cx_out = const CX_OUT,
    gregs_in = const GREGS_IN,
    reg_efl = const REG_EFL,
    efl_mask = const vkabi::RFLAGS_USER_MASK,
    efl_set = const vkabi::RFLAGS_USER_SET,
    st_wait = const STATE_WAIT,
    st_go = const STATE_GO,
    st_running = const STATE_RUNNING,
    st_exit = const STATE_EXIT,
);

unsafe extern "C" {
    static vkrun_stub_code_start: u8;
    static vkrun_stub_code_end: u8;
    static vkrun_stub_syscall_gadget: u8;
    static vkrun_stub_clone_gadget: u8;
    static vkrun_stub_handler: u8;
    static vkrun_stub_handler_syscall: u8;
    static vkrun_stub_restorer: u8;
}

/// The stub's machine code, copied to the start of its region.
pub fn code() -> &'static [u8] {
    let start = &raw const vkrun_stub_code_start;
    let end = &raw const vkrun_stub_code_end;
    // SAFETY: the symbols delimit the block above in our own text.
    unsafe { std::slice::from_raw_parts(start, end as usize - start as usize) }
}

/// The stub address of a symbol of the code block.
fn at(symbol: *const u8) -> u64 {
    let start = &raw const vkrun_stub_code_start;
    STUB_BASE + CODE + (symbol as u64 - start as u64)
}

/// Stub address of `syscall; int3`.
pub fn syscall_gadget() -> u64 {
    at(&raw const vkrun_stub_syscall_gadget)
}

/// Stub address of the context `clone` gadget.
pub fn clone_gadget() -> u64 {
    at(&raw const vkrun_stub_clone_gadget)
}

/// The data page of a stub region (`sock_fprog`, `sigaction`, unblocked
/// signals, filter), as written by vkrun through its mapping of the region
/// before the first context starts.
pub fn data_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    let mut put = |off: u64, bytes: &[u8]| {
        let o = (off - DATA) as usize;
        page[o..o + bytes.len()].copy_from_slice(bytes);
    };
    let filter = context_filter();
    put(DATA_FPROG, &(filter.len() as u16).to_ne_bytes());
    put(DATA_FPROG + 8, &(STUB_BASE + DATA_FILTER).to_ne_bytes());
    // struct kernel_sigaction { handler, flags, restorer, mask }
    let flags = (libc::SA_SIGINFO | libc::SA_ONSTACK) as u64 | SA_RESTORER;
    put(
        DATA_SIGACTION,
        &at(&raw const vkrun_stub_handler).to_ne_bytes(),
    );
    put(DATA_SIGACTION + 8, &flags.to_ne_bytes());
    put(
        DATA_SIGACTION + 16,
        &at(&raw const vkrun_stub_restorer).to_ne_bytes(),
    );
    put(DATA_SIGACTION + 24, &u64::MAX.to_ne_bytes());
    let unblock = CONTEXT_SIGNALS
        .iter()
        .fold(0u64, |set, &s| set | 1 << (s - 1));
    put(DATA_UNBLOCK, &unblock.to_ne_bytes());
    for (i, insn) in filter.iter().enumerate() {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&insn.code.to_ne_bytes());
        b[2] = insn.jt;
        b[3] = insn.jf;
        b[4..].copy_from_slice(&insn.k.to_ne_bytes());
        put(DATA_FILTER + 8 * i as u64, &b);
    }
    page
}

/// The filter of an execution context: every system call of the user code
/// traps (`SECCOMP_RET_TRAP`, so none reaches the host), whatever its
/// architecture (`int 0x80` included). Only the handler's own instruction
/// may make `futex` (`FUTEX_WAIT`/`FUTEX_WAKE` only), `rt_sigreturn` and
/// `exit` (the calling thread), and the report ([`vkabi::fastrun::NR_REPORT`],
/// a user notification to the context's own listener). User code can jump
/// to that instruction too;
/// all it can reach that way is its own context's sleep, a spurious futex
/// wake-up, a forged signal return (its own registers) or its own end.
pub fn context_filter() -> Vec<libc::sock_filter> {
    use crate::sys::abi::AUDIT_ARCH_X86_64;
    use crate::sys::seccomp::{JEQ_K, LD_W_ABS, RET_K, jump, stmt};
    const TRAP: u32 = libc::SECCOMP_RET_TRAP;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    let ip = at(&raw const vkrun_stub_handler_syscall) + 2;
    vec![
        /* 0 */ stmt(LD_W_ABS, 4),
        /* 1 */ jump(JEQ_K, AUDIT_ARCH_X86_64, 0, 9),
        /* 2 */ stmt(LD_W_ABS, 8),
        /* 3 */ jump(JEQ_K, ip as u32, 0, 7),
        /* 4 */ stmt(LD_W_ABS, 12),
        /* 5 */ jump(JEQ_K, (ip >> 32) as u32, 0, 5),
        /* 6 */ stmt(LD_W_ABS, 0),
        /* 7 */ jump(JEQ_K, libc::SYS_futex as u32, 4, 0),
        /* 8 */ jump(JEQ_K, libc::SYS_rt_sigreturn as u32, 6, 0),
        /* 9 */ jump(JEQ_K, libc::SYS_exit as u32, 5, 0),
        /* 10 */ jump(JEQ_K, vkabi::fastrun::NR_REPORT as u32, 6, 0),
        /* 11 */ stmt(RET_K, TRAP),
        /* 12 */ stmt(LD_W_ABS, 24),
        /* 13 */ jump(JEQ_K, 0, 1, 0),
        /* 14 */ jump(JEQ_K, 1, 0, 1),
        /* 15 */ stmt(RET_K, ALLOW),
        /* 16 */ stmt(RET_K, TRAP),
        /* 17 */ stmt(RET_K, libc::SECCOMP_RET_USER_NOTIF),
    ]
}

/// Whether user code may use `rdfsbase`/`wrfsbase` (the kernel sets
/// `HWCAP2_FSGSBASE` when it enabled them): execution contexts need them.
pub fn fsgsbase_available() -> bool {
    const HWCAP2_FSGSBASE: u64 = 1 << 1;
    // SAFETY: getauxval only reads the process's auxiliary vector.
    let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) };
    hwcap2 & HWCAP2_FSGSBASE != 0
}

/// Fork a stub whose region is the memfd `header` (code at offset 0, up to
/// [`CONTEXTS`]) followed by the memfd `blocks` (the context blocks, from
/// [`CONTEXTS`] to [`STUB_LEN`]: a file of their own, so that a guest
/// given it for the fast RUN can reach no code). The child waits on `go`
/// (the read end of a pipe) until the caller has seized it and written one
/// byte.
///
/// Precondition: called from the tracer thread; the child runs no Rust code
/// that allocates or locks (vkrun is multi-threaded).
pub fn fork_stub(
    header: BorrowedFd<'_>,
    blocks: BorrowedFd<'_>,
    go: BorrowedFd<'_>,
) -> Result<Pid, Errno> {
    let parent = std::process::id() as libc::pid_t;
    let map = |at: u64, len: u64, fd: BorrowedFd<'_>| {
        // SAFETY: maps our own memfd at an address checked free by
        // MAP_FIXED_NOREPLACE; nothing else of ours lives there.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(Errno::last())
        } else {
            Ok(())
        }
    };
    let unmap = |at: u64, len: u64| {
        // SAFETY: unmaps exactly a range mapped by `map` above.
        unsafe { libc::munmap(at as *mut libc::c_void, len as usize) };
    };
    map(STUB_BASE, CONTEXTS, header)?;
    if let Err(e) = map(STUB_BASE + CONTEXTS, STUB_LEN - CONTEXTS, blocks) {
        unmap(STUB_BASE, CONTEXTS);
        return Err(e);
    }
    let go_fd = go.as_raw_fd();
    // SAFETY: the child only makes raw system calls on integers and its own
    // stack, then leaves vkrun's code for the stub's region for good.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; never returns.
        unsafe { stub_child(parent, go_fd) }
    }
    unmap(STUB_BASE, STUB_LEN);
    if pid < 0 {
        return Err(Errno::last());
    }
    Ok(Pid::from_raw(pid))
}

/// The forked child, until it jumps into its region.
///
/// # Safety
/// Only in a child just forked by [`fork_stub`], with the region mapped at
/// [`STUB_BASE`].
unsafe fn stub_child(parent: libc::pid_t, go: libc::c_int) -> ! {
    // SAFETY: raw system calls; the final jump moves the stack into the
    // region and never comes back.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        let mut byte = 0u8;
        while libc::read(go, (&raw mut byte).cast(), 1) != 1 {
            if *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
        libc::setsid();
        libc::prctl(libc::PR_SET_NAME, c"vkrun-vmspace".as_ptr(), 0, 0, 0);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        unregister_rseq();
        let stack_top = STUB_BASE + MAIN_STACK_TOP;
        std::arch::asm!(
            "mov rsp, {stack}",
            "jmp {entry}",
            stack = in(reg) stack_top,
            entry = in(reg) STUB_BASE,
            options(noreturn),
        );
    }
}

unsafe extern "C" {
    /// glibc (2.35+): offset of the thread's rseq area from the thread
    /// pointer, and its feature size (0 if rseq is not registered).
    static __rseq_offset: libc::ptrdiff_t;
    static __rseq_size: libc::c_uint;
}

/// `RSEQ_SIG` of x86-64 glibc.
const RSEQ_SIG: u32 = 0x5305_3053;
const RSEQ_FLAG_UNREGISTER: u32 = 1;

/// Unregister the rseq area glibc registered for the forking thread: the
/// stub unmaps vkrun's memory, and the kernel's next rseq update on return
/// to user mode would otherwise fault (a `SIGSEGV` on every return).
/// The kernel wants the length used at registration, which glibc does not
/// export: try the sizes it has used.
///
/// # Safety
/// Only in the forked stub child (async-signal-safe system calls only).
unsafe fn unregister_rseq() {
    // SAFETY: reading two integers glibc exports; fs:0 is the thread
    // pointer on x86-64; rseq(2) only compares its arguments.
    unsafe {
        if __rseq_size == 0 {
            return;
        }
        let tp: u64;
        std::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly));
        let area = tp.wrapping_add(__rseq_offset as u64);
        for len in [32u32, __rseq_size, 64, 20] {
            let r = libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
            if r == 0 {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_filter_traps_all_but_the_handlers_calls() {
        let f = context_filter();
        let n = f.len();
        for (i, insn) in f.iter().enumerate() {
            if insn.code == crate::sys::seccomp::JEQ_K {
                assert!(
                    i + 1 + (insn.jt.max(insn.jf) as usize) < n,
                    "jump {i} in range"
                );
            }
        }
        // Every path ends on a return: TRAP unless the handler's own
        // instruction makes one of the three calls.
        let rets: Vec<u32> = f
            .iter()
            .filter(|i| i.code == crate::sys::seccomp::RET_K)
            .map(|i| i.k)
            .collect();
        assert!(rets.contains(&libc::SECCOMP_RET_TRAP));
        assert!(rets.iter().all(|&k| k == libc::SECCOMP_RET_TRAP
            || k == libc::SECCOMP_RET_ALLOW
            || k == libc::SECCOMP_RET_USER_NOTIF));
        assert_eq!(f[n - 2].k, libc::SECCOMP_RET_TRAP);
        assert_eq!(f[n - 1].k, libc::SECCOMP_RET_USER_NOTIF);
    }

    #[test]
    fn the_block_layout_is_the_guest_librarys() {
        use vkabi::fastrun as f;
        let pairs = [
            (CX_STATE, f::CX_STATE),
            (CX_SEQ, f::CX_SEQ),
            (CX_KICK, f::CX_KICK),
            (CX_SIG, f::CX_SIG),
            (CX_CODE, f::CX_CODE),
            (CX_ADDR, f::CX_ADDR),
            (CX_SYSCALL, f::CX_SYSCALL),
            (CX_FS_OUT, f::CX_FS_OUT),
            (CX_GS_OUT, f::CX_GS_OUT),
            (CX_FS_IN, f::CX_FS_IN),
            (CX_GS_IN, f::CX_GS_IN),
            (CX_IN, f::CX_IN),
            (CX_OUT, f::CX_OUT),
            (GREGS_IN, f::GREGS_IN),
            (GREGS, f::GREGS),
            (REG_EFL, f::reg::EFL),
            (REG_TRAPNO, f::reg::TRAPNO),
        ];
        for (i, (ours, theirs)) in pairs.iter().enumerate() {
            assert_eq!(ours, theirs, "pair {i}");
        }
        let states = [
            (STATE_WAIT, f::STATE_WAIT),
            (STATE_GO, f::STATE_GO),
            (STATE_RUNNING, f::STATE_RUNNING),
            (STATE_EXIT, f::STATE_EXIT),
        ];
        assert!(states.iter().all(|(a, b)| a == b));
        assert_eq!(KICK_SIGNAL as u32, f::KICK_SIGNAL);
        // The altstack (24 bytes) ends before the fast-path words.
        const { assert!(CX_ALTSTACK + 24 <= CX_OPEN) };
    }

    #[test]
    fn the_stub_unmaps_then_traps() {
        let code = super::code();
        assert!(code.len() < DATA as usize);
        assert!(code.contains(&0xcc), "int3");
        assert_eq!(&code[..5], &[0xb8, 11, 0, 0, 0], "mov eax, SYS_munmap");
    }
}
