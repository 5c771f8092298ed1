//! futex(2) on words of a `MAP_SHARED` mapping (shared futexes: the agent in
//! the guest and the supervisor map the same memfd page).

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::errno::Errno;

const FUTEX_WAIT: libc::c_int = 0;
const FUTEX_WAKE: libc::c_int = 1;

/// Sleep while `*word == expected`, at most `timeout`. Spurious and early
/// returns are normal; callers re-check their condition.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> Result<(), Errno> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a valid, aligned u32 for the call's duration; `ts`
    // lives on this stack frame.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    match Errno::result(ret) {
        Ok(_) | Err(Errno::EAGAIN | Errno::EINTR | Errno::ETIMEDOUT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Wake one waiter on `word`.
pub fn wake(word: &AtomicU32) -> Result<(), Errno> {
    // SAFETY: `word` is a valid, aligned u32.
    let ret = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), FUTEX_WAKE, 1) };
    Errno::result(ret).map(drop)
}
