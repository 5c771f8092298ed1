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
