//! Property test: tables built through the builder, then walked, agree with a
//! naive model (a map from leaf to entry) on mapped, unmapped and superpage
//! addresses, for every access, including the A/M bits the walks set, with
//! RW cleared and NX set on directory entries (L4, L3, L2) as well as leaves.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use vpte::{
    Access, BuildError, CellRam, FrameAllocator, GuestPhysAddr, Level, PageIndex, PageSize,
    PageTableBuilder, PhysMem, VPTE_A, VPTE_G, VPTE_M, VPTE_NX, VPTE_RW, VPTE_U, Vpte, WalkError,
    walk,
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
    /// Set the RW/NX bits (`bits` holds only those) of the directory entry at
    /// `level` that covers the page, if that entry points at a table: a
    /// write needs RW at every level, a fetch no NX at any.
    ProtectDir(Level, PageIndex, u64),
    Walk(PageIndex, Access),
}

/// The model: leaves by (level, first page index), and the regions where the
/// builder has made a table (an entry at `level` covering `first` that points
/// at a table), which decide conflicts.
#[derive(Default, Debug)]
struct Model {
    leaves: BTreeMap<(Level, u64), Vpte>,
    tables: BTreeSet<(Level, u64)>,
    /// RW/NX of the table entries that are not plain `V|RW|U` (absent: RW, no NX).
    dir_prot: BTreeMap<(Level, u64), u64>,
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

    /// What a walk must give: the translation, or why it fails and at which
    /// level. Entries are checked top-down, directories included, as the walk
    /// meets them.
    fn walk(&mut self, p: PageIndex, access: Access) -> Result<Walked, (&'static str, Level)> {
        let mut all_rw = true;
        let mut no_nx = true;
        for level in UPPER {
            let first = level.region_start(p).0;
            if !self.tables.contains(&(level, first)) {
                break;
            }
            let prot = self
                .dir_prot
                .get(&(level, first))
                .copied()
                .unwrap_or(VPTE_RW);
            if access == Access::Write && prot & VPTE_RW == 0 {
                return Err(("write denied", level));
            }
            if access == Access::Execute && prot & VPTE_NX != 0 {
                return Err(("exec denied", level));
            }
            all_rw &= prot & VPTE_RW != 0;
            no_nx &= prot & VPTE_NX == 0;
        }
        let Some((level, first, entry)) = self.leaf(p) else {
            let missing = [Level::L4, Level::L3, Level::L2, Level::L1]
                .into_iter()
                .find(|l| l == &Level::L1 || !self.tables.contains(&(*l, l.region_start(p).0)))
                .expect("L1 ends the search");
            return Err(("not valid", missing));
        };
        if access == Access::Write && !entry.is_writable() {
            return Err(("write denied", level));
        }
        if access == Access::Execute && entry.is_no_exec() {
            return Err(("exec denied", level));
        }
        let pa = entry.frame().0 + (p.0 - first) * 4096;
        if pa + 4096 > RAM {
            return Err(("page beyond RAM", level));
        }
        let m = if access == Access::Write { VPTE_M } else { 0 };
        let entry = entry.with(VPTE_A | m);
        self.leaves.insert((level, first), entry);
        Ok((
            level,
            GuestPhysAddr(pa),
            all_rw && entry.is_writable() && entry.is_modified(),
            no_nx && !entry.is_no_exec(),
        ))
    }
}

/// A translation as the model sees it: leaf level, page, writable, executable.
type Walked = (Level, GuestPhysAddr, bool, bool);

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
        1 => (prop::sample::select(UPPER.to_vec()), pindex(), bits())
            .prop_map(|(l, p, b)| Op::ProtectDir(l, p, b & (VPTE_RW | VPTE_NX))),
        6 => (pindex(), access).prop_map(|(p, a)| Op::Walk(p, a)),
    ]
}

/// Where the directory entry at `level` covering `p` lives, if it points at
/// a table (valid, no PS): found by following table entries from `root`.
fn dir_entry(
    mem: &CellRam<'_>,
    root: GuestPhysAddr,
    level: Level,
    p: PageIndex,
) -> Option<GuestPhysAddr> {
    let mut table = root.0;
    for l in UPPER {
        let pa = GuestPhysAddr(table + ((p.0 >> l.shift()) & 511) * 8);
        let e = Vpte(mem.load(pa).expect("in RAM"));
        if !e.is_valid() || e.is_superpage() {
            return None;
        }
        if l == level {
            return Some(pa);
        }
        table = e.frame().0;
    }
    None
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
                Op::ProtectDir(level, p, prot) => {
                    let first = level.region_start(p).0;
                    if model.tables.contains(&(level, first)) {
                        model.dir_prot.insert((level, first), prot);
                    }
                    let found = dir_entry(b.mem(), b.root(), level, p);
                    prop_assert_eq!(found.is_some(), model.tables.contains(&(level, first)));
                    if let Some(pa) = found {
                        let v = b.mem().load(pa).expect("in RAM");
                        b.mem().store(pa, (v & !(VPTE_RW | VPTE_NX)) | prot).expect("in RAM");
                    }
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
                        (Err((k, level)), Err(e)) => {
                            prop_assert_eq!((*k, *level), (kind(e), e.level()), "{}", e);
                            // A failing leaf is unchanged: compare it.
                            if let Some((leaf_level, _, entry)) = model.leaf(p)
                                && leaf_level == *level
                            {
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
