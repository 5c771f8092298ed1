//! `isolation`: the guest user context never executes a host system call,
//! and sees nothing but what its vmspace maps (ABI section 7). A `syscall`
//! or `int 0x80` that would create a file or end the process comes back as
//! a trap with the registers as the user code left them, nothing happens on
//! the host, and the vmspace keeps working. On success:
//!
//! ```text
//! ok isolation.open.trapped           open(2) by syscall: T_FAST_SYSCALL, rax still 2
//! ok isolation.open.no-file           ... and the file does not exist
//! ok isolation.openat.no-file         openat(2) by syscall: no file
//! ok isolation.int80-open.no-file     32-bit open by int 0x80: T_SYSCALL80, no file
//! ok isolation.exit_group.trapped     exit_group(42) by syscall: T_FAST_SYSCALL
//! ok isolation.exit_group.alive       the next RUN works
//! ok isolation.int80-exit.trapped     exit(42) by int 0x80: T_SYSCALL80
//! ok isolation.int80-exit.alive       RUN again goes on after it
//! ok isolation.hypercall.trapped      a hypercall number (vk_info) is a plain T_FAST_SYSCALL
//! ok isolation.guest-memory-invisible the vkernel's own addresses fault
//! ok isolation.above-user-max.syscalls-trapped  every syscall or int 0x80
//!                                     found in a page of [user_max, 2^47) that user
//!                                     code can read (vkrun's stub: x86 user pages
//!                                     cannot be hidden from user code without
//!                                     protection keys) traps when jumped to with
//!                                     open()'s registers: no file
//! ```

use std::path::Path;
use std::time::Duration;

use vkabi::{
    Hypercall, PAGE_SIZE, PGEX_U, T_FAST_SYSCALL, T_SYSCALL80, TrapFrame, USER_MAX, VextFrame,
};

use crate::checks::traps::pagefault;
use crate::env::{Env, User, describe};
use crate::report::{Outcome, Report, trap};
use crate::runner::Runner;
use crate::sys;
use crate::user::Snippet;

/// x86-64 user space ends here (4-level paging).
const HOST_USER_END: u64 = 1 << 47;

static GUEST_STATIC: u64 = 0x6E57_0000_0000_0001;

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let path = format!("/tmp/vkrun-isolation-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let mut cpath = path.clone().into_bytes();
    cpath.push(0);
    env.write_bytes(user.data.pa(0, 0), &cpath);
    let path_va = user.data.va(0, 0);
    let creat = (libc::O_CREAT | libc::O_WRONLY) as u64;

    // open(path, O_CREAT|O_WRONLY, 0644)
    let mut tf = syscall(&user, libc::SYS_open as u64, [path_va, creat, 0o644, 0]);
    vs.run_plain(&mut tf)?;
    rep.result(
        "open.trapped",
        trapped(&tf, T_FAST_SYSCALL, libc::SYS_open as u64),
    );
    rep.result("open.no-file", no_file(&path));

    // openat(AT_FDCWD, path, O_CREAT|O_WRONLY, 0644)
    let at_fdcwd = libc::AT_FDCWD as i64 as u64;
    let mut tf = syscall(
        &user,
        libc::SYS_openat as u64,
        [at_fdcwd, path_va, creat, 0o644],
    );
    vs.run_plain(&mut tf)?;
    rep.result(
        "openat.no-file",
        trapped(&tf, T_FAST_SYSCALL, libc::SYS_openat as u64).and_then(|()| no_file(&path)),
    );

    // i386 open (5): ebx path, ecx flags, edx mode.
    let mut tf = user.frame(Snippet::Int80);
    tf.tf_rax = 5;
    tf.tf_rbx = path_va;
    tf.tf_rcx = creat;
    tf.tf_rdx = 0o644;
    vs.run_plain(&mut tf)?;
    rep.result(
        "int80-open.no-file",
        trapped(&tf, T_SYSCALL80, 5).and_then(|()| no_file(&path)),
    );

    // exit_group(42) by syscall, then a RUN that must still work.
    let mut tf = syscall(&user, libc::SYS_exit_group as u64, [42, 0, 0, 0]);
    vs.run_plain(&mut tf)?;
    rep.result(
        "exit_group.trapped",
        trapped(&tf, T_FAST_SYSCALL, libc::SYS_exit_group as u64),
    );
    let mut tf = syscall(&user, libc::SYS_getpid as u64, [0; 4]);
    let r = vs.run_plain(&mut tf);
    rep.result(
        "exit_group.alive",
        r.and_then(|()| trap(&tf, T_FAST_SYSCALL, None)),
    );

    // i386 exit(42) by int 0x80, then on to the syscall after it.
    let mut tf = user.frame(Snippet::Int80);
    tf.tf_rax = 1;
    tf.tf_rbx = 42;
    vs.run_plain(&mut tf)?;
    rep.result("int80-exit.trapped", trapped(&tf, T_SYSCALL80, 1));
    let r = vs.run_plain(&mut tf);
    rep.result(
        "int80-exit.alive",
        r.and_then(|()| trap(&tf, T_FAST_SYSCALL, Some(user.entry(Snippet::Int80) + 4))),
    );

    // A hypercall number from user code is not a hypercall.
    let nr = Hypercall::VkInfo.nr();
    let mut tf = syscall(&user, nr, [user.data.va(1, 0), 48, 0, 0]);
    vs.run_plain(&mut tf)?;
    rep.result("hypercall.trapped", trapped(&tf, T_FAST_SYSCALL, nr));

    // The vkernel's own memory: a static and a stack variable of this
    // process (nothing of the vmspace is mapped there).
    let local = 0u64;
    let mine = [&raw const GUEST_STATIC as u64, &raw const local as u64];
    let bad: Vec<String> = mine
        .iter()
        .filter_map(|&va| {
            let mut tf = user.frame(Snippet::Load);
            tf.tf_rbx = va;
            match vs.run_plain(&mut tf) {
                Err(e) => Some(e),
                Ok(()) => pagefault(&tf, va, PGEX_U, user.entry(Snippet::Load)).err(),
            }
        })
        .collect();
    rep.check("guest-memory-invisible", bad.is_empty(), || bad.join("; "));

    above_user_max(env, rep, &path)
}

/// A frame for the `syscall` snippet with `rax = nr` and the first four
/// argument registers (rdi, rsi, rdx, r10).
fn syscall(user: &User, nr: u64, args: [u64; 4]) -> TrapFrame {
    let mut tf = user.frame(Snippet::Syscall);
    tf.tf_rax = nr;
    tf.tf_rdi = args[0];
    tf.tf_rsi = args[1];
    tf.tf_rdx = args[2];
    tf.tf_r10 = args[3];
    tf
}

/// That RUN came back with `trapno` and rax still `nr` (the call did not
/// run: no result was put there).
fn trapped(tf: &TrapFrame, trapno: u64, nr: u64) -> Result<(), String> {
    trap(tf, trapno, None)?;
    if tf.tf_rax != nr {
        return Err(format!(
            "rax is {:#x} after the trap, expected the call number {nr:#x} (did the host run it?)",
            tf.tf_rax
        ));
    }
    Ok(())
}

fn no_file(path: &str) -> Result<(), String> {
    if Path::new(path).exists() {
        let _ = std::fs::remove_file(path);
        Err(format!(
            "{path} exists: the user context ran a host system call"
        ))
    } else {
        Ok(())
    }
}

/// How long a RUN into vkrun's own region may take before this guest stops
/// it with a signal (the user code then runs code it must not reach).
const GUARD: Duration = Duration::from_secs(2);

/// RUN `tf` on `runner`; a RUN that does not return within [`GUARD`] is
/// ended with SIGUSR1 and reported.
fn guarded(runner: &mut Runner, tf: TrapFrame) -> Result<TrapFrame, String> {
    runner.start(tf, VextFrame::default())?;
    let end = match runner.wait_end_for(GUARD)? {
        Some(end) => end,
        None => {
            runner.signal(libc::SIGUSR1)?;
            let end = runner.wait_end()?;
            return Err(format!(
                "RUN from rip {:#x} did not return within {GUARD:?} (stopped by a signal: {})",
                tf.tf_rip,
                describe(&end.tf)
            ));
        }
    };
    end.ok()?;
    Ok(end.tf)
}

/// Every page of `[user_max, 2^47)` faults for reads, writes and fetches
/// (checked in a vmspace of its own, as writes and jumps there may wreck
/// whatever vkrun keeps there); and if any page is readable nonetheless,
/// every `syscall` or `int 0x80` in it still traps when user code jumps to
/// it with the arguments of a file creation.
fn above_user_max(env: &mut Env, rep: &mut Report, path: &str) -> Outcome {
    sys::install_counter(libc::SIGUSR1, true).map_err(|e| format!("sigaction: {e}"))?;
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    let mut cpath = path.as_bytes().to_vec();
    cpath.push(0);
    env.write_bytes(user.data.pa(0, 0), &cpath);
    let mut runner = Runner::new(vs.id());
    let pages = (USER_MAX..HOST_USER_END).step_by(PAGE_SIZE as usize);

    // Which pages user code can read (all the others fault on read).
    let mut readable = Vec::new();
    for va in pages {
        let mut tf = user.frame(Snippet::Load);
        tf.tf_rbx = va;
        if let Ok(tf) = guarded(&mut runner, tf)
            && tf.tf_trapno == T_FAST_SYSCALL
        {
            readable.push(va);
        }
    }
    let r = stub_syscalls(env, &user, &mut runner, &readable, path);
    rep.result("above-user-max.syscalls-trapped", r);
    Ok(())
}

/// For each page of `readable` (above user_max, readable by user code
/// although it must not be), copy it into data page 3 with user code, and
/// jump to every `syscall` (0f 05) and `int 0x80` (cd 80) in it with the
/// registers of `openat(AT_FDCWD, path, O_CREAT|O_WRONLY, 0644)` (and of
/// the i386 `open`): each must come back as a trap right after the
/// instruction, and no file may appear.
fn stub_syscalls(
    env: &Env,
    user: &User,
    runner: &mut Runner,
    readable: &[u64],
    path: &str,
) -> Result<(), String> {
    let creat = (libc::O_CREAT | libc::O_WRONLY) as u64;
    let path_va = user.data.va(0, 0);
    for &page in readable {
        let mut tf = user.frame(Snippet::Copy);
        tf.tf_rsi = page;
        tf.tf_rdi = user.data.va(3, 0);
        tf.tf_rcx = PAGE_SIZE;
        let tf = guarded(runner, tf)?;
        if tf.tf_trapno != T_FAST_SYSCALL {
            continue;
        }
        let bytes = env.read_bytes(user.data.pa(3, 0), PAGE_SIZE as usize);
        for (off, pair) in (0u64..).zip(bytes.windows(2)) {
            let trapno = match pair {
                [0x0f, 0x05] => T_FAST_SYSCALL,
                [0xcd, 0x80] => T_SYSCALL80,
                _ => continue,
            };
            let at = page + off;
            let mut tf = user.frame(Snippet::Syscall);
            tf.tf_rip = at;
            if trapno == T_FAST_SYSCALL {
                tf.tf_rax = libc::SYS_openat as u64;
                tf.tf_rdi = libc::AT_FDCWD as i64 as u64;
                tf.tf_rsi = path_va;
                tf.tf_rdx = creat;
                tf.tf_r10 = 0o644;
            } else {
                tf.tf_rax = 5;
                tf.tf_rbx = path_va;
                tf.tf_rcx = creat;
                tf.tf_rdx = 0o644;
            }
            let r = guarded(runner, tf)
                .and_then(|tf| trap(&tf, trapno, Some(at + 2)))
                .and_then(|()| no_file(path));
            if let Err(e) = r {
                return Err(format!(
                    "the system call instruction at {at:#x} (in vkrun's region above \
                     user_max, readable by user code): {e}"
                ));
            }
            if trapno == T_FAST_SYSCALL {
                exit_through(user, runner, at)?;
            }
        }
    }
    Ok(())
}

/// Jump to the system call instruction at `at` with the registers of
/// `exit(0)`: if vkrun's filter lets that one through (its handler's own
/// instruction), it can only end this context: RUN returns a trap or fails
/// with `EIO`, never hangs, and the next RUN works in a fresh context.
fn exit_through(user: &User, runner: &mut Runner, at: u64) -> Result<(), String> {
    let mut tf = user.frame(Snippet::Syscall);
    tf.tf_rip = at;
    tf.tf_rax = libc::SYS_exit as u64;
    tf.tf_rdi = 0;
    runner.start(tf, VextFrame::default())?;
    let end = runner
        .wait_end_for(Duration::from_secs(5))?
        .ok_or_else(|| format!("RUN of exit(0) at {at:#x} did not return within 5 s"))?;
    match end.result {
        Ok(()) | Err(vkabi::hypercall::Errno::EIO) => {}
        Err(e) => {
            return Err(format!(
                "RUN of exit(0) at {at:#x}: expected a trap or EIO, got {}",
                crate::report::errno_text(e)
            ));
        }
    }
    let tf = guarded(runner, user.frame(Snippet::Syscall))
        .map_err(|e| format!("after exit(0) at {at:#x}, the next RUN: {e}"))?;
    trap(&tf, T_FAST_SYSCALL, None)
        .map_err(|e| format!("after exit(0) at {at:#x}, the next RUN: {e}"))
}
