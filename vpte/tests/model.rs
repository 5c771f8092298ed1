//! Property test: tables built through the builder, then walked, agree with a
//! naive model (a map from leaf to entry) on mapped, unmapped and superpage
//! addresses, for every access, including the A/M bits the walks set.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vpte::{
    Access, BuildError, CellRam, FrameAllocator, GuestPhysAddr, Level, PageIndex, PageSize,
    PageTableBuilder, VPTE_A, VPTE_G, VPTE_M, VPTE_NX, VPTE_RW, VPTE_U, Vpte, WalkError, walk,
};

const RAM_PAGES: u64 = 256;
const RAM: u64 = RAM_PAGES * 4096;

#[derive(Clone, Debug)]
enum Op {
    Map {
        size: PageSize,
        pindex: PageIndex,
        frame: GuestPhysAddr,
        bits: u64,
    },
    Unmap(PageIndex),
    Protect(PageIndex, u64),
    Walk(PageIndex, Access),
}

/// The model: leaves by (level, first page index), and the regions where the
/// builder has made a table (an entry at `level` covering `first` that points
/// at a table), which decide conflicts.
#[derive(Default, Debug)]
struct Model {
    leaves: BTreeMap<(Level, u64), Vpte>,
    tables: BTreeSet<(Level, u64)>,
}

const UPPER: [Level; 3] = [Level::L4, Level::L3, Level::L2];

impl Model {
    fn leaf(&self, p: PageIndex) -> Option<(Level, u64, Vpte)> {
        [Level::L3, Level::L2, Level::L1].into_iter().find_map(|l| {
            let first = l.region_start(p).0;
            self.leaves.get(&(l, first)).map(|&e| (l, first, e))
        })
    }

    /// What `map` must return, and the model after it.
    fn map(
        &mut self,
        size: PageSize,
        p: PageIndex,
        frame: GuestPhysAddr,
        bits: u64,
    ) -> Result<Option<Vpte>, Level> {
        let level = size.level();
        for upper in UPPER.into_iter().filter(|u| *u < level) {
            if self.leaves.contains_key(&(upper, upper.region_start(p).0)) {
                return Err(upper);
            }
        }
        if level != Level::L1 && self.tables.contains(&(level, p.0)) {
            return Err(level);
        }
        for upper in UPPER.into_iter().filter(|u| *u < level) {
            self.tables.insert((upper, upper.region_start(p).0));
        }
        let ps = if level == Level::L1 { 0 } else { vpte::VPTE_PS };
        Ok(self
            .leaves
            .insert((level, p.0), Vpte::leaf(frame, bits | ps)))
    }

    fn walk(
        &mut self,
        p: PageIndex,
        access: Access,
    ) -> Result<(Level, GuestPhysAddr, bool, bool), &'static str> {
        let Some((level, first, entry)) = self.leaf(p) else {
            return Err("not valid");
        };
        if access == Access::Write && !entry.is_writable() {
            return Err("write denied");
        }
        if access == Access::Execute && entry.is_no_exec() {
            return Err("exec denied");
        }
        let pa = entry.frame().0 + (p.0 - first) * 4096;
        if pa + 4096 > RAM {
            return Err("page beyond RAM");
        }
        let m = if access == Access::Write { VPTE_M } else { 0 };
        let entry = entry.with(VPTE_A | m);
        self.leaves.insert((level, first), entry);
        Ok((
            level,
            GuestPhysAddr(pa),
            entry.is_writable() && entry.is_modified(),
            !entry.is_no_exec(),
        ))
    }
}

fn kind(e: &WalkError) -> &'static str {
    match e {
        WalkError::NotValid(_) => "not valid",
        WalkError::WriteDenied(_) => "write denied",
        WalkError::ExecDenied(_) => "exec denied",
        WalkError::TableBeyondRam { .. } => "table beyond RAM",
        WalkError::PageBeyondRam { .. } => "page beyond RAM",
        WalkError::Memory { .. } => "memory",
    }
}

/// Page indexes in a small tree (2 L4 slots, 3 L3, 3 L2, 4 L1) so that
/// operations meet, plus pages anywhere inside those superpage regions.
fn pindex() -> impl Strategy<Value = PageIndex> {
    let l2 = prop_oneof![3 => 0u64..3, 1 => 0u64..512];
    let l1 = prop_oneof![3 => 0u64..4, 1 => 0u64..512];
    (0u64..2, 0u64..3, l2, l1)
        .prop_map(|(a, b, c, d)| PageIndex((a << 27) | (b << 18) | (c << 9) | d))
}

fn bits() -> impl Strategy<Value = u64> {
    prop::sample::subsequence(
        vec![VPTE_RW, VPTE_U, VPTE_A, VPTE_M, VPTE_G, VPTE_NX],
        0..=6,
    )
    .prop_map(|b| b.into_iter().fold(0, |a, x| a | x))
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop::sample::select(PageSize::ALL.to_vec());
    let access = prop::sample::select(Access::ALL.to_vec());
    prop_oneof![
        4 => (size, pindex(), 0u64..RAM_PAGES + 8, bits()).prop_map(|(size, p, f, bits)| Op::Map {
            size,
            pindex: size.level().region_start(p),
            frame: GuestPhysAddr(f * 4096),
            bits,
        }),
        1 => pindex().prop_map(Op::Unmap),
        1 => (pindex(), bits()).prop_map(|(p, b)| Op::Protect(p, b & (VPTE_RW | VPTE_U | VPTE_NX))),
        6 => (pindex(), access).prop_map(|(p, a)| Op::Walk(p, a)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn walker_agrees_with_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut bytes = vec![0u8; RAM as usize];
        // Tables come from the top half; data frames are anywhere (even on
        // tables: the walker never touches data).
        let alloc = FrameAllocator::new(GuestPhysAddr(RAM / 2)..GuestPhysAddr(RAM));
        let mut b = PageTableBuilder::new(CellRam::new(&mut bytes), alloc).expect("root");
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Map { size, pindex, frame, bits } => {
                    let want = model.map(size, pindex, frame, bits);
                    let got = b.map(pindex, frame, size, bits);
                    match (want, got) {
                        (Ok(old), Ok(m)) => prop_assert_eq!(old, m.map(|m| m.entry)),
                        (Err(level), Err(BuildError::Conflict { level: l, .. })) => prop_assert_eq!(level, l),
                        (want, got) => prop_assert!(false, "map {:?}: model {:?}, builder {:?}", pindex, want, got),
                    }
                }
                Op::Unmap(p) => {
                    let want = model.leaf(p);
                    if let Some((level, first, _)) = want {
                        model.leaves.remove(&(level, first));
                    }
                    let got = b.unmap(p).expect("in RAM");
                    prop_assert_eq!(want, got.map(|m| (m.level, m.first.0, m.entry)));
                }
                Op::Protect(p, prot) => {
                    let want = model.leaf(p);
                    if let Some((level, first, e)) = want {
                        let new = e.without(VPTE_RW | VPTE_U | VPTE_NX).with(prot);
                        model.leaves.insert((level, first), new);
                    }
                    let got = b.protect(p, prot).expect("in RAM");
                    prop_assert_eq!(want.map(|(_, _, e)| e), got.map(|m| m.entry));
                }
                Op::Walk(p, access) => {
                    let want = model.walk(p, access);
                    let got = walk(b.mem(), b.master(), p, access, RAM);
                    match (&want, &got) {
                        (Ok((level, pa, w, x)), Ok(t)) => {
                            prop_assert_eq!((*level, *pa, *w, *x), (t.level(), t.pa, t.writable, t.executable));
                            let found = b.lookup(p).expect("in RAM").expect("mapped");
                            prop_assert_eq!(Some(found.entry_pa), t.leaf.entry_pa);
                            prop_assert_eq!(found.entry, t.leaf.entry);
                        }
                        (Err(k), Err(e)) => {
                            prop_assert_eq!(*k, kind(e), "{}", e);
                            // The leaf in the model is unchanged: compare it.
                            if let Some((_, _, entry)) = model.leaf(p) {
                                prop_assert_eq!(entry, e.entry());
                            }
                        }
                        _ => prop_assert!(false, "walk {:?} {:?}: model {:?}, walker {:?}", p, access, want, got),
                    }
                }
            }
        }
        // Finally every leaf in the model is where the builder says.
        for (&(level, first), &entry) in &model.leaves {
            let m = b.lookup(PageIndex(first)).expect("in RAM").expect("mapped");
            prop_assert_eq!((m.level, m.first.0, m.entry), (level, first, entry));
        }
    }
}
