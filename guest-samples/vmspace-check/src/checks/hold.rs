//! `hold-run` and `exit-running`: user code spinning inside RUN in two
//! vmspaces, one runner thread each, for the end-to-end tests that kill the
//! guest or vkrun meanwhile (or let the guest exit) and then look for
//! leftover `vkrun-vmspace` stubs. Prints `running PID` once both spin.

use std::io::Write;

use vkabi::VextFrame;

use crate::env::Env;
use crate::runner::Runner;
use crate::user::Snippet;

/// Start both RUNs and print `running PID`; the vmspaces and runner
/// threads are left running (the caller blocks or exits).
pub fn run(env: &mut Env) -> Result<(), String> {
    for _ in 0..2 {
        let vs = env.vmspace()?;
        let user = env.user(&vs)?;
        let mut runner = Runner::new(vs.id());
        let mut tf = user.frame(Snippet::Spin);
        tf.tf_rbx = user.data.va(0, 0);
        runner.start(tf, VextFrame::default())?;
        runner.wait_progress(env.ram, user.data.pa(0, 0), 0)?;
        // Both stay as they are until the process ends.
        std::mem::forget(runner);
        vs.leak();
    }
    println!("running {}", std::process::id());
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))
}

/// `stub-death`: RUN spinning user code, print `running PID`, and wait for
/// that RUN to end: the test kills the vmspace's host process meanwhile,
/// and RUN must then fail (`EIO`) instead of hanging. Prints
/// `run ended: ERRNO` (or how it ended otherwise).
pub fn stub_death(env: &mut Env) -> Result<(), String> {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut runner = Runner::new(vs.id());
    let mut tf = user.frame(Snippet::Spin);
    tf.tf_rbx = user.data.va(0, 0);
    runner.start(tf, VextFrame::default())?;
    runner.wait_progress(env.ram, user.data.pa(0, 0), 0)?;
    println!("running {}", std::process::id());
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    let end = runner
        .wait_end_for(std::time::Duration::from_secs(60))?
        .ok_or("RUN still running after 60 s")?;
    match end.result {
        Err(e) => println!("run ended: {}", crate::report::errno_text(e)),
        Ok(()) => println!("run ended: 0, trapno {:#x}", end.tf.tf_trapno),
    }
    vs.leak();
    Ok(())
}

/// Where `hold-window` puts its window.
pub const HOLD_WINDOW_VA: u64 = 0x1000_0000;
/// Pages of that window.
pub const HOLD_WINDOW_PAGES: u64 = 8;

/// `hold-window`: a vmspace with a window of [`HOLD_WINDOW_PAGES`] pages at
/// [`HOLD_WINDOW_VA`], of which only page 2 has a valid VPTE; user code
/// stores to page 2 (a fault the host resolves) and then to page 5 (its
/// walk fails: `T_PAGEFLT`). Prints `window STUB-VA PAGES` once both ran;
/// the vmspace is kept for the test, which reads the stub's mappings.
pub fn window(env: &mut Env) -> Result<(), String> {
    use crate::env::{self as e, describe};
    use vkabi::{T_FAST_SYSCALL, T_PAGEFLT, VPTE_RW, VPTE_U};
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut pt = env.tables(16)?;
    let w = env.map_window(&vs, HOLD_WINDOW_VA, HOLD_WINDOW_PAGES, 0)?;
    w.setmap(&vs, pt.master())?;
    let frame = e::frame(&mut pt)?;
    e::map(&mut pt, w.pindex(2), frame, VPTE_RW | VPTE_U)?;
    // SumPages over one page: rax += [rbx]; [rbx + 8] = rax.
    for (page, want) in [(2, T_FAST_SYSCALL), (5, T_PAGEFLT)] {
        let mut tf = user.frame(Snippet::SumPages);
        tf.tf_rbx = w.va(page, 0);
        tf.tf_rcx = 1;
        vs.run_plain(&mut tf)?;
        if tf.tf_trapno != want {
            return Err(format!("page {page}: {}", describe(&tf)));
        }
    }
    println!("window {HOLD_WINDOW_VA:#x} {HOLD_WINDOW_PAGES}");
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    vs.leak();
    Ok(())
}
