//! `hostile-scribble`: user code in a vmspace stores random and crafted
//! values (0, 1, all ones, wrapped counters, huge lengths, addresses of
//! vkrun's own pages) at random places in every page of the 2 MiB above
//! `USER_MAX` in its stub (vkrun's stub code and data, the execution
//! contexts' blocks, the agent), one store a RUN, seeded, while another
//! guest thread RUNs and demand-pages a second vmspace. The attacked
//! vmspace may break (its RUNs then fail with `EIO`, and the attack goes on
//! in a fresh one), nothing else may. On success:
//!
//! ```text
//! ok hostile-scribble.bounded    every RUN of the attacker returned within 7 s
//! ok hostile-scribble.outcomes   each was a store (T_FAST_SYSCALL after it), a
//!                                fault (T_PAGEFLT: the page is not writable
//!                                or not mapped), another trap of the ABI, or EIO
//! ok hostile-scribble.bystander  the other vmspace's RUNs were all correct
//! ok hostile-scribble.guest      the guest's own hypercalls still work
//! ```
//!
//! and a `# hostile-scribble: ...` line with the counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vkabi::hypercall::{self, Errno};
use vkabi::{PAGE_SIZE, T_FAST_SYSCALL, T_PAGEFLT, USER_MAX};

use crate::env::{Env, describe};
use crate::report::{Outcome, Report, errno_text, trap};
use crate::user::Snippet;

/// The pages attacked: the ABI's reserved 2 MiB above `USER_MAX`.
const PAGES: u64 = 512;
/// Stores per page.
const STORES: u64 = 8;
/// How long one RUN may take (vkrun gives a stuck context 5 s).
const BOUND: Duration = Duration::from_secs(7);
const SEED: u64 = 0x5c41_bb1e;

/// xorshift64*.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn value(rng: &mut u64) -> u64 {
    let r = next(rng);
    match r % 8 {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => 0xffff_ffff,
        4 => (r >> 32) | 0xffff_fff0,  // a counter about to wrap
        5 => USER_MAX + (r >> 40) * 8, // somewhere in vkrun's pages
        6 => 1 << 40,                  // a huge length
        _ => next(rng),
    }
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    // The bystander: another vmspace, RUN from another thread, demand
    // paging its data pages (SumPages) and making system calls.
    let other = env.vmspace()?;
    let other_user = env.user(&other)?;
    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let stop = Arc::clone(&stop);
        let (sum, sys) = (
            other_user.frame(Snippet::SumPages),
            other_user.frame(Snippet::Syscall),
        );
        let data = other_user.data.va(0, 0);
        let id = other.id();
        std::thread::spawn(move || -> Result<u64, String> {
            let mut runs = 0u64;
            // One RUN that must come back at its `syscall`.
            let run = |mut tf: vkabi::TrapFrame| -> Result<(), String> {
                let mut vf = vkabi::VextFrame::default();
                hypercall::vmspace_ctl(id, vkabi::VMSPACE_CTL_RUN, &mut tf, &mut vf)
                    .map_err(|e| format!("bystander RUN: {}", errno_text(e)))?;
                trap(&tf, T_FAST_SYSCALL, None).map_err(|e| format!("bystander: {e}"))
            };
            while !stop.load(Ordering::Relaxed) {
                run(vkabi::TrapFrame {
                    tf_rbx: data,
                    tf_rcx: 2,
                    ..sum
                })?;
                run(vkabi::TrapFrame { tf_rax: 39, ..sys })?;
                runs += 2;
            }
            Ok(runs)
        })
    };

    let mut rng = SEED;
    let (mut stored, mut faulted, mut other_traps, mut eio) = (0u64, 0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    let mut odd = None;
    let mut vs = env.vmspace()?;
    let mut user = env.user(&vs)?;
    for page in 0..PAGES {
        for _ in 0..STORES {
            // Half of them among the first words of a page, where a
            // context block keeps its state, counters and report.
            let r = next(&mut rng);
            let within = if r.is_multiple_of(2) {
                0x300
            } else {
                PAGE_SIZE
            };
            let addr = USER_MAX + page * PAGE_SIZE + (((r >> 1) % within) & !7);
            let mut tf = user.frame(Snippet::Store);
            tf.tf_rbx = addr;
            tf.tf_rdx = value(&mut rng);
            let mut vf = vkabi::VextFrame::default();
            let started = Instant::now();
            let r = vs.run(&mut tf, &mut vf);
            slowest = slowest.max(started.elapsed());
            match r {
                Ok(()) if tf.tf_trapno == T_FAST_SYSCALL => stored += 1,
                Ok(()) if tf.tf_trapno == T_PAGEFLT => faulted += 1,
                Ok(()) if tf.tf_trapno <= 30 => other_traps += 1,
                Ok(()) => {
                    odd.get_or_insert(format!("store at {addr:#x}: {}", describe(&tf)));
                }
                Err(Errno(libc::EIO)) => {
                    // The attacked stub broke: go on in a fresh vmspace.
                    eio += 1;
                    vs = env.vmspace()?;
                    user = env.user(&vs)?;
                }
                Err(e) => {
                    odd.get_or_insert(format!(
                        "store at {addr:#x}: RUN failed with {}",
                        errno_text(e)
                    ));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let bystander = bystander.join().map_err(|_| "the bystander panicked")?;
    println!(
        "# hostile-scribble: {} stores RUN: {stored} stored, {faulted} T_PAGEFLT, {other_traps} other traps, {eio} EIO; slowest {slowest:?}; bystander {:?}",
        PAGES * STORES,
        bystander
    );
    rep.result(
        "bounded",
        if slowest <= BOUND {
            Ok(())
        } else {
            Err(format!("a RUN took {slowest:?}"))
        },
    );
    rep.result("outcomes", odd.map_or(Ok(()), Err));
    rep.result(
        "bystander",
        bystander.and_then(|runs| {
            if runs > 0 {
                Ok(())
            } else {
                Err("no bystander RUN".to_owned())
            }
        }),
    );
    rep.result(
        "guest",
        hypercall::vk_info()
            .map(drop)
            .map_err(|e| format!("vk_info: {}", errno_text(e))),
    );
    Ok(())
}
