//! The `hello-vmspace` executable: `_start`, the panic handler and the
//! memory functions the compiler may call; everything else is in `app.rs`.
//! Built by build.rs with `-C panic=abort`, linked `-nostdlib -static`.

#![no_std]
#![no_main]

#[path = "app.rs"]
mod app;

// The ELF entry point: the kernel leaves argc at the stack pointer, then
// argv, envp and the auxv. Pass that pointer to `entry` with the stack
// aligned as a call expects; rbp = 0 ends the frame chain.
core::arch::global_asm!(
    ".globl _start",
    ".type _start, @function",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym entry,
);

unsafe extern "C" fn entry(sp: *const usize) -> ! {
    // SAFETY: `sp` is the initial stack pointer the kernel gave `_start`.
    let code = unsafe { app::main(sp) };
    app::exit(code)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    app::write(2, b"hello-vmspace: panic\n");
    app::exit(101)
}

// Without libc, the memory functions the compiler emits calls to are ours.
// They use `rep movsb`/`rep stosb` or volatile loads, never loops the
// optimiser could turn back into calls to themselves.

/// `memcpy`.
///
/// # Safety
///
/// The C contract: `n` bytes valid at both, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: per the C contract; rep movsb copies rcx bytes forwards (the
    // direction flag is clear by the ABI).
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _,
            inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`.
///
/// # Safety
///
/// The C contract: `n` bytes valid at both.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: copying forwards is right when dst is below src or the
        // regions do not overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: dst overlaps src from above: copy backwards from the last
    // byte with the direction flag set, then clear it again.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
            inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
            inout("rcx") n => _, options(nostack));
    }
    dst
}

/// `memset`.
///
/// # Safety
///
/// The C contract: `n` bytes writable at `dst`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: per the C contract; rep stosb stores al rcx times.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
///
/// The C contract: `n` bytes readable at both.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, per the C contract; volatile keeps this a loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// `bcmp`.
///
/// # Safety
///
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
