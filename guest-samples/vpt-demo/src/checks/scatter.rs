//! `scatter N`: N pages spread over a window of 4N pages, each mapped to a
//! frame of a permutation of N frames, are each read once through the
//! window; every read must see its frame's stamp (written through the DMAP
//! beforehand), and every leaf must have A afterwards. No system call per
//! page: only the faults. On success (N = 2000 by default):
//!
//! ```text
//! scatter: N scattered pages ok
//! scatter: A set on all N leaves ok
//! ```

use std::time::Instant;

use vkabi::{PAGE_SIZE, VPTE_A, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, stamp};
use crate::report::{Outcome, Report, must};

/// Pages when no count is given.
const DEFAULT_PAGES: u64 = 2000;
/// The window has this many pages per mapped page.
const SPREAD: u64 = 4;

/// A multiplier that permutes `0..n` (a prime that does not divide `n`).
fn coprime(n: u64) -> u64 {
    [1_000_003, 999_983, 7919]
        .into_iter()
        .find(|p| !n.is_multiple_of(*p))
        .expect("n is below the three primes' product")
}

pub fn run(env: &mut Env, rep: &mut Report, count: Option<u64>) -> Outcome {
    let n = count.unwrap_or(DEFAULT_PAGES);
    rep.set_summary(format!(
        "{n} scattered pages, one fault each, every stamp right"
    ));
    let span = n
        .checked_mul(SPREAD)
        .filter(|s| s.checked_mul(PAGE_SIZE).is_some())
        .ok_or("count too large")?;
    let base = env
        .frames(n)?
        .alloc_aligned(n, 1)
        .ok_or("no frames for the pages")?;
    let mut pt = env.tables(span.div_ceil(512) + span.div_ceil(512 * 512) + 8)?;
    let w = env.window(span)?;
    let p = coprime(n);
    let frame = |i: u64| {
        let k = (u128::from(i) * u128::from(p) % u128::from(n)) as u64;
        GuestPhysAddr(base.0 + k * PAGE_SIZE)
    };
    let page = |i: u64| SPREAD * i + (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62);
    for i in 0..n {
        env.store(frame(i), stamp(frame(i)));
        env::map(&mut pt, w.pindex(page(i)), frame(i), VPTE_RW | VPTE_U)?;
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    let start = Instant::now();
    let bad: Vec<u64> = (0..n)
        .filter(|&i| w.read(page(i), 0) != stamp(frame(i)))
        .collect();
    rep.info(format_args!("{n} pages read in {:.3?}", start.elapsed()));
    rep.check(format_args!("{n} scattered pages"), bad.is_empty(), || {
        let i = bad[0];
        format!(
            "{} pages wrong; page {} reads {:#x}, its frame {} holds {:#x}",
            bad.len(),
            page(i),
            w.read(page(i), 0),
            frame(i),
            stamp(frame(i))
        )
    });
    let no_a = (0..n).find(|&i| !env::leaf(&pt, w.pindex(page(i))).has(VPTE_A));
    rep.check(
        format_args!("A set on all {n} leaves"),
        no_a.is_none(),
        || {
            let i = no_a.expect("a leaf without A");
            format!(
                "page {}: leaf {}",
                page(i),
                env::leaf(&pt, w.pindex(page(i)))
            )
        },
    );
    Ok(())
}
