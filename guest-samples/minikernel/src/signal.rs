//! Signals of the user process, delivered as Linux delivers them: a
//! `struct rt_sigframe` (return address, `ucontext`, `siginfo`, FPU area)
//! on the user stack or the alternate stack, the handler entered with
//! `(sig, &info, &uc)`, and `rt_sigreturn` restoring registers, mask and
//! alternate stack from that frame.
//!
//! Where signals come from:
//!
//! - the host: every signal the user program catches gets a host handler
//!   on the minikernel ([`host_handler`]) that records its `siginfo`
//!   (SIGCHLD with its `si_status`, a `kill` from another process, SIGALRM
//!   of `alarm`/`setitimer`, SIGPIPE of a write). The minikernel's host
//!   signal mask mirrors the user's mask ([`set_host_mask`]), so the host
//!   kernel keeps blocked signals pending as Linux would; a signal that
//!   arrives during RUN makes RUN return (`T_SIGNAL` or `EINTR`), one that
//!   arrives during a forwarded blocking call makes it fail with `EINTR`;
//! - the process itself (`kill`/`tkill`/`tgkill` of itself): queued here;
//! - faults and traps of the user code (SIGSEGV with `si_addr`, SIGILL,
//!   SIGFPE, SIGTRAP, SIGBUS): [`force`].
//!
//! [`deliver`] runs before every RUN: the first pending signal the user
//! mask lets through gets its action (a handler frame, ignore, stop, or
//! the end of the process).
//!
//! The FPU state lives in the vmspace's execution context (ABI section 7)
//! and is not in the frame the minikernel sees, so the frame's FPU area is
//! a valid but default `fxsave` image, and `rt_sigreturn` does not restore
//! FPU registers.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::kernel::{Exit, Kernel, Proc};

/// `SA_*` flags (Linux x86-64).
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTART: u64 = 0x1000_0000;
pub const SA_NODEFER: u64 = 0x4000_0000;
pub const SA_RESETHAND: u64 = 0x8000_0000;
pub const SA_RESTORER: u64 = 0x0400_0000;

/// `SS_*` flags of `sigaltstack`.
pub const SS_ONSTACK: u64 = 1;
pub const SS_DISABLE: u64 = 2;

/// `si_code` values.
pub const SI_USER: i32 = 0;
pub const SI_KERNEL: i32 = 0x80;
pub const SI_TKILL: i32 = -6;

/// The bit of signal `sig` in a mask.
pub const fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// Signals never blocked or caught.
const UNBLOCKABLE: u64 = bit(libc::SIGKILL) | bit(libc::SIGSTOP);

/// Signals raised by faults of the user code; the minikernel's own stay
/// with the host's default action (a fault of the minikernel must end it).
const SYNCHRONOUS: u64 = bit(libc::SIGSEGV)
    | bit(libc::SIGBUS)
    | bit(libc::SIGILL)
    | bit(libc::SIGFPE)
    | bit(libc::SIGTRAP);

/// Signals whose default action is to do nothing.
const DEFAULT_IGNORE: u64 =
    bit(libc::SIGCHLD) | bit(libc::SIGURG) | bit(libc::SIGWINCH) | bit(libc::SIGCONT);

/// Signals whose default action is to stop the process.
const DEFAULT_STOP: u64 =
    bit(libc::SIGSTOP) | bit(libc::SIGTSTP) | bit(libc::SIGTTIN) | bit(libc::SIGTTOU);

/// Signals recorded for the host thread (the guest thread) they arrived
/// on, not yet delivered, with their `siginfo` (128 bytes, as 16 words):
/// host ones recorded by [`host_handler`] (the host picked this thread for
/// a process signal, or a `tgkill` named it), the thread's own `kill`s.
struct Slots {
    pending: AtomicU64,
    info: [[AtomicU64; 16]; 64],
}

thread_local! {
    // Constant-initialised and without a destructor: usable in a signal
    // handler.
    static SLOTS: Slots = const {
        Slots {
            pending: AtomicU64::new(0),
            info: [const { [const { AtomicU64::new(0) }; 16] }; 64],
        }
    };
}

/// The host handler for signals the user program catches: record the
/// signal and its `siginfo` (only atomics: async-signal-safe).
extern "C" fn host_handler(sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if !(1..=64).contains(&sig) {
        return;
    }
    let mut words = [0u64; 16];
    if !info.is_null() {
        // SAFETY: the kernel passes a valid 128-byte siginfo to an
        // SA_SIGINFO handler; it is only read here.
        unsafe { std::ptr::copy_nonoverlapping(info.cast::<u64>(), words.as_mut_ptr(), 16) };
    }
    queue(sig, &words);
}

/// Queue `sig` for the calling thread with `siginfo` words `info`.
pub fn queue(sig: i32, info: &[u64; 16]) {
    SLOTS.with(|s| {
        for (slot, w) in s.info[sig as usize - 1].iter().zip(info) {
            slot.store(*w, Ordering::Relaxed);
        }
        s.pending.fetch_or(bit(sig), Ordering::SeqCst);
    });
}

/// A `siginfo` for `sig` with `si_code` `code` sent by this process.
pub fn user_info(sig: i32, code: i32) -> [u64; 16] {
    let mut w = [0u64; 16];
    w[0] = sig as u32 as u64;
    w[1] = code as u32 as u64;
    // SAFETY: getpid and getuid cannot fail.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    w[2] = pid as u32 as u64 | (u64::from(uid) << 32);
    w
}

/// Signals queued for the calling thread and not delivered yet.
pub fn pending() -> u64 {
    SLOTS.with(|s| s.pending.load(Ordering::SeqCst))
}

/// Forget every pending signal (a forked child starts with none).
pub fn clear_pending() {
    SLOTS.with(|s| s.pending.store(0, Ordering::SeqCst));
}

/// Take `sig` off the calling thread's queue: its `siginfo`.
pub fn take(sig: i32) -> [u64; 16] {
    SLOTS.with(|s| {
        s.pending.fetch_and(!bit(sig), Ordering::SeqCst);
        let mut info = [0u64; 16];
        for (w, slot) in info.iter_mut().zip(&s.info[sig as usize - 1]) {
            *w = slot.load(Ordering::Relaxed);
        }
        info
    })
}

/// Set the minikernel's host mask to the user mask `mask` (never the
/// signals of its own faults).
pub fn set_host_mask(mask: u64) {
    let m = mask & !SYNCHRONOUS & !UNBLOCKABLE;
    // SAFETY: rt_sigprocmask with an 8-byte set of this function's own.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &m as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
}

/// Give `sig` on the host the disposition that matches the user's
/// `handler`: ignored stays ignored, a default stays the host's default (so
/// a fatal or stopping signal from outside acts on the minikernel as on the
/// program), a handler gets [`host_handler`] (without `SA_RESTART`: the
/// minikernel decides about restarting).
pub fn set_host_action(sig: i32, handler: u64) {
    if !(1..=64).contains(&sig) || bit(sig) & (UNBLOCKABLE | SYNCHRONOUS) != 0 {
        return;
    }
    // Signals 32 and 33 belong to the host C library's threads.
    if sig == 32 || sig == 33 {
        return;
    }
    let host = match handler {
        0 => libc::SIG_DFL,
        1 => libc::SIG_IGN,
        _ => host_handler as *const () as usize,
    };
    // SAFETY: installs SIG_DFL, SIG_IGN or host_handler, which only
    // touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = host;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigfillset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// What to do with a system call that the host interrupted (`EINTR`) when
/// a signal is to be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Restarted after a handler with `SA_RESTART`, else `EINTR`
    /// (Linux's `ERESTARTSYS`).
    Sys,
    /// `EINTR` after a handler, restarted otherwise (`ERESTARTNOHAND`).
    NoHand,
}

/// How Linux restarts system call `nr` interrupted by a signal.
pub fn restart_kind(nr: u64) -> Restart {
    match nr {
        // read write readv writev pread pwrite ioctl fcntl flock wait4
        // waitid open openat futex(no timeout: the caller checks) sendfile
        // preadv pwritev accept connect recvfrom sendto recvmsg sendmsg
        0 | 1 | 19 | 20 | 17 | 18 | 16 | 72 | 73 | 61 | 247 | 2 | 257 | 202 | 40 | 295 | 296
        | 43 | 42 | 44 | 45 | 46 | 47 | 288 => Restart::Sys,
        _ => Restart::NoHand,
    }
}

/// The action of the first deliverable signal, for restart decisions:
/// `Some(flags)` when a handler will run.
pub fn next_handler(p: &Proc) -> Option<u64> {
    let ready = pending() & !p.sig.mask;
    if ready == 0 {
        return None;
    }
    let sig = ready.trailing_zeros() as usize + 1;
    let act = p.sig.actions[sig - 1];
    (act[0] > 1).then_some(act[1])
}

/// Deliver the first pending signal the mask lets through; `Some(exit)`
/// when it ends the process. Called before each RUN (and repeatedly: one
/// signal per call, as each handler frame stacks on the previous).
pub fn deliver(k: &mut Kernel, p: &mut Proc) -> Option<Exit> {
    let exit = deliver_one(k, p);
    // `rt_sigsuspend` ended without a handler frame to restore its mask.
    if let Some(mask) = p.sig.saved_mask.take() {
        set_mask(p, mask);
    }
    exit
}

fn deliver_one(k: &mut Kernel, p: &mut Proc) -> Option<Exit> {
    for _ in 0..64 {
        let ready = pending() & !p.sig.mask;
        if ready == 0 {
            return None;
        }
        let sig = ready.trailing_zeros() as i32 + 1;
        let info = take(sig);
        let act = p.sig.actions[sig as usize - 1];
        match act[0] {
            1 => continue,
            0 => {
                if let Some(exit) = default_action(sig) {
                    return Some(exit);
                }
            }
            _ => {
                if let Err(exit) = frame(k, p, sig, &info, act) {
                    return Some(exit);
                }
                // One handler frame at a time: the next signal (if any)
                // is delivered on top of it at the next check.
                return None;
            }
        }
    }
    None
}

/// The default action of `sig`: nothing, a stop (the host stops the
/// minikernel), or the end of the process.
fn default_action(sig: i32) -> Option<Exit> {
    if bit(sig) & DEFAULT_IGNORE != 0 {
        return None;
    }
    if bit(sig) & DEFAULT_STOP != 0 {
        // SAFETY: stops this process until a SIGCONT.
        unsafe { libc::raise(libc::SIGSTOP) };
        return None;
    }
    Some(Exit::Signal(sig))
}

/// A signal raised by the user code's trap or fault: delivered at once to
/// its handler; when it is blocked or ignored (or has no handler) the
/// process dies of it, as Linux's `force_sig` does.
pub fn force(k: &mut Kernel, p: &mut Proc, sig: i32, code: i32, addr: u64) -> Option<Exit> {
    let act = p.sig.actions[sig as usize - 1];
    if act[0] <= 1 || p.sig.mask & bit(sig) != 0 {
        return Some(Exit::Signal(sig));
    }
    let mut info = [0u64; 16];
    info[0] = sig as u32 as u64;
    info[1] = code as u32 as u64;
    info[2] = addr;
    frame(k, p, sig, &info, act).err()
}

/// Size of the FPU area in the frame (`fxsave` format).
const FPSTATE: u64 = 512;
/// `struct ucontext` (kernel layout): flags, link, stack_t (24), sigcontext
/// (256), sigset (8).
const UCONTEXT: usize = 8 + 8 + 24 + 256 + 8;
/// Offset of `uc_mcontext` in `struct ucontext`.
const MCONTEXT: usize = 40;
/// Offset of `uc_sigmask`.
const SIGMASK: usize = MCONTEXT + 256;

/// Build the handler frame for `sig` with `info` and action `act`
/// (handler, flags, restorer, mask) and point the registers at the
/// handler. A frame that cannot be written kills with SIGSEGV.
fn frame(
    k: &mut Kernel,
    p: &mut Proc,
    sig: i32,
    info: &[u64; 16],
    act: [u64; 4],
) -> Result<(), Exit> {
    let [handler, flags, restorer, sa_mask] = act;
    if flags & SA_RESTORER == 0 {
        return Err(Exit::Signal(libc::SIGSEGV));
    }
    let tf = p.tf;
    let [ss_sp, ss_flags, ss_size] = p.sig.altstack;
    let on_alt = ss_flags & SS_DISABLE == 0 && tf.tf_rsp.wrapping_sub(ss_sp) < ss_size;
    let mut sp = tf.tf_rsp.wrapping_sub(128);
    if flags & SA_ONSTACK != 0 && ss_flags & SS_DISABLE == 0 && !on_alt {
        sp = ss_sp.wrapping_add(ss_size);
    }
    let fp = sp.wrapping_sub(FPSTATE) & !63;
    let size = (8 + UCONTEXT + 128) as u64;
    let base = (fp.wrapping_sub(size) & !15).wrapping_sub(8);

    let mut f = vec![0u8; size as usize];
    let put = |f: &mut [u8], at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 0, restorer);
    let uc = 8;
    put(&mut f, uc, 0x6); // UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    put(&mut f, uc + 16, ss_sp);
    put(
        &mut f,
        uc + 24,
        if ss_flags & SS_DISABLE != 0 {
            SS_DISABLE
        } else if on_alt {
            SS_ONSTACK
        } else {
            0
        },
    );
    put(&mut f, uc + 32, ss_size);
    let m = uc + MCONTEXT;
    let regs = [
        tf.tf_r8,
        tf.tf_r9,
        tf.tf_r10,
        tf.tf_r11,
        tf.tf_r12,
        tf.tf_r13,
        tf.tf_r14,
        tf.tf_r15,
        tf.tf_rdi,
        tf.tf_rsi,
        tf.tf_rbp,
        tf.tf_rbx,
        tf.tf_rdx,
        tf.tf_rax,
        tf.tf_rcx,
        tf.tf_rsp,
        tf.tf_rip,
        tf.tf_rflags,
    ];
    for (i, r) in regs.iter().enumerate() {
        put(&mut f, m + i * 8, *r);
    }
    put(&mut f, m + 18 * 8, 0x33 | (0x2b << 48)); // cs, gs, fs, ss
    let fault = tf.tf_trapno != vkabi::T_FAST_SYSCALL && tf.tf_trapno != vkabi::T_SIGNAL;
    if fault {
        put(&mut f, m + 19 * 8, tf.tf_err);
        put(&mut f, m + 20 * 8, linux_trapno(tf.tf_trapno));
        put(&mut f, m + 22 * 8, tf.tf_addr);
    }
    // The mask to restore: the one before `rt_sigsuspend`, if it waited.
    let restore = p.sig.saved_mask.take().unwrap_or(p.sig.mask);
    put(&mut f, m + 21 * 8, restore); // oldmask
    put(&mut f, m + 23 * 8, fp);
    put(&mut f, uc + SIGMASK, restore);
    let si = 8 + UCONTEXT;
    for (i, w) in info.iter().enumerate() {
        put(&mut f, si + i * 8, *w);
    }
    let mut fx = vec![0u8; FPSTATE as usize];
    fx[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // fcw
    fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // mxcsr
    fx[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // mxcsr_mask
    if !p.mm.write(&k.ram, &mut k.frames, fp, &fx) || !p.mm.write(&k.ram, &mut k.frames, base, &f) {
        return Err(Exit::Signal(libc::SIGSEGV));
    }

    let mut mask = p.sig.mask | sa_mask;
    if flags & SA_NODEFER == 0 {
        mask |= bit(sig);
    }
    set_mask(p, mask);
    if flags & SA_RESETHAND != 0 {
        p.sig.actions[sig as usize - 1] = [0; 4];
        set_host_action(sig, 0);
    }
    p.tf.tf_rip = handler;
    p.tf.tf_rsp = base;
    p.tf.tf_rdi = sig as u64;
    p.tf.tf_rsi = base + si as u64;
    p.tf.tf_rdx = base + uc as u64;
    p.tf.tf_rax = 0;
    // Clear DF, TF, RF and AC for the handler, as Linux does.
    p.tf.tf_rflags &= !(0x400 | 0x100 | 0x1_0000 | 0x4_0000);
    Ok(())
}

/// The x86 exception vector of DragonFly trap `t` (what `REG_TRAPNO` shows).
fn linux_trapno(t: u64) -> u64 {
    match t {
        vkabi::T_PAGEFLT => 14,
        vkabi::T_PRIVINFLT => 6,
        vkabi::T_BPTFLT => 3,
        vkabi::T_DIVIDE => 0,
        vkabi::T_PROTFLT => 13,
        vkabi::T_ALIGNFLT => 17,
        vkabi::T_XMMFLT => 19,
        vkabi::T_ARITHTRAP => 16,
        vkabi::T_TRCTRAP => 1,
        _ => t,
    }
}

/// Set the user mask (and the host's mirror of it).
pub fn set_mask(p: &mut Proc, mask: u64) {
    p.sig.mask = mask & !UNBLOCKABLE;
    set_host_mask(p.sig.mask);
}

/// `rt_sigreturn`: restore the registers, mask and alternate stack saved
/// in the frame at `rsp - 8`. `Err` kills with SIGSEGV (a bad frame).
pub fn sigreturn(k: &mut Kernel, p: &mut Proc) -> Result<(), Exit> {
    let uc = p.tf.tf_rsp; // the handler's `ret` popped the return address
    let mut b = vec![0u8; UCONTEXT];
    if !p.mm.read(&k.ram, &mut k.frames, uc, &mut b) {
        return Err(Exit::Signal(libc::SIGSEGV));
    }
    let w = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    let m = MCONTEXT;
    let r = |i: usize| w(m + i * 8);
    let tf = &mut p.tf;
    (tf.tf_r8, tf.tf_r9, tf.tf_r10, tf.tf_r11) = (r(0), r(1), r(2), r(3));
    (tf.tf_r12, tf.tf_r13, tf.tf_r14, tf.tf_r15) = (r(4), r(5), r(6), r(7));
    (tf.tf_rdi, tf.tf_rsi, tf.tf_rbp, tf.tf_rbx) = (r(8), r(9), r(10), r(11));
    (tf.tf_rdx, tf.tf_rax, tf.tf_rcx, tf.tf_rsp) = (r(12), r(13), r(14), r(15));
    tf.tf_rip = r(16);
    // The user-changeable flags (Linux's FIX_EFLAGS); RUN sanitises again.
    tf.tf_rflags = (tf.tf_rflags & !0x5_0dd5) | (r(17) & 0x5_0dd5);
    set_mask(p, w(SIGMASK));
    let (ss_sp, ss_flags, ss_size) = (w(16), w(24) & 0xffff_ffff, w(32));
    if !(p.sig.altstack[1] & SS_DISABLE == 0
        && p.tf.tf_rsp.wrapping_sub(p.sig.altstack[0]) < p.sig.altstack[2])
    {
        // Not running on the alternate stack: take the saved one back.
        if ss_flags & SS_DISABLE != 0 {
            p.sig.altstack = [0, SS_DISABLE, 0];
        } else if ss_flags & !SS_ONSTACK == 0 {
            p.sig.altstack = [ss_sp, 0, ss_size];
        }
    }
    Ok(())
}
