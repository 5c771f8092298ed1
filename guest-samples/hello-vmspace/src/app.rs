//! What `hello-vmspace` does, in `core` only: raw `syscall` wrappers, a line
//! buffer, and the three modes.
//!
//! - `hello-vmspace [ARGS...]`: says hello, prints its pid, `uname`, who
//!   loaded it (a vDSO in its auxv means Linux itself; none means a kernel
//!   without one, such as the minikernel running it in a vmspace), its argv,
//!   then grows its heap with `brk` by 1 MiB and maps 8 MiB with `mmap`,
//!   writes every word of both and prints their checksums; exits 0.
//! - `hello-vmspace bench-getpid N`: N `getpid` calls; prints
//!   `getpid_ns_per_call X`.
//! - `hello-vmspace bench-touch MIB`: maps MIB MiB and writes one byte per
//!   4 KiB page; prints `touch_ns_per_page X`.
//!
//! Apart from the pid and the "loaded by" line, the output is the same
//! natively and inside the minikernel.

use core::arch::asm;

const SYS_WRITE: usize = 1;
const SYS_MMAP: usize = 9;
const SYS_MUNMAP: usize = 11;
const SYS_BRK: usize = 12;
const SYS_GETPID: usize = 39;
const SYS_UNAME: usize = 63;
const SYS_CLOCK_GETTIME: usize = 228;
const SYS_EXIT_GROUP: usize = 231;

const AT_NULL: usize = 0;
const AT_SYSINFO_EHDR: usize = 33;
const CLOCK_MONOTONIC: usize = 1;
const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

/// A raw Linux system call with up to six arguments; returns `rax`
/// (`-errno` on failure).
///
/// # Safety
///
/// The call must be sound with these arguments: any pointer among them must
/// be valid for what system call `n` does with it.
unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the arguments; `syscall` clobbers only
    // rax, rcx and r11, which are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `write(fd, bytes)`, retried until everything is written or it fails.
pub fn write(fd: usize, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the kernel only reads `bytes.len()` bytes from a live slice.
        let n = unsafe {
            syscall6(
                SYS_WRITE,
                [fd, bytes.as_ptr() as usize, bytes.len(), 0, 0, 0],
            )
        };
        if n <= 0 {
            return;
        }
        bytes = bytes.get(n as usize..).unwrap_or(&[]);
    }
}

/// `exit_group(code)`.
pub fn exit(code: i32) -> ! {
    // SAFETY: exit_group takes no pointer and does not return.
    unsafe {
        asm!("syscall", in("rax") SYS_EXIT_GROUP, in("rdi") code as isize, options(noreturn, nostack));
    }
}

/// `getpid()`.
fn getpid() -> usize {
    // SAFETY: getpid takes no argument.
    unsafe { syscall6(SYS_GETPID, [0; 6]) as usize }
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds.
fn now_ns() -> u64 {
    let mut ts = [0u64; 2];
    // SAFETY: the kernel writes one `struct timespec` (16 bytes) into `ts`.
    unsafe {
        syscall6(
            SYS_CLOCK_GETTIME,
            [CLOCK_MONOTONIC, ts.as_mut_ptr() as usize, 0, 0, 0, 0],
        )
    };
    ts[0].wrapping_mul(1_000_000_000).wrapping_add(ts[1])
}

/// A fresh private anonymous read-write mapping of `len` bytes, or `None`.
fn mmap_anon(len: usize) -> Option<*mut u8> {
    // SAFETY: a new mapping where the kernel chooses: no existing memory is
    // affected.
    let p = unsafe { syscall6(SYS_MMAP, [0, len, 0x3, 0x22, usize::MAX, 0]) };
    (!(-4095..0).contains(&p)).then_some(p as *mut u8)
}

/// Unmap what [`mmap_anon`] returned.
///
/// # Safety
///
/// `p`/`len` must be a mapping from [`mmap_anon`] that is used no more.
unsafe fn munmap(p: *mut u8, len: usize) {
    // SAFETY: per the caller.
    unsafe { syscall6(SYS_MUNMAP, [p as usize, len, 0, 0, 0, 0]) };
}

/// Writes every 64-bit word of `len` bytes at `p` with a pattern, reads them
/// back and returns their checksum (the same for every run and kernel).
///
/// # Safety
///
/// `p` must be valid for writes of `len` bytes, 8-aligned.
unsafe fn fill_and_sum(p: *mut u8, len: usize) -> u64 {
    let words = p.cast::<u64>();
    let n = len / 8;
    for i in 0..n {
        let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
        // SAFETY: word i lies inside the region (per the caller); volatile
        // so that every page really is touched.
        unsafe { words.add(i).write_volatile(v) };
    }
    let mut sum: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..n {
        // SAFETY: as above, and the word was written just now.
        let v = unsafe { words.add(i).read_volatile() };
        sum = (sum ^ v).wrapping_mul(0x100_0000_01b3);
    }
    sum
}

/// A line of output built without `core::fmt`, written with one `write`.
pub(crate) struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub(crate) fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    /// Appends bytes (truncated when the line is full).
    pub(crate) fn s(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends `v` in decimal.
    pub(crate) fn u(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        self.s(digits.get(i..).unwrap_or(&[]))
    }

    /// Appends `v` as `0x` and 16 hex digits.
    pub(crate) fn hex(&mut self, v: u64) -> &mut Self {
        self.s(b"0x");
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as u8;
            self.s(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
        }
        self
    }

    /// Appends `tenths / 10` with one decimal.
    pub(crate) fn tenths(&mut self, tenths: u64) -> &mut Self {
        self.u(tenths / 10).s(b".").u(tenths % 10)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Writes the line and a newline to stdout.
    pub(crate) fn print(&mut self) {
        self.s(b"\n");
        write(1, self.as_bytes());
    }
}

/// The decimal number in `s`, or `None`.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The NUL-terminated string at `p`.
///
/// # Safety
///
/// `p` must point to a NUL-terminated string that lives for the program.
unsafe fn c_str(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: the string is NUL-terminated (per the caller), so every byte
    // up to the NUL is readable. (Volatile: without libc there is no
    // `strlen` for the optimiser to turn this loop into.)
    while unsafe { p.add(n).read_volatile() } != 0 {
        n += 1;
    }
    // SAFETY: the `n` bytes before the NUL, alive for the program.
    unsafe { core::slice::from_raw_parts(p, n) }
}

/// The `n` bytes of a `uname` field, up to its NUL.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or(&[])
}

/// The program's arguments and auxiliary vector, from the initial stack.
struct Start {
    argc: usize,
    argv: *const *const u8,
    auxv: *const [usize; 2],
}

impl Start {
    /// Argument `i`, or `None`.
    fn arg(&self, i: usize) -> Option<&'static [u8]> {
        if i >= self.argc {
            return None;
        }
        // SAFETY: argv has argc valid entries, each a NUL-terminated string
        // on the initial stack, which lives as long as the program.
        Some(unsafe { c_str(self.argv.add(i).read()) })
    }

    /// The value of auxv entry `key`, or `None`.
    fn aux(&self, key: usize) -> Option<usize> {
        let mut p = self.auxv;
        loop {
            // SAFETY: the auxv is a list of pairs ending with AT_NULL.
            let [k, v] = unsafe { p.read() };
            if k == AT_NULL {
                return None;
            }
            if k == key {
                return Some(v);
            }
            // SAFETY: not at AT_NULL yet, so the next pair exists.
            p = unsafe { p.add(1) };
        }
    }
}

/// The program: parses the initial stack at `sp` and runs the mode its
/// arguments select; returns the exit code.
///
/// # Safety
///
/// `sp` must be the initial stack pointer Linux's ELF loader (or a kernel
/// doing the same) gave the program: argc, argv, NULL, envp, NULL, auxv.
pub unsafe fn main(sp: *const usize) -> i32 {
    // SAFETY: per the caller, argc is at sp, argv follows it, then envp
    // (NULL-terminated), then the auxv.
    let start = unsafe {
        let argc = sp.read();
        let argv = sp.add(1).cast::<*const u8>();
        let mut envp = argv.add(argc + 1);
        while !envp.read().is_null() {
            envp = envp.add(1);
        }
        Start {
            argc,
            argv,
            auxv: envp.add(1).cast(),
        }
    };
    match start.arg(1) {
        Some(b"bench-getpid") => {
            bench_getpid(start.arg(2).and_then(parse_u64).unwrap_or(1_000_000))
        }
        Some(b"bench-touch") => bench_touch(start.arg(2).and_then(parse_u64).unwrap_or(256)),
        _ => hello(&start),
    }
}

fn hello(start: &Start) -> i32 {
    Line::new()
        .s(b"hello from hello-vmspace: a static x86-64 Linux program, no libc, raw system calls only")
        .print();
    Line::new().s(b"pid: ").u(getpid() as u64).print();
    let mut uts = [0u8; 390];
    // SAFETY: the kernel writes one `struct utsname` (6 x 65 bytes).
    let ok = unsafe { syscall6(SYS_UNAME, [uts.as_mut_ptr() as usize, 0, 0, 0, 0, 0]) } == 0;
    if ok {
        let f = |i: usize| field(uts.get(i * 65..(i + 1) * 65).unwrap_or(&[]));
        Line::new()
            .s(b"uname: ")
            .s(f(0))
            .s(b" ")
            .s(f(2))
            .s(b" ")
            .s(f(4))
            .print();
    }
    if start.aux(AT_SYSINFO_EHDR).is_some() {
        Line::new()
            .s(b"loaded by: Linux itself (its auxv has a vDSO): not in a vmspace")
            .print();
    } else {
        Line::new()
            .s(b"loaded by: a kernel that maps no vDSO, e.g. the minikernel: this is a vmspace")
            .print();
    }
    for i in 0..start.argc {
        Line::new()
            .s(b"argv[")
            .u(i as u64)
            .s(b"]: ")
            .s(start.arg(i).unwrap_or(b""))
            .print();
    }

    // The heap: brk(0) is the current break; ask for 1 MiB more.
    // SAFETY: brk(0) only queries.
    let base = unsafe { syscall6(SYS_BRK, [0; 6]) } as usize;
    // SAFETY: growing the break maps fresh memory above it and touches
    // nothing else.
    let top = unsafe { syscall6(SYS_BRK, [base + MIB, 0, 0, 0, 0, 0]) } as usize;
    if top < base + MIB {
        Line::new().s(b"brk: could not grow the heap").print();
        return 1;
    }
    let heap = (base + 7) & !7;
    // SAFETY: [heap, base + MIB) lies in the memory brk just gave us.
    let sum = unsafe { fill_and_sum(heap as *mut u8, base + MIB - heap) };
    Line::new()
        .s(b"brk: heap grown by 1 MiB, every word written, checksum ")
        .hex(sum)
        .print();

    let len = 8 * MIB;
    let Some(p) = mmap_anon(len) else {
        Line::new().s(b"mmap: failed").print();
        return 1;
    };
    // SAFETY: a fresh, page-aligned, writable mapping of `len` bytes.
    let sum = unsafe { fill_and_sum(p, len) };
    // SAFETY: the mapping is used no more.
    unsafe { munmap(p, len) };
    Line::new()
        .s(b"mmap: 8 MiB of fresh memory, ")
        .u((len / PAGE) as u64)
        .s(b" pages, every word written, checksum ")
        .hex(sum)
        .print();
    Line::new().s(b"bye (exit 0)").print();
    0
}

fn bench_getpid(n: u64) -> i32 {
    let n = n.max(1);
    let t0 = now_ns();
    for _ in 0..n {
        getpid();
    }
    let ns = now_ns().wrapping_sub(t0);
    Line::new()
        .s(b"getpid_ns_per_call ")
        .tenths(ns.saturating_mul(10) / n)
        .print();
    0
}

fn bench_touch(mib: u64) -> i32 {
    let len = (mib.max(1) as usize).saturating_mul(MIB);
    let Some(p) = mmap_anon(len) else {
        Line::new().s(b"mmap: failed").print();
        return 1;
    };
    let pages = len / PAGE;
    let t0 = now_ns();
    for i in 0..pages {
        // SAFETY: byte i * PAGE lies inside the fresh writable mapping.
        unsafe { p.add(i * PAGE).write_volatile(1) };
    }
    let ns = now_ns().wrapping_sub(t0);
    // SAFETY: the mapping is used no more.
    unsafe { munmap(p, len) };
    Line::new()
        .s(b"touch_ns_per_page ")
        .tenths(ns.saturating_mul(10) / pages as u64)
        .print();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_format_numbers() {
        let mut l = Line::new();
        l.s(b"n ")
            .u(0)
            .s(b" ")
            .u(1234567890)
            .s(b" ")
            .hex(0xabc)
            .s(b" ")
            .tenths(1234);
        assert_eq!(l.as_bytes(), b"n 0 1234567890 0x0000000000000abc 123.4");
        let mut l = Line::new();
        l.u(u64::MAX);
        assert_eq!(l.as_bytes(), b"18446744073709551615");
    }

    #[test]
    fn a_full_line_truncates() {
        let mut l = Line::new();
        for _ in 0..100 {
            l.s(b"0123456789");
        }
        assert_eq!(l.as_bytes().len(), 512);
    }

    #[test]
    fn numbers_parse() {
        assert_eq!(parse_u64(b"1000"), Some(1000));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"12x"), None);
        assert_eq!(parse_u64(b"99999999999999999999999"), None);
    }
}
