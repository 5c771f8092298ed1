//! The fuzz target's property (`vpte/fuzz`, target `walk`) as a proptest that
//! runs in the normal test suite: over arbitrary RAM, master PDE, page index
//! and access, the walker never panics, never reads outside RAM, reads at
//! most 4 entries, and agrees with the naive reference walk in its result and
//! in the entries it changes; the prefault run it allows is exact.

use proptest::prelude::*;
use vpte::reference::{CASE_MAX_PAGES, WalkCase};
use vpte::{Access, VPTE_A, VPTE_M, VPTE_NX, VPTE_PS, VPTE_RW, VPTE_V};

/// Entry values that walks can follow: mostly V, flags each with its own
/// odds, a frame in the first pages (where the writes land) or anywhere in or
/// just beyond RAM; sometimes arbitrary values, folded into RAM or not.
fn entry() -> impl Strategy<Value = (u64, bool)> {
    let bit = |b: u64, p: f64| prop::bool::weighted(p).prop_map(move |on| if on { b } else { 0 });
    let flags = (
        bit(VPTE_V, 0.95),
        bit(VPTE_RW, 0.8),
        bit(VPTE_A, 0.3),
        bit(VPTE_M, 0.3),
        bit(VPTE_PS, 0.15),
        bit(VPTE_NX, 0.15),
    )
        .prop_map(|(a, b, c, d, e, f)| a | b | c | d | e | f);
    let page = prop_oneof![4 => 0u64..4, 1 => 0u64..CASE_MAX_PAGES + 2];
    prop_oneof![
        12 => (flags.clone(), page).prop_map(|(f, page)| (f | (page << 12), false)),
        1 => (flags, any::<u64>()).prop_map(|(f, v)| (v | f, true)),
        1 => any::<u64>().prop_map(|v| (v, false)),
    ]
}

fn access() -> impl Strategy<Value = Access> {
    prop::sample::select(Access::ALL.to_vec())
}

/// Page indexes whose table indexes are small (so they meet the written
/// entries) or arbitrary.
fn pindex() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0u64..4, 0u64..4, 0u64..4, 0u64..4).prop_map(|(a, b, c, d)| (a << 27) | (b << 18) | (c << 9) | d),
        1 => any::<u64>(),
    ]
}

fn case() -> impl Strategy<Value = WalkCase> {
    (
        prop_oneof![4 => 4u64..=CASE_MAX_PAGES, 1 => 1u64..=CASE_MAX_PAGES],
        prop_oneof![3 => Just(0u64), 1 => 0u64..600],
        entry(),
        pindex(),
        access(),
        prop::collection::vec(
            (
                prop_oneof![
                    // The first few words of the first pages: where small indexes land.
                    4 => (0u16..4, 0u16..8).prop_map(|(page, w)| page * 512 + w),
                    1 => any::<u16>(),
                ],
                entry(),
            )
                .prop_map(|(at, (v, fold))| (at, v, fold)),
            0..48,
        ),
    )
        .prop_map(|(pages, trim, master, pindex, access, writes)| {
            WalkCase::new(pages, trim, master, pindex, access, &writes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn structured_walks_agree_with_the_reference(case in case()) {
        if let Err(e) = case.check() {
            prop_assert!(false, "{e}\n{case:?}");
        }
    }

    #[test]
    fn raw_fuzzer_bytes_agree_with_the_reference(
        data in prop::collection::vec(any::<u8>(), 0..600)
    ) {
        let case = WalkCase::from_bytes(&data);
        if let Err(e) = case.check() {
            prop_assert!(false, "{e}\n{case:?}");
        }
    }
}

/// The structured cases do reach every level and every outcome (so the
/// property above is not vacuous).
#[test]
fn the_generator_reaches_every_level_and_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeSet;

    let mut runner = TestRunner::deterministic();
    let strategy = case();
    let mut seen = BTreeSet::new();
    for _ in 0..4000 {
        let case = strategy.new_tree(&mut runner).expect("generates").current();
        let e = vpte::reference::reference_walk(&case.ram, case.master, case.pindex, case.access);
        let what = match e.result {
            Ok(t) => format!("ok at {}", t.level()),
            Err(err) => format!(
                "{} at {}",
                format!("{err:?}")
                    .split(['(', ' '])
                    .next()
                    .unwrap_or_default(),
                err.level()
            ),
        };
        seen.insert(what);
    }
    for want in [
        "ok at L1",
        "ok at L2",
        "ok at L3",
        "ok at L4",
        "ok at master",
    ] {
        assert!(seen.contains(want), "never saw {want}: {seen:?}");
    }
    for kind in [
        "NotValid",
        "WriteDenied",
        "ExecDenied",
        "TableBeyondRam",
        "PageBeyondRam",
    ] {
        assert!(
            seen.iter()
                .any(|s| s.starts_with(kind) && !s.ends_with("master")),
            "never saw {kind} below the master: {seen:?}"
        );
    }
}

/// Found by the fuzzer: a translation of page index `u64::MAX`, which no
/// prefault window (a `Range`) can hold.
#[test]
fn the_last_page_index_walks_and_prefaults_nothing() {
    for master in [VPTE_V | VPTE_PS, VPTE_V | 0x3000] {
        let mut writes = vec![(0x7FF, VPTE_V | 0x3000, false)];
        writes.push((0x7FF + 512 * 3, VPTE_V | VPTE_A | 0x3000, false));
        let case = WalkCase::new(4, 0, (master, false), u64::MAX, Access::Read, &writes);
        case.check().expect("walks");
    }
}
