//! Concurrency: a "guest" thread flips entries (valid read-write, invalid,
//! valid read-only, each with a new generation number in the ignored bits
//! 52..62) while other threads walk. No A/M update is lost (the value that
//! ends a generation carries the A, and M, of every walk that succeeded in
//! it), no invalid entry gets A, no read-only entry gets M, and no walk's
//! compare-and-swap overwrites a newer value.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use vpte::{
    Access, AtomicRam, FrameAllocator, GuestPhysAddr, Level, PageIndex, PageTableBuilder, PhysMem,
    VPTE_A, VPTE_M, VPTE_RW, VPTE_V, Vpte, WalkError, walk,
};

const RAM: u64 = 64 * 4096;
const PAGES: u64 = 8;
const GENS: u64 = 1500;
const GEN_SHIFT: u32 = 52;
const GEN_MASK: u64 = 0x7FF << GEN_SHIFT;

fn gen_of(v: u64) -> u64 {
    (v & GEN_MASK) >> GEN_SHIFT
}

/// The entry for page `k` in generation `g`: g % 3 is 0 read-write, 1
/// invalid, 2 read-only.
fn entry(k: u64, g: u64) -> u64 {
    let bits = match g % 3 {
        0 => VPTE_V | VPTE_RW,
        1 => VPTE_RW,
        _ => VPTE_V,
    };
    ((32 + k) * 4096) | bits | (g << GEN_SHIFT)
}

/// Sets the flag when dropped, also by a panic: no thread waits forever on
/// one that died.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Success {
    k: u64,
    generation: u64,
    access: Access,
}

#[test]
fn walks_racing_with_entry_flips_lose_no_update() {
    // Each round is bounded by the 11-bit generation field; run several.
    for _ in 0..8 {
        race_once();
    }
}

fn race_once() {
    let ram = AtomicRam::new(RAM as usize);
    let alloc = FrameAllocator::new(GuestPhysAddr(0)..GuestPhysAddr(16 * 4096));
    let mut b = PageTableBuilder::new(&ram, alloc).expect("room");
    let base = PageIndex(5 << 9);
    for k in 0..PAGES {
        b.map_page(
            PageIndex(base.0 + k),
            GuestPhysAddr((32 + k) * 4096),
            VPTE_RW,
        )
        .expect("maps");
    }
    let master = b.master();
    let l1_pa: Vec<GuestPhysAddr> = (0..PAGES)
        .map(|k| {
            b.lookup(PageIndex(base.0 + k))
                .expect("reads")
                .expect("mapped")
                .entry_pa
        })
        .collect();
    // The L2 entry above them.
    let l2_pa = {
        let l4 = Vpte(ram.load(GuestPhysAddr(master.frame().0)).expect("in RAM"));
        let l3 = Vpte(ram.load(l4.frame()).expect("in RAM"));
        GuestPhysAddr(l3.frame().0 + 8 * Level::L2.index(base) as u64)
    };
    for k in 0..PAGES {
        ram.store(l1_pa[k as usize], entry(k, 0)).expect("in RAM");
    }

    let done = AtomicBool::new(false);
    // Walks made so far: the guest paces its flips on it so that walks
    // interleave with every generation whatever the scheduler does.
    let walks = AtomicU64::new(0);
    let wait_walks = |n: u64| {
        let target = walks.load(Ordering::Acquire) + n;
        while walks.load(Ordering::Acquire) < target && !done.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
    };
    let ended: Mutex<Vec<Vec<u64>>> = Mutex::new(vec![Vec::new(); PAGES as usize]);
    let successes: Mutex<Vec<Success>> = Mutex::new(Vec::new());
    let mut failures = [0u64; 2];

    thread::scope(|s| {
        // The guest.
        s.spawn(|| {
            let _stop = StopOnDrop(&done);
            let mut ended_here = vec![Vec::new(); PAGES as usize];
            for g in 0..GENS - 1 {
                wait_walks(2 * PAGES);
                for k in 0..PAGES {
                    let pa = l1_pa[k as usize];
                    let next = entry(k, g + 1);
                    if g % 3 == 1 {
                        // Invalid: nobody may have touched it.
                        let r = ram.compare_exchange(pa, entry(k, g), next).expect("in RAM");
                        assert_eq!(
                            r.map_err(Vpte),
                            Ok(entry(k, g)),
                            "an invalid entry was changed"
                        );
                        ended_here[k as usize].push(entry(k, g));
                    } else {
                        let old = ram.words()[(pa.0 / 8) as usize].swap(next, Ordering::AcqRel);
                        assert_eq!(
                            gen_of(old),
                            g,
                            "a walk overwrote a newer value: {:?}",
                            Vpte(old)
                        );
                        ended_here[k as usize].push(old);
                    }
                }
                if g % 50 == 0 {
                    // Clear V in the L2 entry for a moment.
                    let l2 = Vpte(ram.load(l2_pa).expect("in RAM"));
                    let gone = l2.without(VPTE_V | VPTE_A | VPTE_M);
                    let old = ram.words()[(l2_pa.0 / 8) as usize].swap(gone.0, Ordering::AcqRel);
                    wait_walks(4);
                    let r =
                        ram.compare_exchange(l2_pa, gone.0, Vpte(old).without(VPTE_A | VPTE_M).0);
                    assert_eq!(
                        r.expect("in RAM"),
                        Ok(gone.0),
                        "an invalid L2 entry was changed"
                    );
                }
            }
            *ended.lock().expect("not poisoned") = ended_here;
        });
        // The walkers.
        let walkers: Vec<_> = (0..2u64)
            .map(|w| {
                let (done, successes, ram, walks) = (&done, &successes, &ram, &walks);
                s.spawn(move || {
                    let _stop = StopOnDrop(done);
                    let mut mine = Vec::new();
                    let mut failed = [0u64; 2];
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ w;
                    while !done.load(Ordering::Acquire) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let k = x % PAGES;
                        let access = if x & 0x100 != 0 {
                            Access::Write
                        } else {
                            Access::Read
                        };
                        walks.fetch_add(1, Ordering::AcqRel);
                        match walk(ram, master, PageIndex(base.0 + k), access, RAM) {
                            Ok(t) => {
                                assert_eq!(t.level(), Level::L1);
                                let e = t.leaf.entry;
                                assert!(e.is_valid() && e.is_accessed());
                                if access == Access::Write {
                                    assert!(e.is_writable() && e.is_modified() && t.writable);
                                }
                                mine.push(Success {
                                    k,
                                    generation: gen_of(e.0),
                                    access,
                                });
                            }
                            Err(WalkError::NotValid(_)) => failed[0] += 1,
                            Err(WalkError::WriteDenied(site)) => {
                                assert_eq!(site.level, Level::L1);
                                failed[1] += 1;
                            }
                            Err(e) => panic!("unexpected failure {e}"),
                        }
                    }
                    successes.lock().expect("not poisoned").extend(mine);
                    failed
                })
            })
            .collect();
        for w in walkers {
            let f = w.join().expect("walker ran");
            failures[0] += f[0];
            failures[1] += f[1];
        }
    });

    let ended = ended.into_inner().expect("not poisoned");
    let successes = successes.into_inner().expect("not poisoned");
    let last: Vec<u64> = l1_pa
        .iter()
        .map(|pa| ram.load(*pa).expect("in RAM"))
        .collect();
    let mut writes = 0;
    for s in &successes {
        let end = ended[s.k as usize]
            .get(s.generation as usize)
            .copied()
            .unwrap_or(last[s.k as usize]);
        assert_eq!(gen_of(end), s.generation);
        assert!(
            end & VPTE_A != 0,
            "lost A: page {} generation {}",
            s.k,
            s.generation
        );
        if s.access == Access::Write {
            writes += 1;
            assert!(
                end & VPTE_M != 0,
                "lost M: page {} generation {}",
                s.k,
                s.generation
            );
        }
    }
    for (k, gens) in ended.iter().enumerate() {
        for (g, &v) in gens.iter().enumerate() {
            if g % 3 == 2 {
                assert_eq!(v & VPTE_M, 0, "M on read-only page {k} generation {g}");
            }
        }
    }
    eprintln!(
        "{} successful walks ({writes} writes), {} not valid, {} write denied",
        successes.len(),
        failures[0],
        failures[1]
    );
    assert!(
        writes > 0 && successes.len() > writes,
        "the walkers did not overlap the flips"
    );
}
