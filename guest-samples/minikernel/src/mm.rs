//! A process's memory: its areas ([`Vma`]: start, end, protection), its
//! page table, its program break, and the operations Linux offers on them
//! (`mmap`, `munmap`, `mprotect`, `brk`, `madvise(MADV_DONTNEED)`), plus
//! demand paging ([`Mm::fault`]) and access to user memory from the
//! minikernel ([`Mm::translate`], [`Mm::read`], [`Mm::write`], [`Mm::cstr`]).
//!
//! Anonymous memory (stack, heap, anonymous mmaps) is demand-zero: a page
//! gets a zeroed frame on its first `T_PAGEFLT` or when the minikernel first
//! touches it for a system call. Program segments and file mappings are
//! copied into frames when they are mapped. A leaf carries the protection of
//! its area: `RW` for `PROT_WRITE`, `NX` unless `PROT_EXEC`, no `V` for
//! `PROT_NONE`.
//!
//! Every operation that removes a page or takes a right away returns the
//! range the caller must `MADV_INVAL` in the vmspace (ABI section 5);
//! adding pages or rights needs none.

use vkabi::{
    PAGE_SIZE, PGEX_I, PGEX_W, VPTE_A, VPTE_FRAME, VPTE_M, VPTE_NX, VPTE_RW, VPTE_U, VPTE_V,
};

use crate::ram::{Frames, OutOfMemory, PageTable, Ram};

/// `PROT_READ`, `PROT_WRITE`, `PROT_EXEC`.
pub const PROT_READ: i32 = 1;
/// See [`PROT_READ`].
pub const PROT_WRITE: i32 = 2;
/// See [`PROT_READ`].
pub const PROT_EXEC: i32 = 4;

/// The lowest address a program may map (Linux's `vm.mmap_min_addr`).
pub const MIN_ADDR: u64 = 0x1_0000;
/// Top of the area where `mmap` without an address places mappings.
pub const MMAP_TOP: u64 = 0x7f00_0000_0000;
/// The stack's size.
pub const STACK_SIZE: u64 = 8 << 20;
/// Pages a demand fault maps at once (the faulting one and its next
/// neighbours in the area).
pub const FAULT_AROUND: u64 = 16;
/// Most writable pages a fork copies at once rather than sharing them
/// copy-on-write (a copy costs about a microsecond, a copy-on-write fault
/// tens of them).
pub const EAGER_COPY_MAX: u64 = 64;
/// Pages of a growing heap (`brk`) given frames at once.
pub const BRK_NOW: u64 = 4;
/// Most bytes one system call moves through user memory in one go.
pub const MAX_IO: u64 = 1 << 24;

/// Round `x` up to a page.
pub fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Round `x` down to a page.
pub fn page_down(x: u64) -> u64 {
    x & !(PAGE_SIZE - 1)
}

/// A memory area: `[start, end)`, page aligned, one protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// Address after the last.
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: i32,
    /// `MAP_SHARED`: a fork shares its pages (the same frames, writable
    /// in both) instead of copying them on write.
    pub shared: bool,
}

/// What a `T_PAGEFLT` turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A fresh zeroed page is now mapped: RUN again.
    Mapped,
    /// The leaf already allows the access: the host's translation was
    /// stale; the caller invalidates the page and RUNs again.
    Stale,
    /// No area, or the area forbids the access: `SIGSEGV`.
    Segv,
    /// A write to copy-on-write pages: `[start, end)` (the faulting page
    /// and its copy-on-write neighbours) are now this address space's own
    /// and writable; `copied` of them are copies (new frames), so the
    /// caller invalidates the range before RUNning again.
    Cow {
        /// First page.
        start: u64,
        /// After the last page.
        end: u64,
        /// Pages copied (the rest were taken over).
        copied: u64,
    },
}

/// The leaf bits for a page of an area with protection `prot`.
pub fn leaf_bits(prot: i32) -> u64 {
    if prot & (PROT_READ | PROT_WRITE | PROT_EXEC) == 0 {
        return 0;
    }
    // A and M set up front: the minikernel does not page out, and entries
    // with A (and M) let the host install neighbours ahead of access
    // (ABI section 3, Prefault).
    let mut bits = VPTE_V | VPTE_U | VPTE_A;
    if prot & PROT_WRITE != 0 {
        bits |= VPTE_RW | VPTE_M;
    }
    if prot & PROT_EXEC == 0 {
        bits |= VPTE_NX;
    }
    bits
}

/// A process's address space (its vmspace is the caller's).
#[derive(Debug)]
pub struct Mm {
    /// The page table.
    pub pt: PageTable,
    /// The areas, sorted, not overlapping.
    vmas: Vec<Vma>,
    /// Where the heap starts (just above the program).
    pub brk_start: u64,
    /// The program break.
    pub brk: u64,
    /// The top of the stack.
    pub stack_top: u64,
    /// Pages whose frame the minikernel replaced while serving a system
    /// call (a copy-on-write copy): the caller invalidates them before
    /// the program runs again ([`Mm::take_stale`]).
    stale: Vec<u64>,
}

impl Mm {
    /// An empty address space with its stack area below `stack_top`.
    pub fn new(ram: &Ram, frames: &mut Frames, stack_top: u64) -> Result<Mm, OutOfMemory> {
        let mut mm = Mm {
            pt: PageTable::new(ram, frames)?,
            vmas: Vec::new(),
            brk_start: 0,
            brk: 0,
            stack_top,
            stale: Vec::new(),
        };
        mm.add(stack_top - STACK_SIZE, stack_top, PROT_READ | PROT_WRITE);
        Ok(mm)
    }

    /// A copy of this address space for a child (`fork`), copy-on-write:
    /// the child's table maps the same frames, each frame's share count
    /// goes up, and every leaf loses `RW` in both tables (a write faults and
    /// [`Mm::fault`] copies the page, or takes it over when it is the last
    /// user). The caller invalidates its own range afterwards (its leaves
    /// lost rights), also when this fails.
    ///
    /// The pages of `hot` (the stack around the forking thread's `rsp`,
    /// which both sides write at once) are copied for the child straight
    /// away instead, saving a fault on each side; so are all writable pages
    /// when there are at most [`EAGER_COPY_MAX`] (copying them costs less
    /// than the faults sharing them would: a small program that forks and
    /// execs, as a shell does). Returns the child and
    /// the ranges whose leaves lost `RW` (coalesced, in address order).
    pub fn fork(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        hot: std::ops::Range<u64>,
    ) -> Result<(Mm, Vec<(u64, u64)>), OutOfMemory> {
        let child = Mm {
            pt: PageTable::new(ram, frames)?,
            vmas: self.vmas.clone(),
            brk_start: self.brk_start,
            brk: self.brk,
            stack_top: self.stack_top,
            stale: Vec::new(),
        };
        // (va, entry, leaf, in a MAP_SHARED area)
        let mut pages = Vec::new();
        for v in &self.vmas {
            self.pt.visit(ram, v.start, v.end, &mut |va, e_pa, leaf| {
                pages.push((va, e_pa, leaf, v.shared));
            });
        }
        let writable = pages
            .iter()
            .filter(|(_, _, l, shared)| l & VPTE_RW != 0 && !shared)
            .count();
        let eager = writable as u64 <= EAGER_COPY_MAX;
        let mut lost: Vec<(u64, u64)> = Vec::new();
        for (va, e_pa, leaf, shared_area) in pages {
            let frame = leaf & VPTE_FRAME;
            if frame == 0 {
                continue;
            }
            if shared_area {
                // MAP_SHARED: both map the frame as it is.
                ram.share(frame);
                if let Err(e) = child.pt.set(ram, frames, va, leaf) {
                    ram.unshare(frame);
                    child.pt.destroy(ram, frames);
                    return Err(e);
                }
                continue;
            }
            if (eager || hot.contains(&va)) && leaf & VPTE_RW != 0 && !ram.is_shared(frame) {
                let copy = match frames.alloc(ram) {
                    Some(c) => c,
                    None => {
                        child.pt.destroy(ram, frames);
                        return Err(OutOfMemory);
                    }
                };
                ram.copy_page(copy, frame);
                if let Err(e) = child.pt.set(ram, frames, va, copy | (leaf & !VPTE_FRAME)) {
                    frames.free(ram, copy);
                    child.pt.destroy(ram, frames);
                    return Err(e);
                }
                continue;
            }
            let shared = leaf & !VPTE_RW;
            if shared != leaf {
                ram.store(e_pa, shared);
                match lost.last_mut() {
                    Some((_, end)) if *end == va => *end = va + PAGE_SIZE,
                    _ => lost.push((va, va + PAGE_SIZE)),
                }
            }
            ram.share(frame);
            if let Err(e) = child.pt.set(ram, frames, va, shared) {
                // Not in the child's table: its destroy does not count it.
                ram.unshare(frame);
                child.pt.destroy(ram, frames);
                return Err(e);
            }
        }
        Ok((child, lost))
    }

    /// The range covering the pages whose frames changed under the
    /// program since the last call (see [`Mm::stale`]), emptied.
    pub fn take_stale(&mut self) -> Option<(u64, u64)> {
        let lo = self.stale.iter().min().copied()?;
        let hi = self.stale.iter().max().copied()? + PAGE_SIZE;
        self.stale.clear();
        Some((lo, hi))
    }

    /// Whether the leaf `leaf` of a page in area `v` is copy-on-write: it
    /// has a frame, the area is writable, the leaf is not.
    fn is_cow(v: &Vma, leaf: u64) -> bool {
        !v.shared && leaf & VPTE_FRAME != 0 && v.prot & PROT_WRITE != 0 && leaf & VPTE_RW == 0
    }

    /// Make the copy-on-write page at `page` (leaf `leaf`, area `v`) this
    /// address space's own and writable: its frame when no other address
    /// space maps it any more, else a copy. Returns the frame and whether it
    /// changed (then the host's translation of the old one must go).
    fn break_cow(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        page: u64,
        leaf: u64,
        v: &Vma,
    ) -> Result<(u64, bool), OutOfMemory> {
        let old = leaf & VPTE_FRAME;
        let bits = leaf_bits(v.prot);
        if !ram.is_shared(old) {
            self.pt.set(ram, frames, page, old | bits)?;
            return Ok((old, false));
        }
        let new = frames.alloc(ram).ok_or(OutOfMemory)?;
        ram.copy_page(new, old);
        self.pt.set(ram, frames, page, new | bits)?;
        // Copied before letting go: a last user that takes the frame over
        // writes to it only after this.
        if !ram.unshare(old) {
            // The others left meanwhile: the old frame is nobody's.
            frames.free(ram, old);
        }
        Ok((new, true))
    }

    /// The area holding `addr`.
    pub fn find(&self, addr: u64) -> Option<Vma> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        self.vmas.get(i).copied().filter(|v| v.start <= addr)
    }

    /// Whether any area overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.vmas.iter().any(|v| v.start < end && start < v.end)
    }

    /// Split areas so that `start` and `end` are area boundaries.
    fn carve(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.vmas.len() + 2);
        for v in self.vmas.drain(..) {
            let mut cuts = vec![v.start];
            for c in [start, end] {
                if v.start < c && c < v.end {
                    cuts.push(c);
                }
            }
            cuts.push(v.end);
            for w in cuts.windows(2) {
                out.push(Vma {
                    start: w[0],
                    end: w[1],
                    ..v
                });
            }
        }
        self.vmas = out;
    }

    /// Add an area over `[start, end)` (page aligned). Parts already
    /// covered keep their pages and get `prot` added (program segments
    /// sharing a page); the rest is a new area.
    pub fn add(&mut self, start: u64, end: u64, prot: i32) {
        self.add_area(start, end, prot, false);
    }

    /// [`Mm::add`], the new parts `MAP_SHARED` when `shared`.
    pub fn add_area(&mut self, start: u64, end: u64, prot: i32, shared: bool) {
        self.carve(start, end);
        let mut at = start;
        let mut new = Vec::new();
        for v in self
            .vmas
            .iter_mut()
            .filter(|v| v.start < end && start < v.end)
        {
            if at < v.start {
                new.push(Vma {
                    start: at,
                    end: v.start,
                    prot,
                    shared,
                });
            }
            v.prot |= prot;
            at = v.end;
        }
        if at < end {
            new.push(Vma {
                start: at,
                end,
                prot,
                shared,
            });
        }
        self.vmas.extend(new);
        self.vmas.sort_by_key(|v| v.start);
        self.merge();
    }

    /// Join neighbouring areas of the same protection (as Linux merges
    /// `vm_area_struct`s), so that a range mapped in pieces is one area.
    fn merge(&mut self) {
        let mut out: Vec<Vma> = Vec::with_capacity(self.vmas.len());
        for v in self.vmas.drain(..) {
            match out.last_mut() {
                Some(last)
                    if last.end == v.start && last.prot == v.prot && last.shared == v.shared =>
                {
                    last.end = v.end
                }
                _ => out.push(v),
            }
        }
        self.vmas = out;
    }

    /// Remove the areas and pages in `[start, end)`; returns whether a page
    /// was removed (then the caller invalidates the range).
    pub fn remove(&mut self, ram: &Ram, frames: &mut Frames, start: u64, end: u64) -> bool {
        self.carve(start, end);
        self.vmas.retain(|v| v.end <= start || v.start >= end);
        self.drop_pages(ram, frames, start, end)
    }

    /// Free the pages (not the areas) in `[start, end)`; whether any.
    pub fn drop_pages(&mut self, ram: &Ram, frames: &mut Frames, start: u64, end: u64) -> bool {
        let mut any = false;
        self.pt.visit(ram, start, end, &mut |_, e_pa, leaf| {
            ram.store(e_pa, 0);
            if leaf & VPTE_FRAME != 0 {
                frames.free(ram, leaf & VPTE_FRAME);
            }
            any = true;
        });
        any
    }

    /// Move the pages of `[from, from + len)` to `[to, to + len)` (a free
    /// range): a new area like `like` (protection, sharing) gets the old leaves,
    /// the old entries are cleared (the old areas stay: the caller removes
    /// them and invalidates).
    pub fn move_pages(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        from: u64,
        to: u64,
        len: u64,
        like: &Vma,
    ) -> Result<(), OutOfMemory> {
        let mut leaves = Vec::new();
        self.pt.visit(ram, from, from + len, &mut |va, e_pa, leaf| {
            leaves.push((va, e_pa, leaf));
        });
        self.add_area(to, to + len, like.prot, like.shared);
        for (va, e_pa, leaf) in leaves {
            self.pt.set(ram, frames, va - from + to, leaf)?;
            ram.store(e_pa, 0);
        }
        Ok(())
    }

    /// Whether every page of `[start, end)` lies in an area.
    pub fn covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for v in self.vmas.iter().filter(|v| v.start < end && start < v.end) {
            if v.start > at {
                return false;
            }
            at = v.end;
        }
        at >= end
    }

    /// `mprotect`: every page of `[start, end)` must be in an area
    /// (`Err(())` for ENOMEM otherwise). Returns whether a leaf changed.
    pub fn protect(&mut self, ram: &Ram, start: u64, end: u64, prot: i32) -> Result<bool, ()> {
        if !self.covered(start, end) {
            return Err(());
        }
        self.carve(start, end);
        for v in self
            .vmas
            .iter_mut()
            .filter(|v| v.start < end && start < v.end)
        {
            v.prot = prot;
        }
        self.merge();
        let bits = leaf_bits(prot);
        let mut changed = false;
        for v in self.vmas.iter().filter(|v| v.start < end && start < v.end) {
            let (lo, hi) = (v.start.max(start), v.end.min(end));
            self.pt.visit(ram, lo, hi, &mut |_, e_pa, leaf| {
                let frame = leaf & VPTE_FRAME;
                // A frame another address space maps copy-on-write stays
                // read-only: a write copies it first. MAP_SHARED frames
                // are writable in all.
                let new = if frame != 0 && !v.shared && ram.is_shared(frame) {
                    frame | (bits & !VPTE_RW)
                } else {
                    frame | bits
                };
                if new
                    != leaf & (VPTE_FRAME | VPTE_V | VPTE_RW | VPTE_U | VPTE_NX | VPTE_A | VPTE_M)
                {
                    ram.store(e_pa, new);
                    changed = true;
                }
            });
        }
        Ok(changed)
    }

    /// A free, page-aligned range of `len` bytes for `mmap`, as high as
    /// possible below [`MMAP_TOP`].
    pub fn free_range(&self, len: u64) -> Option<u64> {
        let mut top = MMAP_TOP;
        for v in self.vmas.iter().rev() {
            if v.start >= top {
                continue;
            }
            if v.end <= top && top - v.end >= len {
                return Some(top - len);
            }
            top = top.min(v.start);
        }
        top.checked_sub(len)
            .filter(|s| *s >= self.brk.max(MIN_ADDR))
    }

    /// Serve a page fault at `addr` with `PGEX_*` bits `err`.
    pub fn fault(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        addr: u64,
        err: u64,
    ) -> Result<Fault, OutOfMemory> {
        let Some(v) = self.find(addr) else {
            return Ok(Fault::Segv);
        };
        let want = if err & PGEX_W != 0 {
            PROT_WRITE
        } else if err & PGEX_I != 0 {
            PROT_EXEC
        } else {
            PROT_READ | PROT_WRITE | PROT_EXEC
        };
        if v.prot & want == 0 {
            return Ok(Fault::Segv);
        }
        let page = page_down(addr);
        let leaf = self.pt.get(ram, page);
        if err & PGEX_W != 0 && Self::is_cow(&v, leaf) {
            return self.cow_fault(ram, frames, page, leaf, &v);
        }
        if leaf & VPTE_FRAME != 0 {
            return Ok(Fault::Stale);
        }
        self.populate(ram, frames, page, v.prot)?;
        // Fault-around: the next pages of the area (the previous ones in
        // the stack, which grows down) are likely to be touched soon; give
        // them frames too, while RAM lasts.
        let stack = self.stack_top - STACK_SIZE..self.stack_top;
        for i in 1..FAULT_AROUND {
            let Some(near) = (if stack.contains(&page) {
                page.checked_sub(i * PAGE_SIZE)
            } else {
                page.checked_add(i * PAGE_SIZE)
            }) else {
                break;
            };
            if !(v.start..v.end).contains(&near)
                || self.pt.get(ram, near) & VPTE_FRAME != 0
                || self.populate(ram, frames, near, v.prot).is_err()
            {
                break;
            }
        }
        Ok(Fault::Mapped)
    }

    /// A write fault on the copy-on-write page at `page`: it and the next
    /// copy-on-write pages of its area (up to [`FAULT_AROUND`], in the
    /// direction the area is used: down in the stack) become this address
    /// space's own, as one fault would make them on Linux one by one.
    fn cow_fault(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        page: u64,
        leaf: u64,
        v: &Vma,
    ) -> Result<Fault, OutOfMemory> {
        let mut copied = u64::from(self.break_cow(ram, frames, page, leaf, v)?.1);
        let (mut lo, mut hi) = (page, page + PAGE_SIZE);
        let down = (self.stack_top - STACK_SIZE..self.stack_top).contains(&page);
        for i in 1..FAULT_AROUND {
            let near = if down {
                page.checked_sub(i * PAGE_SIZE)
            } else {
                page.checked_add(i * PAGE_SIZE)
            };
            let Some(near) = near.filter(|n| (v.start..v.end).contains(n)) else {
                break;
            };
            let l = self.pt.get(ram, near);
            if !Self::is_cow(v, l) {
                break;
            }
            match self.break_cow(ram, frames, near, l, v) {
                Ok((_, c)) => copied += u64::from(c),
                Err(_) => break,
            }
            (lo, hi) = (lo.min(near), hi.max(near + PAGE_SIZE));
        }
        Ok(Fault::Cow {
            start: lo,
            end: hi,
            copied,
        })
    }

    /// Give the absent pages of `[start, end)` (in one area) zeroed frames,
    /// while RAM lasts.
    pub fn populate_range(&mut self, ram: &Ram, frames: &mut Frames, start: u64, end: u64) {
        let Some(v) = self.find(start) else { return };
        let mut page = page_down(start);
        while page < end.min(v.end) {
            if self.pt.get(ram, page) & VPTE_FRAME == 0
                && self.populate(ram, frames, page, v.prot).is_err()
            {
                return;
            }
            page += PAGE_SIZE;
        }
    }

    /// Give the (absent) page at `page` a zeroed frame with the leaf bits of
    /// `prot`; returns the frame.
    fn populate(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        page: u64,
        prot: i32,
    ) -> Result<u64, OutOfMemory> {
        let frame = frames.alloc(ram).ok_or(OutOfMemory)?;
        self.pt.set(ram, frames, page, frame | leaf_bits(prot))?;
        Ok(frame)
    }

    /// Copy `bytes` to `va` whatever the protection (loading a program or
    /// a file mapping), populating pages of the areas there; `false` if a
    /// byte lies outside every area.
    pub fn load(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        va: u64,
        bytes: &[u8],
    ) -> Result<bool, OutOfMemory> {
        let mut at = 0usize;
        while at < bytes.len() {
            let addr = va + at as u64;
            let Some(v) = self.find(addr) else {
                return Ok(false);
            };
            let page = page_down(addr);
            let leaf = self.pt.get(ram, page);
            let frame = if leaf & VPTE_FRAME != 0 && !v.shared && ram.is_shared(leaf & VPTE_FRAME) {
                // Loading writes whatever the protection: never into a
                // frame another address space maps.
                let (frame, _) = self.break_cow(ram, frames, page, leaf, &v)?;
                self.stale.push(page);
                frame
            } else if leaf & VPTE_FRAME != 0 {
                leaf & VPTE_FRAME
            } else {
                self.populate(ram, frames, page, v.prot)?
            };
            let n = ((page + PAGE_SIZE - addr) as usize).min(bytes.len() - at);
            ram.write(frame + (addr - page), &bytes[at..at + n]);
            at += n;
        }
        Ok(true)
    }

    /// Give every present leaf in `[start, end)` the bits of its area's
    /// protection (after areas merged their protections).
    pub fn refresh(&mut self, ram: &Ram, start: u64, end: u64) {
        for v in self.vmas.iter().filter(|v| v.start < end && start < v.end) {
            let bits = leaf_bits(v.prot);
            self.pt.visit(ram, v.start, v.end, &mut |_, e_pa, leaf| {
                ram.store(e_pa, (leaf & VPTE_FRAME) | bits);
            });
        }
    }

    /// The physical pieces of user range `[va, va + len)` as far as it is
    /// accessible (readable, or writable when `write`), populating absent
    /// pages of anonymous areas; the pieces may cover less than `len`.
    pub fn translate(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        va: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<(u64, u64)>, OutOfMemory> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let Some(end) = va.checked_add(len) else {
            return Ok(out);
        };
        let mut at = va;
        while at < end {
            let Some(v) = self.find(at) else { break };
            let need = if write { PROT_WRITE } else { PROT_READ };
            if v.prot & need == 0 {
                break;
            }
            let page = page_down(at);
            let leaf = self.pt.get(ram, page);
            let frame = if write && Self::is_cow(&v, leaf) {
                let (frame, copied) = self.break_cow(ram, frames, page, leaf, &v)?;
                if copied {
                    self.stale.push(page);
                }
                frame
            } else if leaf & VPTE_FRAME != 0 {
                leaf & VPTE_FRAME
            } else {
                self.populate(ram, frames, page, v.prot)?
            };
            let n = (page + PAGE_SIZE).min(end) - at;
            let pa = frame + (at - page);
            match out.last_mut() {
                Some((p, l)) if *p + *l == pa => *l += n,
                _ => out.push((pa, n)),
            }
            at += n;
        }
        Ok(out)
    }

    /// Copy `out.len()` bytes from user address `va`; `false` if some byte
    /// is not readable.
    pub fn read(&mut self, ram: &Ram, frames: &mut Frames, va: u64, out: &mut [u8]) -> bool {
        let Ok(pieces) = self.translate(ram, frames, va, out.len() as u64, false) else {
            return false;
        };
        let mut at = 0usize;
        for (pa, n) in pieces {
            ram.read(pa, &mut out[at..at + n as usize]);
            at += n as usize;
        }
        at == out.len()
    }

    /// Copy `bytes` to user address `va`; `false` if some byte is not
    /// writable (the bytes before it are written).
    pub fn write(&mut self, ram: &Ram, frames: &mut Frames, va: u64, bytes: &[u8]) -> bool {
        let Ok(pieces) = self.translate(ram, frames, va, bytes.len() as u64, true) else {
            return false;
        };
        let mut at = 0usize;
        for (pa, n) in pieces {
            ram.write(pa, &bytes[at..at + n as usize]);
            at += n as usize;
        }
        at == bytes.len()
    }

    /// The NUL-terminated string at `va` (at most `max` bytes before the
    /// NUL); `Err(errno)` for EFAULT or ENAMETOOLONG.
    pub fn cstr(
        &mut self,
        ram: &Ram,
        frames: &mut Frames,
        va: u64,
        max: usize,
    ) -> Result<Vec<u8>, i32> {
        let mut s = Vec::new();
        let mut at = va;
        loop {
            let chunk = (page_up(at + 1) - at) as usize;
            let mut buf = vec![0u8; chunk];
            if at == 0 || !self.read(ram, frames, at, &mut buf) {
                return Err(libc::EFAULT);
            }
            if let Some(nul) = buf.iter().position(|b| *b == 0) {
                s.extend_from_slice(&buf[..nul]);
                return Ok(s);
            }
            s.extend_from_slice(&buf);
            if s.len() > max {
                return Err(libc::ENAMETOOLONG);
            }
            at += chunk as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_bits_follow_prot() {
        assert_eq!(leaf_bits(0), 0);
        assert_eq!(leaf_bits(PROT_READ), VPTE_V | VPTE_U | VPTE_A | VPTE_NX);
        assert_eq!(
            leaf_bits(PROT_READ | PROT_WRITE),
            VPTE_V | VPTE_U | VPTE_A | VPTE_RW | VPTE_M | VPTE_NX
        );
        assert_eq!(leaf_bits(PROT_READ | PROT_EXEC), VPTE_V | VPTE_U | VPTE_A);
    }

    #[test]
    fn page_rounding() {
        assert_eq!(page_up(1), PAGE_SIZE);
        assert_eq!(page_up(PAGE_SIZE), PAGE_SIZE);
        assert_eq!(page_down(PAGE_SIZE + 1), PAGE_SIZE);
    }
}
