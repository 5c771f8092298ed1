//! `kick-ignore`: user code in a vmspace that ignores vkrun's kick, the
//! signal vkrun sends an execution context to end a RUN when a signal
//! arrives for the guest thread (ABI section 7). Three attacks, each in a
//! vmspace of its own; the user code knows vkrun's stub layout (as anyone
//! who reads vkrun's source does) and finds its code by copying it out:
//!
//! - `blocked`: a forged `rt_sigreturn` through the context handler's own
//!   system call instruction, with a frame whose signal mask blocks the
//!   kick, into a spin loop;
//! - `cleared`: a loop that keeps storing 0 in every context's kick word;
//! - `wait-loop`: a jump into the handler's wait-for-GO loop.
//!
//! For each, a signal is sent to the guest thread inside RUN and, while the
//! RUN is still in flight, another guest thread forks and RUNs another
//! vmspace. On success:
//!
//! ```text
//! ok kick-ignore.ATTACK.started      the user code ran the attack
//! ok kick-ignore.ATTACK.bounded      the RUN ended within 7 s of the signal:
//!                                    0 with T_SIGNAL, or EIO (vkrun gave up
//!                                    on the context after its 5 s bound)
//! ok kick-ignore.ATTACK.others-go-on meanwhile a fork and a RUN in another
//!                                    vmspace each took under 100 ms
//! ```
//!
//! and a `# kick-ignore ATTACK: ...` line with the times measured.

use std::time::{Duration, Instant};

use vkabi::hypercall::Errno;
use vkabi::{PAGE_SIZE, T_FAST_SYSCALL, T_SIGNAL, TrapFrame, USER_MAX, VextFrame};

use crate::env::{Env, User, describe};
use crate::report::{Outcome, Report, errno_text, trap};
use crate::runner::Runner;
use crate::sys;
use crate::user::Snippet;

/// vkrun's stub layout: its code, and its execution contexts' blocks.
const STUB_BASE: u64 = USER_MAX + 0x1_0000;
const STUB_CODE_LEN: u64 = 2 * PAGE_SIZE;
const CONTEXTS: u64 = STUB_BASE + 0x1_0000;
const CTX_SIZE: u64 = 0x4000;
const MAX_CONTEXTS: u64 = 56;
const CX_KICK: u64 = 8;
/// `mov eax, 15` (rt_sigreturn); `jmp` back to the handler's `syscall`.
const RESTORER: [u8; 7] = [0xb8, 0x0f, 0x00, 0x00, 0x00, 0xeb, 0xf6];
/// The handler's wait loop: `mov eax, [r15]` (state); `cmp eax, 1` (GO); `je`.
const WAIT_LOOP: [u8; 7] = [0x41, 0x8b, 0x07, 0x83, 0xf8, 0x01, 0x74];

/// How long after the signal the RUN must have ended: vkrun's bound for a
/// kicked context (5 s) and slack.
const BOUND: Duration = Duration::from_secs(7);
/// How long another thread's fork or RUN may take meanwhile.
const OTHERS: Duration = Duration::from_millis(100);

/// Where the forged signal frame goes in the data pages (page 0, past the
/// progress word).
const FRAME_OFF: u64 = 0x400;

#[derive(Clone, Copy, Debug)]
enum Attack {
    Blocked,
    Cleared,
    WaitLoop,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::Blocked => "blocked",
            Attack::Cleared => "cleared",
            Attack::WaitLoop => "wait-loop",
        }
    }
}

/// Offsets of the attacks' targets in the stub's code.
struct Gadgets {
    restorer: u64,
    wait_loop: u64,
}

fn find(code: &[u8], pattern: &[u8]) -> Option<u64> {
    code.windows(pattern.len())
        .position(|w| w == pattern)
        .map(|at| at as u64)
}

/// Copy the stub's code out through user code and find the gadgets.
fn gadgets(env: &Env, user: &User, vs: &crate::env::Vmspace) -> Result<Gadgets, String> {
    let mut tf = user.frame(Snippet::Copy);
    tf.tf_rsi = STUB_BASE;
    tf.tf_rdi = user.data.va(1, 0);
    tf.tf_rcx = STUB_CODE_LEN;
    vs.run_plain(&mut tf)?;
    trap(&tf, T_FAST_SYSCALL, None).map_err(|e| format!("copying the stub's code: {e}"))?;
    let code = env.read_bytes(user.data.pa(1, 0), STUB_CODE_LEN as usize);
    let restorer = find(&code, &RESTORER).ok_or("no rt_sigreturn gadget in the stub's code")?;
    let wait_loop = find(&code, &WAIT_LOOP).ok_or("no wait loop in the stub's code")?;
    Ok(Gadgets {
        restorer: STUB_BASE + restorer,
        wait_loop: STUB_BASE + wait_loop,
    })
}

/// A `ucontext` for `rt_sigreturn`: registers that start `Spin` with the
/// progress word at `progress`, and a signal mask that blocks the kick.
fn forged_frame(user: &User, progress: u64) -> [u64; 38] {
    let mut uc = [0u64; 38];
    // uc_flags, uc_link, uc_stack (3 words: a bad stack, ignored), then
    // the gregs at word 5 (byte 40), the FPU pointer (0: fresh state),
    // reserved, and the mask at byte 296.
    let gregs = 5;
    uc[gregs + 11] = progress; // rbx
    uc[gregs + 13] = 0; // rax
    uc[gregs + 15] = user.data.end() - 0x100; // rsp
    uc[gregs + 16] = user.entry(Snippet::Spin); // rip
    uc[gregs + 17] = 0x202; // rflags
    uc[gregs + 18] = 0x33 | 0x2b << 48; // cs, gs, fs, ss
    uc[296 / 8] = 1 << (libc::SIGURG - 1);
    uc
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    sys::install_counter(libc::SIGUSR1, false).map_err(|e| format!("sigaction: {e}"))?;
    // The bystander: another vmspace that RUNs while the attack goes on.
    let other = env.vmspace()?;
    let other_user = env.user(&other)?;
    for attack in [Attack::Blocked, Attack::Cleared, Attack::WaitLoop] {
        one(env, rep, attack, &other, &other_user)?;
    }
    Ok(())
}

fn one(
    env: &mut Env,
    rep: &mut Report,
    attack: Attack,
    other: &crate::env::Vmspace,
    other_user: &User,
) -> Outcome {
    let name = attack.name();
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let g = gadgets(env, &user, &vs)?;
    let progress = user.data.pa(0, 0);
    env.store(progress, 0);
    let tf = match attack {
        Attack::Blocked => {
            let frame_pa = user.data.pa(0, FRAME_OFF);
            let uc = forged_frame(&user, user.data.va(0, 0));
            let bytes: Vec<u8> = uc.iter().flat_map(|w| w.to_ne_bytes()).collect();
            env.write_bytes(frame_pa, &bytes);
            TrapFrame {
                tf_rdi: user.data.va(0, FRAME_OFF),
                tf_rsi: g.restorer,
                ..user.frame(Snippet::Sigreturn)
            }
        }
        Attack::Cleared => TrapFrame {
            tf_rbx: CONTEXTS + CX_KICK,
            tf_rcx: MAX_CONTEXTS,
            tf_r8: CTX_SIZE,
            tf_rdx: user.data.va(0, 0),
            ..user.frame(Snippet::KickClear)
        },
        Attack::WaitLoop => TrapFrame {
            tf_rbx: g.wait_loop,
            tf_r15: CONTEXTS,
            ..user.frame(Snippet::Jump)
        },
    };
    let mut runner = Runner::new(vs.id());
    runner.start(tf, VextFrame::default())?;
    // The attack is under way once the user code makes progress (the wait
    // loop makes none: it sleeps in the handler's futex).
    let started = match attack {
        Attack::WaitLoop => {
            std::thread::sleep(Duration::from_millis(50));
            match runner.wait_end_for(Duration::ZERO)? {
                Some(end) => Err(format!(
                    "RUN ended at once: {:?} {}",
                    end.result,
                    describe(&end.tf)
                )),
                None => Ok(()),
            }
        }
        _ => runner.wait_progress(env.ram, progress, 0).map(drop),
    };
    let ran = started.is_ok();
    rep.result(format!("{name}.started"), started);
    if !ran {
        return Ok(());
    }
    runner.signal(libc::SIGUSR1)?;
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(20));

    // Meanwhile: a fork, and a RUN in another vmspace.
    let fork = sys::time_fork().map_err(|e| format!("fork: {e}"))?;
    let mut tf = other_user.frame(Snippet::Syscall);
    tf.tf_rax = 39;
    let at = Instant::now();
    other.run_plain(&mut tf)?;
    let elsewhere = at.elapsed();
    let others = trap(&tf, T_FAST_SYSCALL, None).and_then(|()| {
        if fork < OTHERS && elsewhere < OTHERS {
            Ok(())
        } else {
            Err(format!("fork took {fork:?}, a RUN elsewhere {elsewhere:?}"))
        }
    });

    let end = runner.wait_end_for(BOUND.saturating_sub(signalled.elapsed()))?;
    let took = signalled.elapsed();
    let bounded = match &end {
        None => Err(format!("RUN still running {took:?} after the signal")),
        Some(end) => match end.result {
            Err(Errno(libc::EIO)) => Ok("EIO".to_owned()),
            Ok(()) => trap(&end.tf, T_SIGNAL, None).map(|()| "T_SIGNAL".to_owned()),
            Err(e) => Err(format!("RUN failed with {}", errno_text(e))),
        },
    };
    println!(
        "# kick-ignore {name}: RUN ended {took:?} after the signal ({}); meanwhile fork {fork:?}, a RUN elsewhere {elsewhere:?}",
        bounded.as_deref().unwrap_or("?")
    );
    rep.result(format!("{name}.bounded"), bounded.map(drop));
    rep.result(format!("{name}.others-go-on"), others);
    Ok(())
}
