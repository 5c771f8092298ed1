//! `traps`: every kind of RUN exit the ABI section 7 table names, each from
//! a one-instruction snippet, with `tf_trapno`, `tf_rip` and for page
//! faults `tf_addr` and `tf_err`; a page fault is fixed by mapping the page
//! and the same frame RUN again restarts the instruction. The vmspace id is
//! [`TRAPS_ID`] (the trace test looks for it). On success:
//!
//! ```text
//! ok traps.syscall                  T_FAST_SYSCALL (0x81), rip after it, tf_err 2
//! ok traps.syscall-335              `syscall` with rax 335 (Linux's uretprobe,
//!                                   which passes every seccomp filter):
//!                                   T_FAST_SYSCALL too, rax 335
//! ok traps.int3                     T_BPTFLT (3), rip after the int3
//! ok traps.int3.resume              RUN again goes on after the int3
//! ok traps.ud2                      T_PRIVINFLT (1), rip at the ud2
//! ok traps.hlt                      T_PROTFLT (9): privileged, #GP at CPL 3
//! ok traps.cli                      T_PROTFLT (9): #GP at CPL 3 with IOPL 0
//! ok traps.mov-from-cr0             T_PROTFLT (9): #GP at CPL 3
//! ok traps.divide                   T_DIVIDE (18), rip at the div
//! ok traps.int80                    T_SYSCALL80 (0x80), rip after the int 0x80
//! ok traps.int80.resume             RUN again goes on after it
//! ok traps.pagefault.read           T_PAGEFLT (12), tf_addr exact, err U
//! ok traps.pagefault.write          err W|U
//! ok traps.pagefault.fetch          err I|U, rip = tf_addr = the target
//! ok traps.pagefault.write-readonly a PROT_READ mapping, read before: err P|W|U
//! ok traps.pagefault.read-restarts  after vmspace_mmap, the load completes
//! ok traps.pagefault.write-restarts after vmspace_mmap, the store lands
//! ok traps.pagefault.fetch-restarts after vmspace_mmap, the code runs
//! ```
//!
//! Privileged instructions: x86 raises #GP (not #UD) for `hlt`, `cli` and
//! control-register moves at CPL 3, and DragonFly reports #GP as
//! `T_PROTFLT`; `T_PRIVINFLT` is DragonFly's name for #UD. So the table's
//! "invalid opcode / privileged instruction" row is checked with `ud2`,
//! and the privileged instructions with `T_PROTFLT`.

use vkabi::{
    PAGE_SIZE, PGEX_I, PGEX_P, PGEX_U, PGEX_W, PROT_READ, T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL,
    T_PAGEFLT, T_PRIVINFLT, T_PROTFLT, T_SYSCALL80, TrapFrame,
};
use vpte::GuestPhysAddr;

use crate::env::{Env, RWX, Vmspace, describe, stamp, stamp_frame};
use crate::report::{Outcome, Report, trap};
use crate::user::Snippet;

/// The vmspace id this area uses.
pub const TRAPS_ID: u64 = 0x7e57_7a95;
/// Nothing is mapped here until the restart checks map it.
const HOLE_VA: u64 = 0x0500_0000;
/// A PROT_READ page.
const RO_VA: u64 = 0x0510_0000;
/// The page-fault error bits the checks compare.
pub const PGEX_MASK: u64 = PGEX_P | PGEX_W | PGEX_U | PGEX_I;

/// That RUN stopped with a page fault at `addr` with `err` (in
/// [`PGEX_MASK`]) and `rip`, or why not.
pub fn pagefault(tf: &TrapFrame, addr: u64, err: u64, rip: u64) -> Result<(), String> {
    trap(tf, T_PAGEFLT, Some(rip))?;
    if tf.tf_addr != addr {
        return Err(format!("expected tf_addr {addr:#x}, got {}", describe(tf)));
    }
    if tf.tf_err & PGEX_MASK != err {
        return Err(format!(
            "expected tf_err {err:#x} in P|W|U|I ({PGEX_MASK:#x}), got {}",
            describe(tf)
        ));
    }
    Ok(())
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = Vmspace::create(TRAPS_ID)?;
    let user = env.user(&vs)?;
    let at = |s: Snippet, off: u64| user.entry(s) + off;

    let mut tf = user.frame(Snippet::Syscall);
    vs.run_plain(&mut tf)?;
    rep.result(
        "syscall",
        trap(&tf, T_FAST_SYSCALL, Some(at(Snippet::Syscall, 2))).and_then(|()| {
            if tf.tf_err == 2 {
                Ok(())
            } else {
                Err(format!("expected tf_err 0x2, got {}", describe(&tf)))
            }
        }),
    );

    let mut tf = user.frame(Snippet::Syscall);
    tf.tf_rax = 335;
    vs.run_plain(&mut tf)?;
    rep.result(
        "syscall-335",
        trap(&tf, T_FAST_SYSCALL, Some(at(Snippet::Syscall, 2))).and_then(|()| {
            if tf.tf_rax == 335 {
                Ok(())
            } else {
                Err(format!("expected rax 335, got {}", describe(&tf)))
            }
        }),
    );

    let mut tf = user.frame(Snippet::Int3);
    vs.run_plain(&mut tf)?;
    rep.result("int3", trap(&tf, T_BPTFLT, Some(at(Snippet::Int3, 1))));
    vs.run_plain(&mut tf)?;
    rep.result(
        "int3.resume",
        trap(&tf, T_FAST_SYSCALL, Some(at(Snippet::Int3, 3))),
    );

    let cases = [
        ("ud2", Snippet::Ud2, T_PRIVINFLT),
        ("hlt", Snippet::Hlt, T_PROTFLT),
        ("cli", Snippet::Cli, T_PROTFLT),
        ("mov-from-cr0", Snippet::ReadCr0, T_PROTFLT),
    ];
    for (name, s, trapno) in cases {
        let mut tf = user.frame(s);
        vs.run_plain(&mut tf)?;
        rep.result(name, trap(&tf, trapno, Some(at(s, 0))));
    }

    let mut tf = user.frame(Snippet::Divide);
    tf.tf_rax = 1;
    tf.tf_rdx = 0;
    tf.tf_rcx = 0;
    vs.run_plain(&mut tf)?;
    rep.result("divide", trap(&tf, T_DIVIDE, Some(at(Snippet::Divide, 0))));

    // 32-bit getpid: harmless should it ever reach the host.
    let mut tf = user.frame(Snippet::Int80);
    tf.tf_rax = 20;
    vs.run_plain(&mut tf)?;
    rep.result("int80", trap(&tf, T_SYSCALL80, Some(at(Snippet::Int80, 2))));
    vs.run_plain(&mut tf)?;
    rep.result(
        "int80.resume",
        trap(&tf, T_FAST_SYSCALL, Some(at(Snippet::Int80, 4))),
    );

    // Page faults on nothing mapped; exact addresses inside the page.
    let read_at = HOLE_VA + 0x128;
    let write_at = HOLE_VA + PAGE_SIZE + 0x230;
    let fetch_at = HOLE_VA + 2 * PAGE_SIZE;
    let mut read = user.frame(Snippet::Load);
    read.tf_rbx = read_at;
    vs.run_plain(&mut read)?;
    rep.result(
        "pagefault.read",
        pagefault(&read, read_at, PGEX_U, at(Snippet::Load, 0)),
    );
    let mut write = user.frame(Snippet::Store);
    write.tf_rbx = write_at;
    write.tf_rdx = 0x5707_E000_0000_0001;
    vs.run_plain(&mut write)?;
    rep.result(
        "pagefault.write",
        pagefault(&write, write_at, PGEX_W | PGEX_U, at(Snippet::Store, 0)),
    );
    let mut fetch = user.frame(Snippet::Jump);
    fetch.tf_rbx = fetch_at;
    vs.run_plain(&mut fetch)?;
    rep.result(
        "pagefault.fetch",
        pagefault(&fetch, fetch_at, PGEX_I | PGEX_U, fetch_at),
    );

    // Read first, so the page is present read-only whatever the host did
    // before: a write is then a protection fault on any x86.
    let ro = env.map_linear(&vs, RO_VA, 1, PROT_READ)?;
    let mut tf = user.frame(Snippet::Load);
    tf.tf_rbx = ro.va(0, 8);
    vs.run_plain(&mut tf)?;
    trap(&tf, T_FAST_SYSCALL, None).map_err(|e| format!("a load from a PROT_READ page: {e}"))?;
    let mut tf = user.frame(Snippet::Store);
    tf.tf_rbx = ro.va(0, 8);
    vs.run_plain(&mut tf)?;
    rep.result(
        "pagefault.write-readonly",
        pagefault(
            &tf,
            ro.va(0, 8),
            PGEX_P | PGEX_W | PGEX_U,
            at(Snippet::Store, 0),
        ),
    );

    // Fix: map the three pages, then RUN the same frames again.
    let fixed = env.map_linear(&vs, HOLE_VA, 3, RWX)?;
    let data = fixed.pa(0, 0);
    stamp_frame(env, data);
    env.store(GuestPhysAddr(data.0 + 0x128), stamp(data));
    env.write_bytes(fixed.pa(2, 0), Snippet::Syscall.bytes());

    vs.run_plain(&mut read)?;
    rep.result(
        "pagefault.read-restarts",
        trap(&read, T_FAST_SYSCALL, Some(at(Snippet::Load, 5))).and_then(|()| {
            if read.tf_rax == stamp(data) {
                Ok(())
            } else {
                Err(format!(
                    "the load gave rax {:#x}, the page holds {:#x}",
                    read.tf_rax,
                    stamp(data)
                ))
            }
        }),
    );
    vs.run_plain(&mut write)?;
    let landed = env.load(fixed.pa(1, 0x230));
    rep.result(
        "pagefault.write-restarts",
        trap(&write, T_FAST_SYSCALL, Some(at(Snippet::Store, 5))).and_then(|()| {
            if landed == write.tf_rdx {
                Ok(())
            } else {
                Err(format!(
                    "the frame holds {landed:#x} after the store of {:#x}",
                    write.tf_rdx
                ))
            }
        }),
    );
    vs.run_plain(&mut fetch)?;
    rep.result(
        "pagefault.fetch-restarts",
        trap(&fetch, T_FAST_SYSCALL, Some(fetch_at + 2)),
    );
    Ok(())
}
