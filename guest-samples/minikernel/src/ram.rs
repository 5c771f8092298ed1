//! Guest RAM (ABI section 2) as the minikernel sees it: the direct map
//! ([`Ram`]), a frame allocator ([`Frames`]) and 4-level page tables
//! ([`PageTable`]) built in RAM in the VPTE format (ABI section 3).
//!
//! Table entries are `V|RW|U`, so the leaf alone decides a page's
//! protection. A leaf's frame bits say whether the page *exists*; its `V`
//! bit whether it is *accessible*: a `PROT_NONE` page keeps its frame in an
//! entry without `V`, so the walk fails on it but its contents survive a
//! later `mprotect`. Frame 0 is never handed out, so a zero entry is "no
//! page".

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vkabi::{PAGE_SIZE, VPTE_FRAME, VPTE_RW, VPTE_U, VPTE_V};

/// Frames below this stay unused (frame 0 above all); the frame pool
/// starts here or after the share counts, whichever is higher.
const FIRST_FRAME: u64 = 1 << 20;
/// Where the share counts start: one word per frame of RAM (page 1 on).
const SHARES: u64 = PAGE_SIZE;

/// The first frame the pool hands out in RAM of `size` bytes: above page
/// 0 (the pools' words) and the share counts.
fn first_frame(size: u64) -> u64 {
    let counts = SHARES + (size / PAGE_SIZE) * 8;
    counts
        .div_ceil(PAGE_SIZE)
        .saturating_mul(PAGE_SIZE)
        .max(FIRST_FRAME)
}
/// What every table entry (above the leaves) holds besides the frame.
const TABLE_BITS: u64 = VPTE_V | VPTE_RW | VPTE_U;

/// Guest RAM mapped `MAP_SHARED` into the minikernel: physical address `pa`
/// is byte `pa` of the mapping. The mapping's address is kept as an
/// integer (its provenance exposed) so that the host threads of the
/// process's threads can share the map.
#[derive(Debug)]
pub struct Ram {
    base: usize,
    size: u64,
}

impl Ram {
    /// Map all of guest RAM (`ram_fd`, `size` bytes). Never unmapped.
    pub fn map(fd: i32, size: u64) -> io::Result<Ram> {
        let words = vkguest::map_ram(fd, size)?;
        // The words are atomics (interior mutability), so writing through a
        // pointer derived from them is allowed; the mapping lives for the
        // rest of the program.
        Ok(Ram {
            base: words.as_ptr().expose_provenance(),
            size,
        })
    }

    /// The RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of `[pa, pa + len)`, checked to lie in RAM.
    pub fn ptr(&self, pa: u64, len: u64) -> *mut u8 {
        assert!(
            pa.checked_add(len).is_some_and(|end| end <= self.size),
            "physical range {pa:#x}+{len:#x} outside RAM"
        );
        std::ptr::with_exposed_provenance_mut(self.base + pa as usize)
    }

    /// The 64-bit word at `pa` (8-aligned), as an atomic: page-table
    /// entries are shared with the host's walker, which sets A and M.
    fn word(&self, pa: u64) -> &AtomicU64 {
        assert!(pa.is_multiple_of(8), "unaligned table entry {pa:#x}");
        let p = self.ptr(pa, 8);
        // SAFETY: in RAM (checked by ptr), 8-aligned (the mapping is page
        // aligned), and RAM is never unmapped; the host only accesses these
        // words atomically too.
        unsafe { &*p.cast::<AtomicU64>() }
    }

    /// Load the entry at `pa`.
    pub fn load(&self, pa: u64) -> u64 {
        self.word(pa).load(Ordering::Acquire)
    }

    /// Store the entry at `pa`.
    pub fn store(&self, pa: u64, v: u64) {
        self.word(pa).store(v, Ordering::Release);
    }

    /// Replace the entry at `pa`, returning the old value.
    pub fn swap(&self, pa: u64, v: u64) -> u64 {
        self.word(pa).swap(v, Ordering::AcqRel)
    }

    /// Compare-and-swap the user's 32-bit word at `pa` (4-aligned), as a
    /// futex word is changed: user threads change it atomically at the
    /// same time. Returns the value found (`old` if it was swapped).
    pub fn cmpxchg_u32(&self, pa: u64, old: u32, new: u32) -> u32 {
        assert!(pa.is_multiple_of(4), "unaligned futex word {pa:#x}");
        let p = self.ptr(pa, 4);
        // SAFETY: in RAM (checked by ptr), 4-aligned (checked; the mapping
        // is page aligned), RAM is never unmapped, and every other access
        // to a futex word (user code, the host's futex) is atomic.
        let word = unsafe { &*p.cast::<AtomicU32>() };
        match word.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(v) | Err(v) => v,
        }
    }

    /// Copy `bytes` to RAM at `pa`.
    pub fn write(&self, pa: u64, bytes: &[u8]) {
        let dst = self.ptr(pa, bytes.len() as u64);
        // SAFETY: `dst` is `bytes.len()` bytes of RAM (checked); RAM never
        // overlaps a Rust slice of the minikernel's own memory. The user
        // context that could also write this page is stopped (it is outside
        // RUN while the minikernel serves it).
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    /// Copy RAM at `pa` into `out`.
    pub fn read(&self, pa: u64, out: &mut [u8]) {
        let src = self.ptr(pa, out.len() as u64);
        // SAFETY: as in `write`, the other way round.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// Zero the page at `pa`.
    pub fn zero_page(&self, pa: u64) {
        let dst = self.ptr(pa, PAGE_SIZE);
        // SAFETY: one page of RAM (checked), not in use by anyone (a frame
        // being handed out).
        unsafe { ptr::write_bytes(dst, 0, PAGE_SIZE as usize) }
    }

    /// The share count of frame `pa`: how many address spaces besides one
    /// map it (copy-on-write after a fork); 0 for a frame one address
    /// space owns. The counts live in RAM, shared by every minikernel
    /// process of the guest.
    fn shares(&self, pa: u64) -> &AtomicU64 {
        assert!(
            pa.is_multiple_of(PAGE_SIZE) && pa >= first_frame(self.size) && pa < self.size,
            "share count of a frame outside the pool: {pa:#x}"
        );
        self.word(SHARES + (pa / PAGE_SIZE) * 8)
    }

    /// One more address space maps frame `pa`.
    pub fn share(&self, pa: u64) {
        self.shares(pa).fetch_add(1, Ordering::AcqRel);
    }

    /// Whether another address space also maps frame `pa`.
    pub fn is_shared(&self, pa: u64) -> bool {
        self.shares(pa).load(Ordering::Acquire) != 0
    }

    /// One address space stops mapping frame `pa`: `true` if others still
    /// do (the count went down), `false` if the caller was its only user
    /// (it may free or reuse the frame).
    pub fn unshare(&self, pa: u64) -> bool {
        self.shares(pa)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1))
            .is_ok()
    }

    /// Copy the page at `src` to the page at `dst`.
    pub fn copy_page(&self, dst: u64, src: u64) {
        let (d, s) = (self.ptr(dst, PAGE_SIZE), self.ptr(src, PAGE_SIZE));
        assert_ne!(dst, src, "copying a frame onto itself");
        // SAFETY: two distinct pages of RAM (checked), the destination a
        // fresh frame nobody else uses.
        unsafe { ptr::copy_nonoverlapping(s, d, PAGE_SIZE as usize) }
    }
}

/// The frame pool's words in RAM page 0 (shared by every minikernel
/// process of the guest, as RAM is): a spinlock, the bump pointer, the head
/// of the free list (linked through each free frame's first word).
const POOL_LOCK: u64 = 0;
const POOL_NEXT: u64 = 8;
const POOL_HEAD: u64 = 16;
/// Frames a process takes from the pool at a time.
const CHUNK: u64 = 256;

/// Frames of guest RAM for one minikernel process.
///
/// All processes of the guest (the minikernel forks a host process for each
/// user process) share one pool kept in RAM page 0: a bump pointer over
/// `[first_frame, ram_size)` and a free list, under a spinlock. A process
/// takes [`CHUNK`] frames at a time (recycled ones first, then consecutive
/// ones from the bump pointer, which lets the host batch its faults) and gives its frames back
/// when it ends ([`Frames::release`]). Every frame handed out is zero.
#[derive(Debug)]
pub struct Frames {
    /// Never-used (zero) frames `[next, end)` taken from the bump pointer.
    next: u64,
    end: u64,
    /// Recycled frames (cleared when handed out).
    dirty: Vec<u64>,
    /// RAM size.
    limit: u64,
    /// The first frame of the pool.
    first: u64,
}

impl Frames {
    /// This process's (empty) share of the pool in `ram`.
    pub fn new(ram: &Ram) -> Frames {
        Frames {
            next: 0,
            end: 0,
            dirty: Vec::new(),
            limit: ram.size() & !(PAGE_SIZE - 1),
            first: first_frame(ram.size()),
        }
    }

    /// Forget the frames this process holds without giving them back: the
    /// child of a host fork, whose copy of them belongs to its parent.
    pub fn forget_local(&mut self) {
        self.next = 0;
        self.end = 0;
        self.dirty.clear();
    }

    /// A zeroed frame, or `None` when RAM is full.
    pub fn alloc(&mut self, ram: &Ram) -> Option<u64> {
        if self.next == self.end && self.dirty.is_empty() {
            self.refill(ram);
        }
        if self.next < self.end {
            let pa = self.next;
            self.next += PAGE_SIZE;
            return Some(pa);
        }
        let pa = self.dirty.pop()?;
        ram.zero_page(pa);
        Some(pa)
    }

    /// Take frames from the pool: up to [`CHUNK`] recycled ones from the
    /// free list, else a run from the bump pointer. Recycled frames come
    /// first: RAM behind them is in memory already, while a never-used
    /// frame costs the host a page fault on RAM (allocating and clearing
    /// the page) when it is first written, which made a fork+exec loop
    /// spend most of its time there.
    fn refill(&mut self, ram: &Ram) {
        lock(ram);
        let mut head = ram.load(POOL_HEAD);
        while head != 0 && (self.dirty.len() as u64) < CHUNK {
            self.dirty.push(head);
            head = ram.load(head);
        }
        ram.store(POOL_HEAD, head);
        // Handed out lowest first: frames freed together (a process's, in
        // address order) come back as consecutive runs where they were,
        // which lets the host install neighbours together (prefault).
        self.dirty.sort_unstable_by(|a, b| b.cmp(a));
        if self.dirty.is_empty() {
            let next = ram.load(POOL_NEXT).max(self.first);
            if next < self.limit {
                let end = (next + CHUNK * PAGE_SIZE).min(self.limit);
                ram.store(POOL_NEXT, end);
                (self.next, self.end) = (next, end);
            }
        }
        unlock(ram);
    }

    /// This address space stops using frame `pa`: it goes back to this
    /// process's share of the pool unless another address space still
    /// maps it ([`Ram::unshare`]).
    pub fn free(&mut self, ram: &Ram, pa: u64) {
        if !ram.unshare(pa) {
            self.dirty.push(pa);
        }
    }

    /// Give every frame this process holds back to the pool.
    pub fn release(&mut self, ram: &Ram) {
        let mut back = std::mem::take(&mut self.dirty);
        // Unused frames of the last run go back to the bump pointer if
        // nobody took frames after it (no page of them is touched), else
        // on the free list.
        lock(ram);
        if self.next < self.end && ram.load(POOL_NEXT) == self.end {
            ram.store(POOL_NEXT, self.next);
            self.end = self.next;
        }
        unlock(ram);
        back.extend((self.next..self.end).step_by(PAGE_SIZE as usize));
        self.next = self.end;
        give_back(ram, &back);
    }
}

/// Push `frames` on the pool's free list (linked in private first, spliced
/// under the lock).
fn give_back(ram: &Ram, frames: &[u64]) {
    let (Some(&first), Some(&last)) = (frames.first(), frames.last()) else {
        return;
    };
    for w in frames.windows(2) {
        ram.store(w[0], w[1]);
    }
    lock(ram);
    ram.store(last, ram.load(POOL_HEAD));
    ram.store(POOL_HEAD, first);
    unlock(ram);
}

/// Take the pool's spinlock (held for a few loads and stores).
fn lock(ram: &Ram) {
    lock_at(ram, POOL_LOCK);
}

/// Release the pool's spinlock.
fn unlock(ram: &Ram) {
    unlock_at(ram, POOL_LOCK);
}

/// The idle-vmspace pool's words in RAM page 0, after the frame pool's: a
/// spinlock, the count, then the ids.
const VM_POOL_LOCK: u64 = 2048;
const VM_POOL_COUNT: u64 = 2056;
const VM_POOL_IDS: u64 = 2064;
/// Most idle vmspaces kept (each is a stub process on the host).
pub const VM_POOL_MAX: u64 = 16;

/// Idle vmspaces shared by every minikernel process of the guest (in RAM
/// page 0, as the frame pool): an exiting process leaves its vmspace here
/// ([`give_vmspace`]) and the child of the next fork takes it
/// ([`take_vmspace`]) instead of creating one, which costs a host process
/// and its window (milliseconds); the taker points its window at its own
/// tables (`MADV_SETMAP`, which drops every host translation).
pub fn take_vmspace(ram: &Ram) -> Option<u64> {
    lock_at(ram, VM_POOL_LOCK);
    let n = ram.load(VM_POOL_COUNT).min(VM_POOL_MAX);
    let id = (n > 0).then(|| {
        ram.store(VM_POOL_COUNT, n - 1);
        ram.load(VM_POOL_IDS + (n - 1) * 8)
    });
    unlock_at(ram, VM_POOL_LOCK);
    id.filter(|id| *id != 0)
}

/// Leave vmspace `id` (nothing runs in it) in the pool; `false` when the
/// pool is full (the caller destroys it).
pub fn give_vmspace(ram: &Ram, id: u64) -> bool {
    lock_at(ram, VM_POOL_LOCK);
    let n = ram.load(VM_POOL_COUNT).min(VM_POOL_MAX);
    let room = n < VM_POOL_MAX;
    if room {
        ram.store(VM_POOL_IDS + n * 8, id);
        ram.store(VM_POOL_COUNT, n + 1);
    }
    unlock_at(ram, VM_POOL_LOCK);
    room
}

/// Take the spinlock at `at` in RAM page 0.
fn lock_at(ram: &Ram, at: u64) {
    let word = ram.word(at);
    while word
        .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
}

/// Release the spinlock at `at`.
fn unlock_at(ram: &Ram, at: u64) {
    ram.word(at).store(0, Ordering::Release);
}

/// Out of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of guest RAM (try a larger -m)")]
pub struct OutOfMemory;

/// One address space's 4-level page table, rooted at an L4 table in RAM.
/// Page index = `va >> 12` (the window's offset equals its start).
#[derive(Debug)]
pub struct PageTable {
    root: u64,
}

impl PageTable {
    /// An empty table.
    pub fn new(ram: &Ram, frames: &mut Frames) -> Result<PageTable, OutOfMemory> {
        Ok(PageTable {
            root: frames.alloc(ram).ok_or(OutOfMemory)?,
        })
    }

    /// The master PDE for `MADV_SETMAP`.
    pub fn master(&self) -> u64 {
        self.root | TABLE_BITS
    }

    /// The address of the L1 entry for `va`; creates missing tables when
    /// `frames` is given, else `None` where a table is missing.
    fn slot(&self, ram: &Ram, mut frames: Option<&mut Frames>, va: u64) -> Option<u64> {
        let mut table = self.root;
        for shift in [39, 30, 21] {
            let e_pa = table + ((va >> shift) & 511) * 8;
            let e = ram.load(e_pa);
            table = if e & VPTE_V != 0 {
                e & VPTE_FRAME
            } else {
                let t = frames.as_deref_mut()?.alloc(ram)?;
                ram.store(e_pa, t | TABLE_BITS);
                t
            };
        }
        Some(table + ((va >> 12) & 511) * 8)
    }

    /// The leaf for `va` (0: no page).
    pub fn get(&self, ram: &Ram, va: u64) -> u64 {
        self.slot(ram, None, va).map_or(0, |pa| ram.load(pa))
    }

    /// Set the leaf for `va`, creating tables; returns the old leaf.
    pub fn set(
        &self,
        ram: &Ram,
        frames: &mut Frames,
        va: u64,
        leaf: u64,
    ) -> Result<u64, OutOfMemory> {
        let pa = self.slot(ram, Some(frames), va).ok_or(OutOfMemory)?;
        Ok(ram.swap(pa, leaf))
    }

    /// Call `f(va, entry_pa, leaf)` for every nonzero leaf in `[start, end)`,
    /// skipping missing tables.
    pub fn visit(&self, ram: &Ram, start: u64, end: u64, f: &mut dyn FnMut(u64, u64, u64)) {
        visit_level(ram, self.root, 39, 0, start, end, f);
    }

    /// Free every page and table of this address space.
    pub fn destroy(self, ram: &Ram, frames: &mut Frames) {
        free_level(ram, frames, self.root, 39);
    }
}

/// [`PageTable::visit`] below the table at `table` covering `base..` with
/// entries of `1 << shift` bytes.
fn visit_level(
    ram: &Ram,
    table: u64,
    shift: u32,
    base: u64,
    start: u64,
    end: u64,
    f: &mut dyn FnMut(u64, u64, u64),
) {
    let span = 1u64 << shift;
    for i in 0..512u64 {
        let lo = base + i * span;
        let hi = lo + span;
        if hi <= start || lo >= end {
            continue;
        }
        let e_pa = table + i * 8;
        let e = ram.load(e_pa);
        if shift == 12 {
            if e != 0 {
                f(lo, e_pa, e);
            }
        } else if e & VPTE_V != 0 {
            visit_level(ram, e & VPTE_FRAME, shift - 9, lo, start, end, f);
        }
    }
}

/// Free the pages and tables below the table at `table`, then the table.
fn free_level(ram: &Ram, frames: &mut Frames, table: u64, shift: u32) {
    for i in 0..512u64 {
        let e = ram.load(table + i * 8);
        if shift == 12 {
            if e & VPTE_FRAME != 0 {
                frames.free(ram, e & VPTE_FRAME);
            }
        } else if e & VPTE_V != 0 {
            free_level(ram, frames, e & VPTE_FRAME, shift - 9);
        }
    }
    frames.free(ram, table);
}
