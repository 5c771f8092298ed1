//! A naive reference of the walk and the checks built on it, for tests,
//! property tests and the fuzz target (`vpte/fuzz`): [`reference_walk`]
//! computes, without writing anything, what [`walk`] must return and which
//! entries it must change; [`CountingMem`] records what a walk touched;
//! [`WalkCase`] is one arbitrary walk over arbitrary RAM, checked against all
//! of that.

use std::cell::RefCell;
use std::collections::BTreeMap;

use vkabi::{PAGE_SIZE, VPTE_A, VPTE_M, VPTE_NX, VPTE_RW, VPTE_V};

use crate::addr::{GuestPhysAddr, PageIndex};
use crate::entry::{Level, Vpte};
use crate::mem::{AtomicRam, PhysMem, PhysMemError};
use crate::prefault::prefault_run;
use crate::walk::{Access, Site, Translation, WalkError, walk};

/// What a walk must do: its result, and the final value of every entry it
/// must change (address, value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The result [`walk`] must return.
    pub result: Result<Translation, WalkError>,
    /// The entries the walk must leave changed, with their new values.
    pub updates: BTreeMap<GuestPhysAddr, u64>,
}

/// The ABI section 3 walk, written out level by level as plainly as possible,
/// over a snapshot `ram` (`ram[i]` is the byte at guest physical address `i`,
/// `ram.len()` is the RAM size). Writes nothing: the updates it would make
/// are returned (later reads of an updated entry see the update).
pub fn reference_walk(ram: &[u8], master: Vpte, pindex: PageIndex, access: Access) -> Expected {
    let ram_size = ram.len() as u64;
    let mut updates = BTreeMap::new();
    let result = reference_steps(ram, &mut updates, master, pindex, access, ram_size);
    Expected { result, updates }
}

fn reference_steps(
    ram: &[u8],
    updates: &mut BTreeMap<GuestPhysAddr, u64>,
    master: Vpte,
    pindex: PageIndex,
    access: Access,
    ram_size: u64,
) -> Result<Translation, WalkError> {
    let levels = [Level::Master, Level::L4, Level::L3, Level::L2, Level::L1];
    let shifts = [36u32, 27, 18, 9, 0];
    let mut rw_everywhere = true;
    let mut nx_somewhere = false;
    let mut site = Site {
        level: Level::Master,
        entry: master,
        entry_pa: None,
    };
    for depth in 0..5 {
        let v = site.entry.0;
        if v & VPTE_V == 0 {
            return Err(WalkError::NotValid(site));
        }
        if access == Access::Write && v & VPTE_RW == 0 {
            return Err(WalkError::WriteDenied(site));
        }
        if access == Access::Execute && v & VPTE_NX != 0 {
            return Err(WalkError::ExecDenied(site));
        }
        let shift = shifts[depth];
        let leaf = site.entry.is_superpage() || shift == 0;
        let target = if leaf {
            site.entry.frame().0 + (pindex.0 & ((1u64 << shift) - 1)) * PAGE_SIZE
        } else {
            site.entry.frame().0
        };
        if target >= ram_size || ram_size - target < PAGE_SIZE {
            return Err(if leaf {
                WalkError::PageBeyondRam {
                    site,
                    page: GuestPhysAddr(target),
                    ram_size,
                }
            } else {
                WalkError::TableBeyondRam {
                    site,
                    table: GuestPhysAddr(target),
                    ram_size,
                }
            });
        }
        // Only entries that pass every check are updated.
        if let Some(pa) = site.entry_pa {
            let mut new = v | VPTE_A;
            if access == Access::Write && v & VPTE_RW != 0 {
                new |= VPTE_M;
            }
            if new != v {
                updates.insert(pa, new);
            }
            site.entry = Vpte(new);
        }
        rw_everywhere = rw_everywhere && v & VPTE_RW != 0;
        nx_somewhere = nx_somewhere || v & VPTE_NX != 0;
        if leaf {
            return Ok(Translation {
                pindex,
                pa: GuestPhysAddr(target),
                writable: rw_everywhere && (site.entry.is_modified() || access == Access::Write),
                executable: !nx_somewhere,
                leaf: site,
            });
        }
        let table = target;
        let index = (pindex.0 >> (shift - 9)) % 512;
        let pa = GuestPhysAddr(table + index * 8);
        let value = match updates.get(&pa) {
            Some(&updated) => updated,
            None => {
                let at = pa.0 as usize;
                let mut word = [0u8; 8];
                word.copy_from_slice(&ram[at..at + 8]);
                u64::from_le_bytes(word)
            }
        };
        site = Site {
            level: levels[depth + 1],
            entry: Vpte(value),
            entry_pa: Some(pa),
        };
    }
    unreachable!("shift 0 always stops the walk")
}

/// A [`PhysMem`] that records the addresses loaded and compare-and-swapped
/// through it (single-threaded).
#[derive(Debug)]
pub struct CountingMem<M> {
    inner: M,
    loads: RefCell<Vec<GuestPhysAddr>>,
    cas: RefCell<Vec<GuestPhysAddr>>,
}

impl<M: PhysMem> CountingMem<M> {
    /// Count accesses to `inner`.
    pub fn new(inner: M) -> Self {
        CountingMem {
            inner,
            loads: RefCell::default(),
            cas: RefCell::default(),
        }
    }

    /// The addresses loaded, in order.
    pub fn loads(&self) -> Vec<GuestPhysAddr> {
        self.loads.borrow().clone()
    }

    /// The addresses compare-and-swapped, in order.
    pub fn cas(&self) -> Vec<GuestPhysAddr> {
        self.cas.borrow().clone()
    }

    /// Forget what was recorded.
    pub fn reset(&self) {
        self.loads.borrow_mut().clear();
        self.cas.borrow_mut().clear();
    }

    /// The wrapped memory.
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

impl<M: PhysMem> PhysMem for CountingMem<M> {
    fn load(&self, pa: GuestPhysAddr) -> Result<u64, PhysMemError> {
        self.loads.borrow_mut().push(pa);
        self.inner.load(pa)
    }

    fn compare_exchange(
        &self,
        pa: GuestPhysAddr,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, PhysMemError> {
        self.cas.borrow_mut().push(pa);
        self.inner.compare_exchange(pa, current, new)
    }
}

/// One arbitrary walk: RAM contents and size, master PDE, page index and
/// access. [`WalkCase::check`] runs it and checks everything the walker
/// promises.
#[derive(Clone, PartialEq, Eq)]
pub struct WalkCase {
    /// The RAM contents; its length is the RAM size (a multiple of 8).
    pub ram: Vec<u8>,
    /// The master PDE.
    pub master: Vpte,
    /// The page index.
    pub pindex: PageIndex,
    /// The access.
    pub access: Access,
}

/// Shows the RAM size and only its non-zero words, as entries.
impl std::fmt::Debug for WalkCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let words: Vec<String> = self
            .ram
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(i, c)| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                let v = u64::from_le_bytes(w);
                (v != 0).then(|| format!("{:#x}: {:?}", i * 8, Vpte(v)))
            })
            .collect();
        f.debug_struct("WalkCase")
            .field("ram_size", &format_args!("{:#x}", self.ram.len()))
            .field("ram_words", &words)
            .field("master", &self.master)
            .field("pindex", &self.pindex)
            .field("access", &self.access)
            .finish()
    }
}

/// Largest RAM of a [`WalkCase`], in pages.
pub const CASE_MAX_PAGES: u64 = 16;

impl WalkCase {
    /// A case with `pages` pages of RAM (1 to [`CASE_MAX_PAGES`]) less `trim`
    /// 8-byte words (so the RAM size need not be page aligned), the given
    /// words written at word indexes (taken modulo the RAM size). When `fold`
    /// is set for a value, its frame is reduced modulo the RAM size so that
    /// walks go deep more often; the same for the master PDE.
    pub fn new(
        pages: u64,
        trim: u64,
        (master, fold_master): (u64, bool),
        pindex: u64,
        access: Access,
        writes: &[(u16, u64, bool)],
    ) -> WalkCase {
        let pages = pages.clamp(1, CASE_MAX_PAGES);
        let size = (pages * PAGE_SIZE).saturating_sub(8 * trim).max(8);
        let fold = |v: u64, yes: bool| {
            if yes {
                (v & !vkabi::VPTE_FRAME)
                    | (((v & vkabi::VPTE_FRAME) % (pages * PAGE_SIZE)) & !0xFFF)
            } else {
                v
            }
        };
        let mut ram = vec![0u8; size as usize];
        let words = size / 8;
        for &(at, value, yes) in writes {
            let i = (u64::from(at) % words) as usize * 8;
            ram[i..i + 8].copy_from_slice(&fold(value, yes).to_le_bytes());
        }
        WalkCase {
            ram,
            master: Vpte(fold(master, fold_master)),
            pindex: PageIndex(pindex),
            access,
        }
    }

    /// Decode a case from fuzzer bytes: `pages`, `trim`, master (8 bytes),
    /// page index (8), access and flags, then writes of 11 bytes each (word
    /// index 2, value 8, fold 1). Missing bytes are zero.
    pub fn from_bytes(data: &[u8]) -> WalkCase {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let word = |at: usize| {
            let mut w = [0u8; 8];
            for (k, b) in w.iter_mut().enumerate() {
                *b = byte(at + k);
            }
            u64::from_le_bytes(w)
        };
        let access = Access::ALL[usize::from(byte(19) % 3)];
        let writes: Vec<(u16, u64, bool)> = data
            .get(20..)
            .unwrap_or(&[])
            .chunks_exact(11)
            .map(|c| {
                let at = u16::from_le_bytes([c[0], c[1]]);
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[2..10]);
                (at, u64::from_le_bytes(w), c[10] & 1 == 1)
            })
            .collect();
        let trim = if byte(1) & 0x80 != 0 {
            u64::from(byte(1) & 0x7F)
        } else {
            0
        };
        WalkCase::new(
            u64::from(byte(0)) % CASE_MAX_PAGES + 1,
            trim,
            (word(2), byte(18) & 1 == 1),
            word(10),
            access,
            &writes,
        )
    }

    /// Walk and check: the walk does not panic, reads nothing outside RAM (no
    /// memory error), loads at most 4 entries and writes only entries it
    /// loaded, returns what [`reference_walk`] says and changes exactly the
    /// entries it says; then the prefault run around a translation holds
    /// pages whose walks would change nothing and give the run's frames and
    /// protection, and the query writes nothing.
    pub fn check(&self) -> Result<(), String> {
        let ram_size = self.ram.len() as u64;
        let expected = reference_walk(&self.ram, self.master, self.pindex, self.access);
        let mem = CountingMem::new(AtomicRam::from_bytes(&self.ram));
        let result = walk(&mem, self.master, self.pindex, self.access, ram_size);
        if let Err(e @ WalkError::Memory { .. }) = result {
            return Err(format!("walk read outside RAM: {e}"));
        }
        let loads = mem.loads();
        if loads.len() > 4 {
            return Err(format!("{} table reads: {loads:?}", loads.len()));
        }
        if let Some(pa) = mem.cas().iter().find(|pa| !loads.contains(pa)) {
            return Err(format!("wrote {pa}, which it did not read"));
        }
        if result != expected.result {
            return Err(format!(
                "walk returned {result:?}, reference says {:?}",
                expected.result
            ));
        }
        let mut want = self.ram.clone();
        for (pa, v) in &expected.updates {
            let at = pa.0 as usize;
            want[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let after = mem.inner().to_bytes();
        if after != want {
            let diff = (0..want.len() / 8)
                .find(|i| after[i * 8..i * 8 + 8] != want[i * 8..i * 8 + 8])
                .map_or(0, |i| i * 8);
            return Err(format!("memory differs from the reference at pa {diff:#x}"));
        }
        if let Ok(t) = result {
            self.check_prefault(&mem, &t, &after)?;
        }
        Ok(())
    }

    fn check_prefault(
        &self,
        mem: &CountingMem<AtomicRam>,
        t: &Translation,
        after: &[u8],
    ) -> Result<(), String> {
        let ram_size = after.len() as u64;
        mem.reset();
        let window = PageIndex(0)..PageIndex(u64::MAX);
        let run = prefault_run(mem, t, window, 16, ram_size);
        if !mem.cas().is_empty() || mem.inner().to_bytes() != after {
            return Err("prefault query wrote memory".into());
        }
        if t.pindex.0 == u64::MAX {
            // No `Range` holds the last page index: the run must be empty.
            return match run.count {
                0 => Ok(()),
                _ => Err(format!("prefault run {run:?} outside its window")),
            };
        }
        if !run.contains(t.pindex) || run.count > 16 {
            return Err(format!("bad prefault run {run:?} for {t}"));
        }
        if run.writable != t.writable || run.executable != t.executable {
            return Err(format!(
                "prefault run {run:?} changes the protection of {t}"
            ));
        }
        for k in 0..run.count {
            let p = PageIndex(run.first.0 + k);
            let e = reference_walk(after, self.master, p, Access::Read);
            let pa = GuestPhysAddr(run.first_pa.0 + k * PAGE_SIZE);
            match e.result {
                Ok(u)
                    if e.updates.is_empty()
                        && u.pa == pa
                        && (u.writable || !run.writable || p == t.pindex)
                        && (u.executable || !run.executable) => {}
                other => {
                    return Err(format!(
                        "prefault run {run:?} holds {p}, whose walk gives {other:?} \
                         with updates {:?}",
                        e.updates
                    ));
                }
            }
        }
        Ok(())
    }
}
