//! Any panic in any vkrun thread is fatal: a thread of vkrun that died
//! while the guest lives would leave the guest waiting for ever. The hook
//! prints one line (ignoring a closed stderr) and ends vkrun with status
//! 125; the kernel kills the guest and the stubs with it
//! (`PTRACE_O_EXITKILL`, the stubs' parent-death signal).
//!
//! For tests, `VKRUN_TEST_PANIC=KIND` makes the first event of one thread
//! kind panic: `tracer` (the event loop), `hypercall` (a notification),
//! `faults` (a window fault), `trace` (a trace line).

use std::io::Write;
use std::sync::OnceLock;

use super::signal::exit_now;

/// vkrun's status when it fails itself.
const VKRUN_FAILURE: i32 = 125;

/// Install the hook (once per process).
pub fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("a vkrun thread");
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let line =
                format!("vkrun: internal error in {name}: {what}{at}; the guest is killed\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            exit_now(VKRUN_FAILURE);
        }));
    });
}

/// End vkrun for a reason that is not a bug of its own (the guest broke
/// what vkrun relies on): one line, the guest killed, status 125.
pub fn fail(what: &str) -> ! {
    let line = format!("vkrun: {what}; the guest is killed\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    exit_now(VKRUN_FAILURE)
}

/// Panic if the test hook asks for it in a thread of `kind`.
pub fn test_panic_point(kind: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var("VKRUN_TEST_PANIC").ok());
    if wanted.as_deref() == Some(kind) {
        panic!("VKRUN_TEST_PANIC={kind}");
    }
}
