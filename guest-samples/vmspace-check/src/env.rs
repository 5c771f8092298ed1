//! What every area shares: `vk_info`, guest RAM mapped as the direct map
//! (DMAP), frames carved from RAM above 1 MiB, vmspaces (destroyed on
//! drop), linear mappings of RAM frames into them, the standard user
//! layout (a code page holding every snippet, a few data pages) and the
//! trap frames that start a snippet.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use vkabi::hypercall::{self, Errno};
use vkabi::{
    MAP_FIXED, MAP_SHARED, MAP_VPAGETABLE, PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE,
    RFLAGS_USER_SET, TrapFrame, VextFrame, VkInfo,
};
use vkguest::dmap;
pub use vkguest::dmap::load;
use vkguest::tables::FrameCarver;
pub use vkguest::tables::{Tables, frame, leaf, leaf_pa, map, stamp};
use vpte::{FrameAllocator, GuestPhysAddr, Level, PageIndex, Vpte};

use crate::report::must;
use crate::sys;
use crate::user::Snippet;

/// Where the standard layout puts the code page.
pub const CODE_VA: u64 = 0x0040_0000;
/// Where the standard layout puts its data pages.
pub const DATA_VA: u64 = 0x0060_0000;
/// Data pages in the standard layout.
pub const DATA_PAGES: u64 = 4;
/// Linux x86-64 `__USER_CS`, the host's 64-bit user code selector.
pub const USER_CS: u64 = 0x33;
/// Linux x86-64 `__USER_DS`, the host's user stack selector.
pub const USER_SS: u64 = 0x2b;
/// `PROT_READ|PROT_WRITE|PROT_EXEC`.
pub const RWX: i32 = PROT_READ | PROT_WRITE | PROT_EXEC;

/// The guest's view of its RAM.
#[derive(Debug)]
pub struct Env {
    /// What `vk_info` said.
    pub info: VkInfo,
    /// All of RAM, through the DMAP.
    pub ram: &'static [AtomicU64],
    /// The frames not yet handed out.
    frames: FrameCarver,
    /// The next vmspace id [`Env::vmspace`] hands out.
    next_id: u64,
}

/// First vmspace id handed out by [`Env::vmspace`] ("vs" and a counter).
pub const ID_BASE: u64 = 0x7673_0000_0000_0000;

impl Env {
    /// Map RAM as the DMAP.
    pub fn new(info: VkInfo) -> Result<Env, String> {
        let ram = sys::map_ram(info.ram_fd, info.ram_size)
            .map_err(|e| format!("mmap of ram_fd {}: {e}", info.ram_fd))?;
        Ok(Env {
            info,
            ram,
            frames: FrameCarver::new(info.ram_size),
            next_id: ID_BASE + 1,
        })
    }

    /// The RAM memfd.
    pub fn ram_fd(&self) -> i32 {
        self.info.ram_fd
    }

    /// `pages` contiguous frames nobody else uses, zeroed.
    pub fn frames(&mut self, pages: u64) -> Result<GuestPhysAddr, String> {
        let frames = self.frames.take(pages)?;
        let (start, end) = (frames.start.0, frames.end.0);
        for w in &self.ram[(start / 8) as usize..(end / 8) as usize] {
            w.store(0, Ordering::SeqCst);
        }
        Ok(GuestPhysAddr(start))
    }

    /// A builder with an empty L4 table, allocating tables (and data frames,
    /// through [`frame`]) from `pages` frames of its own.
    pub fn tables(&mut self, pages: u64) -> Result<Tables, String> {
        let start = self.frames(pages)?;
        let alloc = FrameAllocator::new(start..GuestPhysAddr(start.0 + pages * PAGE_SIZE));
        Tables::new(self.ram, alloc).map_err(|e| format!("page tables: {e}"))
    }

    /// A new vmspace with an id of its own.
    pub fn vmspace(&mut self) -> Result<Vmspace, String> {
        let id = self.next_id;
        self.next_id += 1;
        Vmspace::create(id)
    }

    /// The word at `pa`, through the DMAP.
    pub fn load(&self, pa: GuestPhysAddr) -> u64 {
        dmap::load(self.ram, pa)
    }

    /// Store the word at `pa`, through the DMAP.
    pub fn store(&self, pa: GuestPhysAddr, value: u64) {
        dmap::store(self.ram, pa, value);
    }

    /// Bytes `pa..pa + n`, through the DMAP.
    pub fn read_bytes(&self, pa: GuestPhysAddr, n: usize) -> Vec<u8> {
        dmap::read_bytes(self.ram, pa, n)
    }

    /// Write `bytes` at `pa`, through the DMAP (nothing else writes there
    /// meanwhile).
    pub fn write_bytes(&self, pa: GuestPhysAddr, bytes: &[u8]) {
        dmap::write_bytes(self.ram, pa, bytes);
    }

    /// Map `pages` fresh frames into `vs` at `va` (linear `MAP_SHARED` of
    /// `ram_fd`, `MAP_FIXED`) with `prot`.
    pub fn map_linear(
        &mut self,
        vs: &Vmspace,
        va: u64,
        pages: u64,
        prot: i32,
    ) -> Result<Region, String> {
        let pa = self.frames(pages)?;
        let got = must(
            &format!("vmspace_mmap({va:#x}, {} pages, linear)", pages),
            vs.mmap(
                va,
                pages * PAGE_SIZE,
                prot,
                MAP_SHARED | MAP_FIXED,
                self.ram_fd(),
                pa.0,
            ),
        )?;
        if got != va {
            return Err(format!("vmspace_mmap(MAP_FIXED {va:#x}) returned {got:#x}"));
        }
        Ok(Region { va, pa, pages })
    }

    /// Map a `MAP_SHARED|MAP_VPAGETABLE` window of `pages` pages at `va`
    /// (`MAP_FIXED`, read, write and execute, file offset `off`) into `vs`.
    pub fn map_window(
        &self,
        vs: &Vmspace,
        va: u64,
        pages: u64,
        off: u64,
    ) -> Result<Window, String> {
        let got = must(
            &format!("vmspace_mmap({va:#x}, {pages} pages, MAP_VPAGETABLE)"),
            vs.mmap(
                va,
                pages * PAGE_SIZE,
                RWX,
                MAP_SHARED | MAP_VPAGETABLE | MAP_FIXED,
                self.ram_fd(),
                off,
            ),
        )?;
        if got != va {
            return Err(format!("vmspace_mmap(MAP_FIXED {va:#x}) returned {got:#x}"));
        }
        Ok(Window { va, pages, off })
    }

    /// The standard layout in `vs`: a code page at [`CODE_VA`] holding every
    /// snippet, and [`DATA_PAGES`] data pages at [`DATA_VA`].
    pub fn user(&mut self, vs: &Vmspace) -> Result<User, String> {
        let code = self.map_linear(vs, CODE_VA, 1, RWX)?;
        for s in Snippet::ALL {
            self.write_bytes(GuestPhysAddr(code.pa.0 + s.offset()), s.bytes());
        }
        let data = self.map_linear(vs, DATA_VA, DATA_PAGES, PROT_READ | PROT_WRITE)?;
        Ok(User { code, data })
    }

    /// The entries a walk of `pindex` visits below the master, read through
    /// the DMAP: L4, L3, L2, L1 (fewer if it stops at an invalid or PS entry).
    pub fn path(&self, root: GuestPhysAddr, pindex: PageIndex) -> Vec<(Level, Vpte)> {
        dmap::walk_path(self.ram, root, pindex)
    }
}

/// A vmspace of this guest, destroyed on drop.
#[derive(Debug)]
pub struct Vmspace {
    id: u64,
}

impl Vmspace {
    /// `vmspace_create(id, 0, NULL)`.
    pub fn create(id: u64) -> Result<Vmspace, String> {
        must(
            &format!("vmspace_create({id:#x})"),
            hypercall::vmspace_create(id, 0, 0),
        )?;
        Ok(Vmspace { id })
    }

    /// The id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `vmspace_mmap` in this vmspace.
    pub fn mmap(
        &self,
        va: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        off: u64,
    ) -> Result<u64, Errno> {
        hypercall::vmspace_mmap(self.id, va, len, prot, flags, fd, off)
    }

    /// `vmspace_munmap` in this vmspace.
    pub fn munmap(&self, va: u64, len: u64) -> Result<(), Errno> {
        hypercall::vmspace_munmap(self.id, va, len)
    }

    /// `vmspace_mcontrol` in this vmspace.
    pub fn mcontrol(&self, va: u64, len: u64, behav: i32, value: u64) -> Result<(), Errno> {
        hypercall::vmspace_mcontrol(self.id, va, len, behav, value)
    }

    /// `vmspace_ctl(VMSPACE_CTL_RUN)`.
    pub fn run(&self, tf: &mut TrapFrame, vf: &mut VextFrame) -> Result<(), Errno> {
        hypercall::vmspace_ctl(self.id, vkabi::VMSPACE_CTL_RUN, tf, vf)
    }

    /// RUN with no TLS bases; a failed call is the area's failure.
    pub fn run_plain(&self, tf: &mut TrapFrame) -> Result<(), String> {
        let mut vf = VextFrame::default();
        let before = *tf;
        self.run(tf, &mut vf).map_err(|e| {
            format!(
                "vmspace_ctl(RUN) at rip {:#x}: {}",
                before.tf_rip,
                crate::report::errno_text(e)
            )
        })
    }

    /// `vmspace_pread` at `va`.
    pub fn pread(&self, buf: &mut [u8], va: u64) -> Result<usize, Errno> {
        hypercall::vmspace_pread(self.id, buf, 0, va)
    }

    /// `vmspace_pwrite` at `va`.
    pub fn pwrite(&self, buf: &[u8], va: u64) -> Result<usize, Errno> {
        hypercall::vmspace_pwrite(self.id, buf, 0, va)
    }

    /// The 8 bytes at `va` through `vmspace_pread`, if all were copied.
    pub fn read_word(&self, va: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        match self.pread(&mut b, va) {
            Ok(8) => Ok(u64::from_le_bytes(b)),
            Ok(n) => Err(format!("vmspace_pread({va:#x}, 8) copied {n} bytes")),
            Err(e) => Err(format!(
                "vmspace_pread({va:#x}, 8): {}",
                crate::report::errno_text(e)
            )),
        }
    }

    /// Give up ownership: the vmspace is not destroyed on drop (it lives
    /// until the guest exits).
    pub fn leak(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }
}

impl Drop for Vmspace {
    fn drop(&mut self) {
        // Checks that care about destroy's result call it themselves; here
        // only the resources matter.
        let _ = hypercall::vmspace_destroy(self.id);
    }
}

/// Frames of RAM mapped linearly into a vmspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The first address in the vmspace.
    pub va: u64,
    /// The first frame.
    pub pa: GuestPhysAddr,
    /// Length in pages.
    pub pages: u64,
}

impl Region {
    /// The address of byte `byte` of page `page`.
    pub fn va(&self, page: u64, byte: u64) -> u64 {
        assert!(page < self.pages && byte < PAGE_SIZE);
        self.va + page * PAGE_SIZE + byte
    }

    /// The frame address of byte `byte` of page `page`.
    pub fn pa(&self, page: u64, byte: u64) -> GuestPhysAddr {
        assert!(page < self.pages && byte < PAGE_SIZE);
        GuestPhysAddr(self.pa.0 + page * PAGE_SIZE + byte)
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.va + self.len()
    }
}

/// A VPAGETABLE window in a vmspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The first address.
    pub va: u64,
    /// Length in pages.
    pub pages: u64,
    /// The file offset (enters the page index only).
    pub off: u64,
}

impl Window {
    /// The address of byte `byte` of page `page`.
    pub fn va(&self, page: u64, byte: u64) -> u64 {
        assert!(page < self.pages && byte < PAGE_SIZE);
        self.va + page * PAGE_SIZE + byte
    }

    /// The page index of page `page`: `(va - start + off) >> 12`.
    pub fn pindex(&self, page: u64) -> PageIndex {
        PageIndex((self.off / PAGE_SIZE) + page)
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// `vmspace_mcontrol(MADV_SETMAP, master)` over the whole window.
    pub fn setmap(&self, vs: &Vmspace, master: Vpte) -> Result<(), String> {
        must(
            "vmspace_mcontrol(MADV_SETMAP)",
            vs.mcontrol(self.va, self.len(), vkabi::MADV_SETMAP, master.raw()),
        )
    }
}

/// The standard layout of a vmspace (see [`Env::user`]).
#[derive(Clone, Copy, Debug)]
pub struct User {
    /// The code page, every snippet at its slot.
    pub code: Region,
    /// The data pages.
    pub data: Region,
}

impl User {
    /// Where `s` starts in the vmspace.
    pub fn entry(&self, s: Snippet) -> u64 {
        self.code.va + s.offset()
    }

    /// A frame that starts `s`: all registers 0 except rip, rsp (the top of
    /// the data pages), rflags (IF and bit 1), and the host's user
    /// selectors.
    pub fn frame(&self, s: Snippet) -> TrapFrame {
        TrapFrame {
            tf_rip: self.entry(s),
            tf_rsp: self.data.end(),
            tf_rflags: RFLAGS_USER_SET,
            tf_cs: USER_CS,
            tf_ss: USER_SS,
            ..TrapFrame::default()
        }
    }
}

/// Write [`stamp`] into the first word of `pa`.
pub fn stamp_frame(env: &Env, pa: GuestPhysAddr) {
    env.store(pa, stamp(pa));
}

/// A trap frame's interesting fields, for FAIL lines.
pub fn describe(tf: &TrapFrame) -> String {
    let mut s = format!(
        "trapno {:#x} rip {:#x} addr {:#x} err {:#x}",
        tf.tf_trapno, tf.tf_rip, tf.tf_addr, tf.tf_err
    );
    let _ = write!(s, " rax {:#x}", tf.tf_rax);
    s
}
