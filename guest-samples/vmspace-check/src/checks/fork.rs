//! `fork`: a forked guest shares its parent's vmspace registry (ABI section
//! 7), and vmspaces live until the guest's last process exits. The child
//! uses only raw hypercalls and reports through a pipe. On success:
//!
//! ```text
//! ok fork.child.exit                    the child exited 0
//! ok fork.child.sees-parent-vmspace     vmspace_pread of the parent's vmspace
//! ok fork.child.shares-registry         vmspace_create of the parent's id: EEXIST
//! ok fork.child.runs-parent-vmspace     RUN of the parent's vmspace works
//! ok fork.child.creates                 the child creates a vmspace and exits
//! ok fork.child-vmspace-survives-child  the parent sees it: EEXIST
//! ok fork.parent-destroys-child-vmspace and destroys it
//! ok fork.parent-runs-after-child       the parent's own RUN still works
//! ```

use std::io::Write;

use vkabi::hypercall::{self, Errno};
use vkabi::{T_FAST_SYSCALL, VMSPACE_CTL_RUN, VextFrame};

use crate::env::Env;
use crate::report::{Outcome, Report, errno_text, show, trap};
use crate::sys;
use crate::user::Snippet;

/// The id the child creates.
const CHILD_ID: u64 = 0x7673_c41d_0000_0001;
const MARK: u64 = 0xF02C_0000_0000_0001;

/// What the child found, one word per slot.
const SLOTS: usize = 6;
const S_PREAD: usize = 0;
const S_CREATE_SAME: usize = 1;
const S_RUN: usize = 2;
const S_TRAPNO: usize = 3;
const S_RIP: usize = 4;
const S_CREATE_NEW: usize = 5;

/// A result as a word: 0 for success, the errno otherwise.
fn code<T>(r: Result<T, Errno>) -> u64 {
    match r {
        Ok(_) => 0,
        Err(e) => e.0 as u64,
    }
}

fn errno_of(word: u64) -> Result<(), Errno> {
    if word == 0 {
        Ok(())
    } else {
        Err(Errno(word as i32))
    }
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    let user = env.user(&vs)?;
    env.store(user.data.pa(0, 0), MARK);
    let id = vs.id();
    let data_va = user.data.va(0, 0);
    let tf0 = user.frame(Snippet::Syscall);

    let (rd, wr) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    let _ = std::io::stdout().flush();
    let Some(pid) = sys::fork().map_err(|e| format!("fork: {e}"))? else {
        // The child: raw hypercalls only, then the words, then _exit.
        let mut out = [0u64; SLOTS];
        let mut b = [0u8; 8];
        out[S_PREAD] = match hypercall::vmspace_pread(id, &mut b, 0, data_va) {
            Ok(8) => u64::from_le_bytes(b),
            _ => 0,
        };
        out[S_CREATE_SAME] = code(hypercall::vmspace_create(id, 0, 0));
        let mut tf = tf0;
        out[S_RUN] = code(hypercall::vmspace_ctl(
            id,
            VMSPACE_CTL_RUN,
            &mut tf,
            &mut VextFrame::default(),
        ));
        out[S_TRAPNO] = tf.tf_trapno;
        out[S_RIP] = tf.tf_rip;
        out[S_CREATE_NEW] = code(hypercall::vmspace_create(CHILD_ID, 0, 0));
        let mut bytes = [0u8; SLOTS * 8];
        for (chunk, w) in bytes.chunks_mut(8).zip(out) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        sys::write_all(wr, &bytes);
        sys::exit_now(0);
    };
    sys::close(wr);
    let bytes = sys::read_to_end_and_close(rd);
    let status = sys::waitpid(pid).map_err(|e| format!("waitpid: {e}"))?;
    rep.check(
        "child.exit",
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        || format!("wait status {status:#x}"),
    );
    if bytes.len() != SLOTS * 8 {
        return Err(format!(
            "the child reported {} bytes, expected {}",
            bytes.len(),
            SLOTS * 8
        ));
    }
    let mut got = [0u64; SLOTS];
    for (w, chunk) in got.iter_mut().zip(bytes.chunks(8)) {
        *w = u64::from_le_bytes(chunk.try_into().expect("8-byte chunks"));
    }
    rep.eq(
        "child.sees-parent-vmspace",
        "the child's vmspace_pread of the parent's data word",
        got[S_PREAD],
        MARK,
    );
    rep.errno(
        "child.shares-registry",
        &format!("the child's vmspace_create({id:#x})"),
        errno_of(got[S_CREATE_SAME]),
        Errno::EEXIST,
    );
    let rip = user.entry(Snippet::Syscall) + 2;
    rep.check(
        "child.runs-parent-vmspace",
        got[S_RUN] == 0 && got[S_TRAPNO] == T_FAST_SYSCALL && got[S_RIP] == rip,
        || {
            format!(
                "the child's RUN: {}, trapno {:#x} rip {:#x} (expected 0x81 at {rip:#x})",
                show(&errno_of(got[S_RUN])),
                got[S_TRAPNO],
                got[S_RIP]
            )
        },
    );
    rep.success(
        "child.creates",
        &format!("the child's vmspace_create({CHILD_ID:#x})"),
        errno_of(got[S_CREATE_NEW]),
    );
    rep.errno(
        "child-vmspace-survives-child",
        &format!("vmspace_create({CHILD_ID:#x}) after the child exited"),
        hypercall::vmspace_create(CHILD_ID, 0, 0),
        Errno::EEXIST,
    );
    rep.success(
        "parent-destroys-child-vmspace",
        &format!("vmspace_destroy({CHILD_ID:#x})"),
        hypercall::vmspace_destroy(CHILD_ID),
    );
    let mut tf = tf0;
    let r = vs.run(&mut tf, &mut VextFrame::default());
    rep.result(
        "parent-runs-after-child",
        r.map_err(|e| format!("vmspace_ctl(RUN): {}", errno_text(e)))
            .and_then(|()| trap(&tf, T_FAST_SYSCALL, Some(rip))),
    );
    Ok(())
}
