//! `kernel`: a Linux system call that touches window pages nobody has
//! touched yet resolves its faults like a user access (ABI section 3
//! "Kernel-mode access"). On success:
//!
//! ```text
//! kernel: read(2) into an untouched page ok
//! kernel: write(2) from an untouched page ok
//! kernel: read(2) across two pages ok
//! ```

use std::io::{Read, Write};

use vkabi::{PAGE_SIZE, VPTE_M, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env};
use crate::report::{Outcome, Report, must};

/// `n` bytes of a pattern seeded by `seed`.
fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("read(2) and write(2) on window pages nobody touched yet");
    let mut pt = env.tables(16)?;
    let w = env.window(4)?;
    let frames = (0..5)
        .map(|_| env::frame(&mut pt))
        .collect::<Result<Vec<_>, _>>()?;
    // Pages 2 and 3 map frames that are not adjacent.
    let target = [frames[0], frames[1], frames[2], frames[4]];
    for (page, f) in (0..).zip(target) {
        env::map(&mut pt, w.pindex(page), f, VPTE_RW | VPTE_U)?;
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;
    let (mut rd, mut wr) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    fn io(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
        move |e| format!("{what}: {e}")
    }

    // read(2) into page 0 at byte 64.
    let msg = pattern(3, 100);
    wr.write_all(&msg).map_err(io("write to the pipe"))?;
    let n = w
        .read_fd(&rd, 0, 64, msg.len())
        .map_err(io("read(2) into the window"))?;
    let seen = env.read_bytes(GuestPhysAddr(target[0].0 + 64), msg.len());
    let leaf = env::leaf(&pt, w.pindex(0));
    rep.check(
        "read(2) into an untouched page",
        n == msg.len() && seen == msg && leaf.has(VPTE_M),
        || {
            format!(
                "read returned {n}, frame bytes match: {}, leaf {leaf}",
                seen == msg
            )
        },
    );

    // write(2) from page 1 at byte 32.
    let msg = pattern(11, 100);
    env.write_bytes(GuestPhysAddr(target[1].0 + 32), &msg);
    let n = w
        .write_fd(&wr, 1, 32, msg.len())
        .map_err(io("write(2) from the window"))?;
    let mut back = vec![0u8; n];
    rd.read_exact(&mut back).map_err(io("read from the pipe"))?;
    rep.check(
        "write(2) from an untouched page",
        n == msg.len() && back == msg,
        || format!("write returned {n}, bytes match: {}", back == msg),
    );

    // read(2) of 200 bytes from byte 4000 of page 2 into page 3.
    let msg = pattern(29, 200);
    let head = (PAGE_SIZE - 4000) as usize;
    wr.write_all(&msg).map_err(io("write to the pipe"))?;
    let n = w
        .read_fd(&rd, 2, 4000, msg.len())
        .map_err(io("read(2) into the window"))?;
    let mut seen = env.read_bytes(GuestPhysAddr(target[2].0 + 4000), head);
    seen.extend(env.read_bytes(target[3], msg.len() - head));
    rep.check(
        "read(2) across two pages",
        n == msg.len() && seen == msg,
        || format!("read returned {n}, frame bytes match: {}", seen == msg),
    );
    Ok(())
}
