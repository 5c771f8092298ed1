//! vmspace stubs: host processes with an (almost) empty address space of
//! vkrun's own making, one per vmspace (ABI section 7).
//!
//! A stub is forked from the tracer thread. The child runs only raw system
//! calls: it waits until the tracer has seized it, leaves vkrun's session,
//! blocks every signal, closes every descriptor, and jumps into its region,
//! mapped by the parent at [`STUB_BASE`] (above `USER_MAX`, the ABI's
//! reserved 2 MiB) just for the fork. From there it unmaps everything below
//! `USER_MAX` and stops on `int3`: `[0, USER_MAX)` belongs to the vkernel.

use std::arch::global_asm;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::USER_MAX;

/// Where a stub's region lives (in the stub; in vkrun only during a fork).
pub const STUB_BASE: u64 = USER_MAX + 0x10000;
/// The region: a code page and a stack page.
pub const STUB_LEN: u64 = 2 * 4096;

global_asm!(
    ".pushsection .text.vkrun_stub,\"ax\",@progbits",
    ".p2align 4",
    ".globl vkrun_stub_code_start",
    ".hidden vkrun_stub_code_start",
    "vkrun_stub_code_start:",
    // munmap(0, USER_MAX): nothing of vkrun stays below USER_MAX
    "mov eax, 11",
    "xor edi, edi",
    "mov rsi, 0x00007FFFFFE00000",
    "syscall",
    "2:",
    "int3",
    "jmp 2b",
    ".globl vkrun_stub_code_end",
    ".hidden vkrun_stub_code_end",
    "vkrun_stub_code_end:",
    ".popsection",
);

unsafe extern "C" {
    static vkrun_stub_code_start: u8;
    static vkrun_stub_code_end: u8;
}

/// The stub's machine code, copied to the start of its region.
pub fn code() -> &'static [u8] {
    let start = &raw const vkrun_stub_code_start;
    let end = &raw const vkrun_stub_code_end;
    // SAFETY: the symbols delimit the block above in our own text.
    unsafe { std::slice::from_raw_parts(start, end as usize - start as usize) }
}

/// Fork a stub whose region is the memfd `region` (code at offset 0).
/// The child waits on `go` (the read end of a pipe) until the caller has
/// seized it and written one byte.
///
/// Precondition: called from the tracer thread; the child runs no Rust code
/// that allocates or locks (vkrun is multi-threaded).
pub fn fork_stub(region: BorrowedFd<'_>, go: BorrowedFd<'_>) -> Result<Pid, Errno> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: maps a region of our own memfd at an address checked free by
    // MAP_FIXED_NOREPLACE; nothing else of ours lives there.
    let at = unsafe {
        libc::mmap(
            STUB_BASE as *mut libc::c_void,
            STUB_LEN as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
            region.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let go_fd = go.as_raw_fd();
    // SAFETY: the child only makes raw system calls on integers and its own
    // stack, then leaves vkrun's code for the stub's region for good.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; never returns.
        unsafe { stub_child(parent, go_fd) }
    }
    // SAFETY: unmaps exactly the region mapped above.
    unsafe { libc::munmap(STUB_BASE as *mut libc::c_void, STUB_LEN as usize) };
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
        let stack_top = STUB_BASE + STUB_LEN;
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
    #[test]
    fn the_stub_unmaps_then_traps() {
        let code = super::code();
        assert!(code.len() < 4096);
        assert!(code.contains(&0xcc), "int3");
        assert_eq!(&code[..5], &[0xb8, 11, 0, 0, 0], "mov eax, SYS_munmap");
    }
}
