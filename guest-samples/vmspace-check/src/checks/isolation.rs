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
//! ok isolation.above-user-max.read    every page in [user_max, 2^47) faults on read,
//! ok isolation.above-user-max.write   on write,
//! ok isolation.above-user-max.fetch   and on instruction fetch
//! ```

use std::path::Path;

use vkabi::{
    Hypercall, PAGE_SIZE, PGEX_I, PGEX_U, PGEX_W, T_FAST_SYSCALL, T_PAGEFLT, T_SYSCALL80,
    TrapFrame, USER_MAX,
};

use crate::checks::traps::pagefault;
use crate::env::{Env, User, Vmspace, describe};
use crate::report::{Outcome, Report, trap};
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

    above_user_max(&vs, &user, rep)?;
    Ok(())
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

/// Every page of `[user_max, 2^47)` faults for reads, writes and fetches.
fn above_user_max(vs: &Vmspace, user: &User, rep: &mut Report) -> Outcome {
    let mut first_bad: [Option<String>; 3] = [None, None, None];
    let mut va = USER_MAX;
    while va < HOST_USER_END {
        let kinds = [
            (Snippet::Load, PGEX_U, user.entry(Snippet::Load)),
            (Snippet::Store, PGEX_W | PGEX_U, user.entry(Snippet::Store)),
            (Snippet::Jump, PGEX_I | PGEX_U, va),
        ];
        for (k, (s, err, rip)) in kinds.into_iter().enumerate() {
            if first_bad[k].is_some() {
                continue;
            }
            let mut tf = user.frame(s);
            tf.tf_rbx = va;
            vs.run_plain(&mut tf)?;
            // Whatever vkrun keeps there may be mapped on the host, so P
            // may be set: only the access bits are compared.
            let access = PGEX_W | PGEX_U | PGEX_I;
            if tf.tf_trapno != T_PAGEFLT
                || tf.tf_addr != va
                || tf.tf_rip != rip
                || tf.tf_err & access != err
            {
                first_bad[k] = Some(format!(
                    "page {va:#x} (expected err {err:#x} in W|U|I): {}",
                    describe(&tf)
                ));
            }
        }
        va += PAGE_SIZE;
    }
    for (name, bad) in ["read", "write", "fetch"].iter().zip(first_bad) {
        rep.check(
            format_args!("above-user-max.{name}"),
            bad.is_none(),
            || {
                format!(
                    "expected T_PAGEFLT (0xc) at the address with the access's err bits; first page that did not: {}",
                    bad.unwrap_or_default()
                )
            },
        );
    }
    Ok(())
}
