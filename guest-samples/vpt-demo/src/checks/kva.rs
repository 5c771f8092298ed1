//! `kva`: DragonFly's vkernel maps its kernel space with offset 512 GiB so
//! that the page index equals `va >> 12` (ABI section 4). A 1 TiB window
//! with offset 512 GiB, at 512 GiB when that range is free (else where the
//! supervisor puts it), with a few pages mapped far apart. On success
//! (after `kva: window at 0x..., page index = va >> 12` or `... = (va -
//! 0x...) >> 12 + 0x8000000`):
//!
//! ```text
//! kva: 1 TiB window mapped ok
//! kva: scattered pages ok
//! ```

use vkabi::{PAGE_SHIFT, PAGE_SIZE, USER_MAX, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, errno_text, must};
use crate::sys::{Place, Reservation, Window};

/// Where DragonFly's vkernel puts kernel space, and its file offset.
const KVA: u64 = 512 << 30;
/// The window's length.
const LEN: u64 = 1 << 40;

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("1 TiB window with offset 512 GiB, as DragonFly's kernel space");
    let place = match Reservation::at(KVA, LEN) {
        Some(r) => Place::Fixed(r),
        None => Place::Anywhere,
    };
    let w = Window::map(place, LEN, KVA, env.ram_fd())
        .map_err(|e| format!("1 TiB window mapped: vk_mmap: {}", errno_text(e)))?;
    let placed = w.base().is_multiple_of(PAGE_SIZE)
        && w.base().checked_add(LEN).is_some_and(|end| end <= USER_MAX);
    rep.check("1 TiB window mapped", placed, || {
        format!(
            "window at {:#x} is not {LEN:#x} bytes of user space",
            w.base()
        )
    });
    if w.base() == KVA {
        rep.info(format_args!("window at {KVA:#x}, page index = va >> 12"));
    } else {
        rep.info(format_args!(
            "window at {:#x}, page index = (va - {:#x}) >> 12 + {:#x}",
            w.base(),
            w.base(),
            KVA >> PAGE_SHIFT
        ));
    }
    // Window pages in different L3 and L2 entries, the last one included.
    let pages = [0, (1 << 18) + 5, (300 << 18) | 123, w.pages() - 1];
    let mut pt = env.tables(24)?;
    let mut frames = Vec::new();
    for page in pages {
        let f = env::frame(&mut pt)?;
        stamp_frame(env, f);
        env::map(&mut pt, w.pindex(page), f, VPTE_RW | VPTE_U)?;
        frames.push(f);
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;
    let bad = pages.iter().zip(&frames).find(|&(&page, &f)| {
        let ok = w.read(page, 0) == stamp(f);
        w.write(page, 1, page);
        !ok || env.load(GuestPhysAddr(f.0 + 8)) != page
    });
    rep.check("scattered pages", bad.is_none(), || {
        let (page, f) = bad.expect("a bad page");
        format!(
            "page {page:#x} (va {:#x}) reads {:#x}, its frame holds {:#x}",
            w.va(*page, 0),
            w.read(*page, 0),
            stamp(*f)
        )
    });
    Ok(())
}
