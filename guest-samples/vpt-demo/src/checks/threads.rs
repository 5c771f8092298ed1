//! `threads`: faults from several threads at once, and `MADV_INVAL` racing
//! with accesses (ABI section 5: the mapping target does not change, so
//! every access must see the right frame, and no store may be lost). On
//! success:
//!
//! ```text
//! threads: 4 threads fault concurrently ok
//! threads: reads stay right under MADV_INVAL ok
//! threads: no write lost under MADV_INVAL ok
//! ```

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use vkabi::{VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, errno_text, must};

/// Threads faulting at once, each on its own pages.
const THREADS: u64 = 4;
/// Pages per thread.
const PER_THREAD: u64 = 64;
const PAGES: u64 = THREADS * PER_THREAD;
/// Threads reading and writing while another invalidates.
const READERS: u64 = 3;
/// `MADV_INVAL`s of the whole window during the race.
const ROUNDS: u32 = 200;

fn mark(page: u64) -> u64 {
    0x7EAD_0000_0000_0000 | page
}

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("4 threads fault at once; reads and writes survive MADV_INVAL");
    let mut pt = env.tables(PAGES + 16)?;
    let w = env.window(PAGES)?;
    let frames = (0..PAGES)
        .map(|_| env::frame(&mut pt))
        .collect::<Result<Vec<_>, _>>()?;
    // 37 is prime to 256: a permutation.
    let target = |page: u64| frames[((page * 37) % PAGES) as usize];
    let word = |page: u64, k: u64| GuestPhysAddr(target(page).0 + 8 * k);
    for page in 0..PAGES {
        stamp_frame(env, target(page));
        for k in 1..2 + READERS {
            env.store(word(page, k), 0);
        }
        env::map(&mut pt, w.pindex(page), target(page), VPTE_RW | VPTE_U)?;
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    // Every thread faults its own pages in, reading then writing each.
    let barrier = Barrier::new(THREADS as usize);
    let (w, target, barrier) = (&w, &target, &barrier);
    let wrong: Vec<u64> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    barrier.wait();
                    let pages = t * PER_THREAD..(t + 1) * PER_THREAD;
                    pages
                        .filter(|&page| {
                            let ok = w.read(page, 0) == stamp(target(page));
                            w.write(page, 1, mark(page));
                            !ok
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![u64::MAX]))
            .collect()
    });
    let lost = (0..PAGES).find(|&page| env.load(word(page, 1)) != mark(page));
    rep.check(
        "4 threads fault concurrently",
        wrong.is_empty() && lost.is_none(),
        || format!("pages read wrong: {wrong:?}; first page whose write is missing: {lost:?}"),
    );

    // READERS threads read every page and count in a word of their own per
    // page, while this thread invalidates the whole window ROUNDS times.
    let done = AtomicBool::new(false);
    let barrier = Barrier::new(READERS as usize + 1);
    let (done, barrier) = (&done, &barrier);
    let (invals, readers) = thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                s.spawn(move || {
                    let k = 2 + r;
                    let (mut passes, mut wrong, mut first) = (0u64, 0u64, None);
                    barrier.wait();
                    loop {
                        let last = done.load(Ordering::SeqCst);
                        for page in 0..PAGES {
                            let v = w.read(page, 0);
                            if v != stamp(target(page)) {
                                wrong += 1;
                                first.get_or_insert((page, v));
                            }
                            w.write(page, k, w.read(page, k) + 1);
                        }
                        passes += 1;
                        if last {
                            return (passes, wrong, first);
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        let invals = (0..ROUNDS).try_for_each(|_| w.inval(0, PAGES));
        done.store(true, Ordering::SeqCst);
        let readers: Vec<_> = readers
            .into_iter()
            .map(|h| h.join().unwrap_or((0, u64::MAX, None)))
            .collect();
        (invals, readers)
    });
    let wrong: u64 = readers.iter().map(|(_, wrong, _)| wrong).sum();
    let first = readers.iter().find_map(|(_, _, first)| *first);
    rep.check(
        "reads stay right under MADV_INVAL",
        invals.is_ok() && wrong == 0,
        || match invals {
            Err(e) => format!("MADV_INVAL: {}", errno_text(e)),
            Ok(()) => {
                let (page, v) = first.unwrap_or_default();
                format!(
                    "{wrong} reads saw a wrong stamp, first page {page}: {v:#x} instead of {:#x}",
                    stamp(target(page))
                )
            }
        },
    );
    let lost = (0..READERS).zip(&readers).find_map(|(r, (passes, _, _))| {
        (0..PAGES)
            .map(|page| (page, env.load(word(page, 2 + r))))
            .find(|(_, count)| count != passes)
            .map(|(page, count)| (r, page, count, *passes))
    });
    rep.check("no write lost under MADV_INVAL", lost.is_none(), || {
        let (r, page, count, passes) = lost.expect("a lost write");
        format!("reader {r} made {passes} passes, page {page} counts {count}")
    });
    Ok(())
}
