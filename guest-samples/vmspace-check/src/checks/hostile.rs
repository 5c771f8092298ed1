//! `hostile-stub`: user code in a vmspace writes what it can reach of
//! vkrun's pages above `USER_MAX` in its stub: the agent's resolver page
//! (a forged install record `{va = 0xffff_ffff_ffff_0000, len = 0x20000}`,
//! ring counters with head = tail - 1, the shared lock word held). A stub
//! has no resolver, so vkrun must ignore all of it: the next fault, RUN and
//! `vmspace_mcontrol` answer at once. On success:
//!
//! ```text
//! ok hostile-stub.writes      each store ran (or faulted: the page is not writable)
//! ok hostile-stub.fault       a fault in the window is T_PAGEFLT, within 1 s
//! ok hostile-stub.mcontrol    MADV_INVAL of the window, within 1 s
//! ok hostile-stub.run         a syscall RUN, within 1 s
//! ```

use std::time::{Duration, Instant};

use vkabi::{MADV_INVAL, PAGE_SIZE, T_FAST_SYSCALL, T_PAGEFLT, USER_MAX};

use crate::env::{Env, describe};
use crate::report::{Outcome, Report, trap};
use crate::user::Snippet;

/// Where vkrun puts a stub's agent, and its resolver page (the sixth).
const AGENT: u64 = USER_MAX + 0x10_0000;
const RESOLVER: u64 = AGENT + 5 * PAGE_SIZE;
/// Where the window goes.
const WIN_VA: u64 = 0x2000_0000;
/// How long any answer may take.
const BOUND: Duration = Duration::from_secs(1);

fn within(started: Instant, what: &str) -> Result<(), String> {
    let took = started.elapsed();
    if took <= BOUND {
        Ok(())
    } else {
        Err(format!("{what} took {took:?}"))
    }
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let pt = env.tables(16)?;
    let w = env.map_window(&vs, WIN_VA, 4, 0)?;
    w.setmap(&vs, pt.master())?;
    // (offset in the resolver page, 8 bytes to store there)
    let forgeries: [(u64, u64); 4] = [
        (0x800, 0xffff_ffff_ffff_0000), // install record: va
        (0x808, 0x2_0000),              // install record: len
        (0x030, 5 | 6 << 32),           // install head 5, tail 6: head = tail - 1
        (0x000, 1),                     // the shared lock, held
    ];
    let mut wrong = None;
    for (off, value) in forgeries {
        let mut tf = user.frame(Snippet::Store);
        tf.tf_rbx = RESOLVER + off;
        tf.tf_rdx = value;
        vs.run_plain(&mut tf)?;
        if tf.tf_trapno != T_FAST_SYSCALL && tf.tf_trapno != T_PAGEFLT {
            wrong.get_or_insert(format!("store at +{off:#x}: {}", describe(&tf)));
        }
    }
    rep.result("writes", wrong.map_or(Ok(()), Err));

    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = w.va(0, 0);
    let started = Instant::now();
    vs.run_plain(&mut tf)?;
    rep.result(
        "fault",
        trap(&tf, T_PAGEFLT, None).and_then(|()| within(started, "the fault's RUN")),
    );

    let started = Instant::now();
    let r = vs.mcontrol(w.va(0, 0), 4 * PAGE_SIZE, MADV_INVAL, 0);
    rep.result(
        "mcontrol",
        r.map_err(|e| format!("MADV_INVAL: {e:?}"))
            .and_then(|()| within(started, "vmspace_mcontrol")),
    );

    let mut tf = user.frame(Snippet::Syscall);
    tf.tf_rax = 39;
    let started = Instant::now();
    vs.run_plain(&mut tf)?;
    rep.result(
        "run",
        trap(&tf, T_FAST_SYSCALL, None).and_then(|()| within(started, "a syscall RUN")),
    );
    Ok(())
}
