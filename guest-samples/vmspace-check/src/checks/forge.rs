//! `agent-forge`: user code in a vmspace keeps storing 0 over the word by
//! which the stub's agent says a batch is done (its response page, at
//! `USER_MAX + 0x103000` where vkrun puts the agent), while another context
//! of the same vmspace touches window pages that vkrun must install, one
//! agent batch each. vkrun must not trust that word: a batch is done when
//! the agent waits for the next one, which the kernel shows. On success:
//!
//! ```text
//! ok agent-forge.attacking   the attacker's stores run (its progress moves)
//! ok agent-forge.installs    every install came back correct within 1 s
//! ```
//!
//! and a `# agent-forge: ...` line with the slowest install. Before vkrun
//! asked the kernel, each install waited 10 s, then the stub was killed.

use std::time::{Duration, Instant};

use vkabi::{T_FAST_SYSCALL, USER_MAX, VPTE_RW, VPTE_U, VextFrame};

use crate::env::{self as e, Env, describe};
use crate::report::{Outcome, Report};
use crate::runner::Runner;
use crate::sys;
use crate::user::Snippet;

/// The agent's `done` word in the stub (region at `USER_MAX + 1 MiB`, the
/// response page 3 pages in).
const AGENT_DONE: u64 = USER_MAX + 0x10_0000 + 0x3000;
const WINDOW_VA: u64 = 0x2000_0000;
const PAGES: u64 = 8;
const BOUND: Duration = Duration::from_secs(1);

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    sys::install_counter(libc::SIGUSR1, true).map_err(|e| format!("sigaction: {e}"))?;
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut pt = env.tables(16)?;
    // The first window sets the stub's agent up.
    let w = env.map_window(&vs, WINDOW_VA, PAGES, 0)?;
    w.setmap(&vs, pt.master())?;
    for page in 0..PAGES {
        let frame = e::frame(&mut pt)?;
        e::map(&mut pt, w.pindex(page), frame, VPTE_RW | VPTE_U)?;
    }

    let mut attacker = Runner::new(vs.id());
    let mut tf = user.frame(Snippet::KickClear);
    tf.tf_rbx = AGENT_DONE;
    tf.tf_rcx = 1;
    tf.tf_r8 = 0;
    tf.tf_rdx = user.data.va(1, 0);
    attacker.start(tf, VextFrame::default())?;
    let attacking = attacker
        .wait_progress(env.ram, user.data.pa(1, 0), 0)
        .map(drop);
    let reached = attacking.is_ok();
    rep.result("attacking", attacking);

    let mut slowest = Duration::ZERO;
    let installs = (|| {
        if !reached {
            return Err("no attack ran".to_owned());
        }
        for page in 0..PAGES {
            // SumPages over one page: rax += [rbx]; [rbx + 8] = rax.
            let mut tf = user.frame(Snippet::SumPages);
            tf.tf_rbx = w.va(page, 0);
            tf.tf_rcx = 1;
            let started = Instant::now();
            vs.run_plain(&mut tf)?;
            let took = started.elapsed();
            slowest = slowest.max(took);
            if tf.tf_trapno != T_FAST_SYSCALL {
                return Err(format!("page {page}: {}", describe(&tf)));
            }
            if took > BOUND {
                return Err(format!("page {page}: the install took {took:?}"));
            }
        }
        Ok(())
    })();
    rep.result("installs", installs);
    println!("# agent-forge: {PAGES} installs under attack, slowest {slowest:?}");

    attacker.signal(libc::SIGUSR1)?;
    attacker
        .wait_end_for(Duration::from_secs(10))?
        .ok_or("the attacker's RUN did not end for a signal")?;
    Ok(())
}
