//! Tests that run the user programs of `user.s` as ordinary Linux code, no
//! vkrun needed: in a forked child, with the heap and the stack as
//! `PROT_NONE` regions and a SIGSEGV handler that makes the faulting page
//! writable and counts it. The programs use Linux's system call numbers, so
//! they print and exit exactly as under the vkernel, and the handler counts
//! the same first touches the vkernel serves as `T_PAGEFLT`. This checks the
//! assembly (including that it runs at any address) and pins the figures the
//! end-to-end tests in `tests/tests/vmspace_demo.rs` expect.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::user::Program;

/// What the demo prints (the summary line is the vkernel's, not the
/// program's).
const DEMO_OUTPUT: &str = "primes below 100000: 9592, sum 454396537\n\
                           fib(90): 2880067194370816120\n\
                           sum(1..1000) by recursion: 500500\n";
/// Heap pages 0..=24 (the sieve) and 31..=32 (the Fibonacci table), and
/// 16 stack pages.
const DEMO_PAGE_FAULTS: u64 = 27 + 16;

const PAGE: usize = 4096;
const HEAP_LEN: usize = 1 << 30;
const STACK_LEN: usize = 8 << 20;
const ALT_STACK_LEN: usize = 64 << 10;

/// The demand-paged regions, `[lo, hi)` each, for the handler: heap, stack.
static REGIONS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// The address of the fault counter (in a shared page, so the parent sees
/// the child's count).
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// One native run at a time: the statics above are per process.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How a native run ended.
#[derive(Debug)]
struct Native {
    stdout: String,
    /// The exit code, or 128 + the signal.
    status: i32,
    /// First touches of heap and stack pages.
    faults: u64,
}

/// A fresh anonymous private mapping of `len` bytes with `prot`.
fn map(len: usize, prot: i32, flags: i32) -> *mut u8 {
    // SAFETY: a new mapping where the kernel chooses; nothing existing is
    // touched.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            prot,
            libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {len}");
    p.cast()
}

extern "C" fn on_sigsegv(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler gets a valid siginfo_t.
    let addr = unsafe { (*info).si_addr() } as u64;
    let r = |i: usize| REGIONS[i].load(Ordering::Relaxed);
    let inside = (r(0)..r(1)).contains(&addr) || (r(2)..r(3)).contains(&addr);
    let page = (addr & !(PAGE as u64 - 1)) as *mut libc::c_void;
    // SAFETY: the page lies in a region this test mapped for the program;
    // making it writable is the demand pager's job. mprotect is
    // async-signal-safe.
    if inside && unsafe { libc::mprotect(page, PAGE, libc::PROT_READ | libc::PROT_WRITE) } == 0 {
        // SAFETY: COUNTER holds the address of a live, shared, 8-aligned
        // page set before the fork.
        let counter = unsafe { &*(COUNTER.load(Ordering::Relaxed) as *const AtomicU64) };
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Anything else: the default action, when the access faults again.
    // SAFETY: signal() is async-signal-safe.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

/// Run `program` natively with its heap at the start of a demand-paged
/// region; `args` gets the heap's address and returns `rdi`, `rsi`.
fn run_native(program: Program, args: impl Fn(u64) -> [u64; 2]) -> Native {
    let _one = ONE_AT_A_TIME.lock().expect("no test panicked holding it");
    let code = program.code();
    let code_len = code.len().div_ceil(PAGE) * PAGE;
    let text = map(
        code_len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE,
    );
    // SAFETY: `text` is a fresh writable mapping of at least `code.len()`
    // bytes; then it becomes read-execute for the program.
    unsafe {
        ptr::copy_nonoverlapping(code.as_ptr(), text, code.len());
        assert_eq!(
            libc::mprotect(text.cast(), code_len, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
    }
    let heap = map(HEAP_LEN, libc::PROT_NONE, libc::MAP_PRIVATE) as u64;
    let stack = map(STACK_LEN, libc::PROT_NONE, libc::MAP_PRIVATE) as u64;
    let alt = map(
        ALT_STACK_LEN,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE,
    );
    let counter = map(PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    for (slot, v) in REGIONS.iter().zip([
        heap,
        heap + HEAP_LEN as u64,
        stack,
        stack + STACK_LEN as u64,
    ]) {
        slot.store(v, Ordering::Relaxed);
    }
    COUNTER.store(counter as u64, Ordering::Relaxed);
    let [a0, a1] = args(heap);
    let (entry, top) = (text as u64, stack + STACK_LEN as u64);

    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: the child only makes async-signal-safe calls (dup2, close,
    // sigaltstack, sigaction) on memory mapped before the fork, then runs
    // the program, which ends in exit(2) or a fatal signal.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: as above; `alt` is a live writable mapping for the signal
        // stack, the handler has the SA_SIGINFO signature, and `enter`
        // gets a mapped executable entry and a stack top in a region the
        // handler pages in.
        unsafe {
            libc::dup2(fds[1], 1);
            libc::close(fds[0]);
            let ss = libc::stack_t {
                ss_sp: alt.cast(),
                ss_flags: 0,
                ss_size: ALT_STACK_LEN,
            };
            libc::sigaltstack(&ss, ptr::null_mut());
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsegv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigaction(libc::SIGSEGV, &sa, ptr::null_mut());
            enter(entry, top, a0, a1)
        }
    }
    // SAFETY: the write end is ours to close; the read end becomes a File
    // that owns it.
    let mut out = unsafe {
        libc::close(fds[1]);
        File::from_raw_fd(fds[0])
    };
    let mut stdout = String::new();
    out.read_to_string(&mut stdout).expect("the child's stdout");
    let mut wstatus = 0;
    // SAFETY: `pid` is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut wstatus, 0) }, pid);
    let status = if libc::WIFEXITED(wstatus) {
        libc::WEXITSTATUS(wstatus)
    } else {
        128 + libc::WTERMSIG(wstatus)
    };
    // SAFETY: the shared counter page is live until the munmap below.
    let faults = unsafe { &*(counter as *const AtomicU64) }.load(Ordering::Relaxed);
    for (p, len) in [
        (text, code_len),
        (heap as *mut u8, HEAP_LEN),
        (stack as *mut u8, STACK_LEN),
        (alt, ALT_STACK_LEN),
        (counter, PAGE),
    ] {
        // SAFETY: each is a mapping of this function's, used by nobody now.
        unsafe { libc::munmap(p.cast(), len) };
    }
    Native {
        stdout,
        status,
        faults,
    }
}

/// Jump to `entry` with `rsp = top`, `rdi = a0`, `rsi = a1`.
///
/// # Safety
/// `entry` must be a user program's code and `top` the top of a stack it
/// may use; the program never returns here.
unsafe fn enter(entry: u64, top: u64, a0: u64, a1: u64) -> ! {
    // SAFETY: forwarded to the caller.
    unsafe {
        std::arch::asm!(
            "mov rsp, {top}",
            "jmp {entry}",
            top = in(reg) top,
            entry = in(reg) entry,
            in("rdi") a0,
            in("rsi") a1,
            options(noreturn),
        )
    }
}

#[test]
fn the_user_programs_run_natively() {
    let demo = run_native(Program::Demo, |heap| [heap, 0]);
    assert_eq!(demo.stdout, DEMO_OUTPUT, "{demo:?}");
    assert_eq!(demo.status, 0, "{demo:?}");
    assert_eq!(demo.faults, DEMO_PAGE_FAULTS, "{demo:?}");

    let spin = run_native(Program::SyscallLoop, |_| [1000, 0]);
    assert_eq!((spin.stdout.as_str(), spin.status, spin.faults), ("", 0, 0));

    let touch = run_native(Program::Touch, |heap| [heap, 300]);
    assert_eq!(
        (touch.stdout.as_str(), touch.status, touch.faults),
        ("", 0, 300)
    );
}
