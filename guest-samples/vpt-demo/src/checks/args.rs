//! `args`: the argument rules of `vk_mmap` and `mcontrol` (ABI sections 4
//! and 5). On success:
//!
//! ```text
//! args: vk_mmap MAP_PRIVATE EINVAL ok
//! args: vk_mmap other fd EINVAL ok
//! args: vk_mmap without PROT_WRITE EINVAL ok
//! args: vk_mmap MAP_STACK EINVAL ok
//! args: vk_mmap len 0 EINVAL ok
//! args: vk_mmap MAP_FIXED beyond user_max EINVAL ok
//! args: vk_mmap MAP_FIXED address ok
//! args: vk_mmap chosen address ok
//! args: mcontrol behav 12 and -1 EINVAL ok
//! args: mcontrol behav 0..9 ok
//! args: mcontrol wrapping range EINVAL ok
//! args: mcontrol end beyond user_max EINVAL ok
//! args: mcontrol unmapped range ok
//! args: mcontrol SETMAP on a window ok
//! args: mcontrol SETMAP on anonymous memory EINVAL ok
//! ```

use vkabi::hypercall::{Errno, mcontrol};
use vkabi::{
    MADV_INVAL, MADV_SETMAP, MAP_PRIVATE, MAP_SHARED, MAP_STACK, MAP_VPAGETABLE, PAGE_SIZE,
    PROT_READ, PROT_WRITE, USER_MAX,
};

use crate::env::Env;
use crate::report::{Outcome, Report, errno_text, show};
use crate::sys::{HOST_USER_END, Place, Reservation, vk_mmap};

const RW: i32 = PROT_READ | PROT_WRITE;
const VPT: i32 = MAP_SHARED | MAP_VPAGETABLE;
const LEN: u64 = 4 * PAGE_SIZE;

fn einval(rep: &mut Report, what: &str, r: Result<u64, Errno>) {
    rep.check(what, r == Err(Errno::EINVAL), || {
        format!("expected EINVAL, {}", show(r))
    });
}

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("vk_mmap and mcontrol refuse what ABI sections 4-5 refuse");
    let fd = env.ram_fd();
    let zero = std::fs::File::open("/dev/zero").map_err(|e| format!("/dev/zero: {e}"))?;
    let zero_fd = std::os::fd::AsRawFd::as_raw_fd(&zero);
    let cases = [
        (
            "vk_mmap MAP_PRIVATE EINVAL",
            RW,
            MAP_PRIVATE | MAP_VPAGETABLE,
            fd,
            LEN,
        ),
        ("vk_mmap other fd EINVAL", RW, VPT, zero_fd, LEN),
        ("vk_mmap without PROT_WRITE EINVAL", PROT_READ, VPT, fd, LEN),
        ("vk_mmap MAP_STACK EINVAL", RW, VPT | MAP_STACK, fd, LEN),
        ("vk_mmap len 0 EINVAL", RW, VPT, fd, 0),
    ];
    for (what, prot, flags, fd, len) in cases {
        einval(rep, what, vk_mmap(Place::Anywhere, len, prot, flags, fd, 0));
    }

    // Straddling user_max (where the range is free, so that a wrong success
    // replaces only our reservation), and wholly above the host's user space.
    let mut beyond = Vec::new();
    match Reservation::at(USER_MAX - PAGE_SIZE, 2 * PAGE_SIZE) {
        Some(r) => beyond.push(vk_mmap(Place::Fixed(r), 2 * PAGE_SIZE, RW, VPT, fd, 0)),
        None => {
            rep.check("vk_mmap MAP_FIXED straddling user_max", false, || {
                "the two pages around user_max could not be reserved: the case did not run".into()
            });
        }
    }
    let above = Place::FixedAboveHost(HOST_USER_END);
    beyond.push(vk_mmap(above, PAGE_SIZE, RW, VPT, fd, 0));
    let bad = beyond.iter().find(|r| **r != Err(Errno::EINVAL));
    rep.check(
        "vk_mmap MAP_FIXED beyond user_max EINVAL",
        bad.is_none(),
        || format!("expected EINVAL, {}", show(*bad.expect("a bad result"))),
    );

    let res = Reservation::anywhere(LEN).map_err(|e| format!("mmap: {e}"))?;
    let want = res.addr();
    let fixed = vk_mmap(Place::Fixed(res), LEN, RW, VPT, fd, 0);
    rep.check("vk_mmap MAP_FIXED address", fixed == Ok(want), || {
        format!("expected {want:#x}, {}", show(fixed))
    });
    let chosen = vk_mmap(Place::Anywhere, LEN, RW, VPT, fd, 0);
    let good = |a: u64| {
        a.is_multiple_of(PAGE_SIZE) && a.checked_add(LEN).is_some_and(|end| end <= USER_MAX)
    };
    rep.check("vk_mmap chosen address", chosen.is_ok_and(good), || {
        format!(
            "expected a page-aligned range below user_max, {}",
            show(chosen)
        )
    });

    let window = chosen
        .or(fixed)
        .map_err(|e| format!("no window to test mcontrol on: {}", errno_text(e)))?;
    let on_window = |behav: i32| mcontrol(window, LEN, behav, 0);
    let r = [12, -1].map(on_window);
    rep.check(
        "mcontrol behav 12 and -1 EINVAL",
        r.iter().all(|r| *r == Err(Errno::EINVAL)),
        || format!("expected EINVAL twice, got {r:?}"),
    );
    let r: Vec<_> = (0..=9).map(on_window).collect();
    let bad = r.iter().position(|r| r.is_err());
    rep.check("mcontrol behav 0..9", bad.is_none(), || {
        let i = bad.expect("a failing behav");
        format!("behav {i}: expected 0, {:?}", r[i])
    });
    let r = mcontrol(window, u64::MAX - PAGE_SIZE, MADV_INVAL, 0);
    rep.check(
        "mcontrol wrapping range EINVAL",
        r == Err(Errno::EINVAL),
        || format!("expected EINVAL, got {r:?}"),
    );
    let r = mcontrol(USER_MAX - PAGE_SIZE, 2 * PAGE_SIZE, MADV_INVAL, 0);
    rep.check(
        "mcontrol end beyond user_max EINVAL",
        r == Err(Errno::EINVAL),
        || format!("expected EINVAL, got {r:?}"),
    );
    let hole = Reservation::anywhere(LEN).map_err(|e| format!("mmap: {e}"))?;
    let hole_addr = hole.addr();
    drop(hole);
    let r = mcontrol(hole_addr, LEN, MADV_INVAL, 0);
    rep.check("mcontrol unmapped range", r.is_ok(), || {
        format!("expected 0, got {r:?}")
    });

    let pt = env.tables(1)?;
    let master = pt.master().raw();
    let r = mcontrol(window, LEN, MADV_SETMAP, master);
    rep.check("mcontrol SETMAP on a window", r.is_ok(), || {
        format!("expected 0, got {r:?}")
    });
    let anon = Reservation::anywhere(LEN).map_err(|e| format!("mmap: {e}"))?;
    let r = mcontrol(anon.addr(), LEN, MADV_SETMAP, master);
    rep.check(
        "mcontrol SETMAP on anonymous memory EINVAL",
        r == Err(Errno::EINVAL),
        || format!("expected EINVAL, got {r:?}"),
    );
    Ok(())
}
