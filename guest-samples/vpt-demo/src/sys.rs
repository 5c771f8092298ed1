//! Every `unsafe` step of the guest, behind safe functions: reserving
//! address space, `vk_mmap`, loads and stores through VPAGETABLE windows,
//! `read(2)`/`write(2)` on window memory, and the SIGSEGV handler that
//! records what ABI section 6 promises and fixes the tables (through the
//! direct map, which `vkguest` maps).
//!
//! A window, once mapped, is never unmapped: its addresses stay valid for
//! the rest of the program, which is what makes [`Window`]'s accessors safe.
//! An access may fault; the supervisor resolves it by walking the tables or
//! delivers SIGSEGV, which [`expect_segv`] catches (any other SIGSEGV prints a
//! FAIL line and kills the process, as without a handler).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering, compiler_fence};

use vkabi::hypercall::{self, Errno};
use vkabi::{MAP_FIXED, MAP_SHARED, MAP_VPAGETABLE, PAGE_SHIFT, PAGE_SIZE, PROT_READ, PROT_WRITE};
use vpte::{GuestPhysAddr, PageIndex, Vpte};

/// Linux `SEGV_MAPERR` (`asm-generic/siginfo.h`; the `libc` crate lacks it):
/// no translation.
pub const SEGV_MAPERR: i32 = 1;
/// Linux `SEGV_ACCERR`: the translation forbids the access.
pub const SEGV_ACCERR: i32 = 2;
/// The x86 page-fault vector, as `REG_TRAPNO` reports it.
pub const X86_TRAP_PF: u64 = 14;
/// x86-64 user space ends at 2^47 (4-level paging; with 5-level paging a
/// process gets addresses above it only when it asks, which this one never
/// does), so nothing of this process lives at or above it.
pub const HOST_USER_END: u64 = 1 << 47;

/// The direct map, for the SIGSEGV handler (set once by [`map_ram`]).
static RAM: OnceLock<&'static [AtomicU64]> = OnceLock::new();

/// Map all of guest RAM (`ram_fd`, `MAP_SHARED`) as the direct map and view
/// it as 64-bit atomics: word `i` is guest physical bytes `8i..8i+8`.
pub fn map_ram(fd: i32, size: u64) -> io::Result<&'static [AtomicU64]> {
    let ram = vkguest::map_ram(fd, size)?;
    let _ = RAM.set(ram);
    Ok(ram)
}

/// Address space of this process held with an inaccessible anonymous
/// mapping (plain anonymous memory, not VPAGETABLE), unmapped on drop.
#[derive(Debug)]
pub struct Reservation {
    addr: u64,
    len: u64,
}

impl Reservation {
    /// `len` bytes anywhere.
    pub fn anywhere(len: u64) -> io::Result<Reservation> {
        Self::map(0, len, 0).ok_or_else(io::Error::last_os_error)
    }

    /// Exactly `[addr, addr + len)`, or `None` if anything is mapped there
    /// (`MAP_FIXED_NOREPLACE`; an older kernel that treats the address as a
    /// hint and puts the mapping elsewhere also gives `None`).
    pub fn at(addr: u64, len: u64) -> Option<Reservation> {
        let r = Self::map(addr, len, libc::MAP_FIXED_NOREPLACE)?;
        (r.addr == addr).then_some(r)
    }

    fn map(addr: u64, len: u64, flags: i32) -> Option<Reservation> {
        let size = usize::try_from(len).ok()?;
        // SAFETY: without MAP_FIXED the kernel never replaces an existing
        // mapping (MAP_FIXED_NOREPLACE fails instead), so nothing is touched.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | flags,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Reservation {
            addr: p as u64,
            len,
        })
    }

    /// The first address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range is this reservation's own mapping, which nothing
        // else uses.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Where `vk_mmap` may put a mapping.
#[derive(Debug)]
pub enum Place {
    /// Wherever the supervisor picks (no `MAP_FIXED`).
    Anywhere,
    /// `MAP_FIXED` over this reservation, which the mapping replaces (the
    /// length must not exceed the reservation's).
    Fixed(Reservation),
    /// `MAP_FIXED` at an address at or above [`HOST_USER_END`], where nothing
    /// of this process lives (for calls that must fail).
    FixedAboveHost(u64),
}

/// `vk_mmap(addr, len, prot, flags, fd, off)` with the address and
/// `MAP_FIXED` given by `place` (`flags` must not hold `MAP_FIXED`).
/// On success a [`Place::Fixed`] reservation becomes the new mapping and is
/// never unmapped.
pub fn vk_mmap(
    place: Place,
    len: u64,
    prot: i32,
    flags: i32,
    fd: i32,
    off: u64,
) -> Result<u64, Errno> {
    assert!(flags & MAP_FIXED == 0, "MAP_FIXED comes from the Place");
    let (addr, flags) = match &place {
        Place::Anywhere => (0, flags),
        Place::Fixed(r) => {
            assert!(
                len <= r.len,
                "a MAP_FIXED mapping stays inside its reservation"
            );
            (r.addr, flags | MAP_FIXED)
        }
        Place::FixedAboveHost(addr) => {
            assert!(*addr >= HOST_USER_END, "only above the host's user space");
            (*addr, flags | MAP_FIXED)
        }
    };
    // SAFETY: without MAP_FIXED nothing existing is replaced; with it the
    // range is either inside a reservation of ours, which nothing uses, or
    // above HOST_USER_END, where nothing of this process lives.
    let r = unsafe { hypercall::vk_mmap(addr, len, prot, flags, fd, off) };
    if r.is_ok()
        && let Place::Fixed(res) = place
    {
        // The reservation's range is the new mapping now: keep it.
        std::mem::forget(res);
    }
    r
}

/// A `MAP_SHARED|MAP_VPAGETABLE` mapping of guest RAM, read and write: a
/// window whose pages the supervisor translates through the guest's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    base: u64,
    len: u64,
    off: u64,
}

impl Window {
    /// Map a window of `len` bytes with file offset `off` (page aligned) at
    /// `place`.
    pub fn map(place: Place, len: u64, off: u64, ram_fd: i32) -> Result<Window, Errno> {
        let flags = MAP_SHARED | MAP_VPAGETABLE;
        let base = vk_mmap(place, len, PROT_READ | PROT_WRITE, flags, ram_fd, off)?;
        Ok(Window { base, len, off })
    }

    /// The first address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in pages.
    pub fn pages(&self) -> u64 {
        self.len >> PAGE_SHIFT
    }

    /// The address of byte `byte` of page `page`, checked to lie inside.
    pub fn va(&self, page: u64, byte: u64) -> u64 {
        assert!(
            page < self.pages() && byte < PAGE_SIZE,
            "page {page} byte {byte} outside a {}-page window",
            self.pages()
        );
        self.base + page * PAGE_SIZE + byte
    }

    /// The page index of page `page`: `(va - start + off) >> 12` (ABI section 3).
    pub fn pindex(&self, page: u64) -> PageIndex {
        PageIndex((self.off >> PAGE_SHIFT) + page)
    }

    /// Load word `word` (0..512) of page `page` through the window.
    pub fn read(&self, page: u64, word: u64) -> u64 {
        let va = self.va(page, word * 8);
        // SAFETY: `va` is 8-aligned and inside this window, a mapping of ours
        // that is never unmapped. The load may fault: the supervisor resolves
        // it or delivers SIGSEGV (see `expect_segv`).
        unsafe { ptr::read_volatile(va as *const u64) }
    }

    /// Store `value` in word `word` (0..512) of page `page` through the window.
    pub fn write(&self, page: u64, word: u64, value: u64) {
        let va = self.va(page, word * 8);
        // SAFETY: as for `read`; the memory is guest RAM, shared by design.
        unsafe { ptr::write_volatile(va as *mut u64, value) }
    }

    /// `read(2)` from `fd` into the window at byte `byte` of page `page`, `n`
    /// bytes (the range may cross into the following pages).
    pub fn read_fd(&self, fd: impl AsFd, page: u64, byte: u64, n: usize) -> io::Result<usize> {
        let va = self.span(page, byte, n);
        // SAFETY: the `n` bytes at `va` lie inside this window (`span`), a
        // mapping of ours that is never unmapped; the kernel writes them
        // (its faults are resolved like user ones, ABI section 3).
        let r = unsafe { libc::read(fd.as_fd().as_raw_fd(), va as *mut libc::c_void, n) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// `write(2)` to `fd` of `n` bytes of the window from byte `byte` of
    /// page `page`.
    pub fn write_fd(&self, fd: impl AsFd, page: u64, byte: u64, n: usize) -> io::Result<usize> {
        let va = self.span(page, byte, n);
        // SAFETY: as for `read_fd`; the kernel only reads the bytes.
        let r = unsafe { libc::write(fd.as_fd().as_raw_fd(), va as *const libc::c_void, n) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    fn span(&self, page: u64, byte: u64, n: usize) -> u64 {
        let va = self.va(page, byte);
        let end = va.checked_add(n as u64).expect("no wrap");
        assert!(end <= self.base + self.len, "the range stays in the window");
        va
    }

    /// `mcontrol(window, MADV_SETMAP, master)`.
    pub fn setmap(&self, master: Vpte) -> Result<(), Errno> {
        hypercall::mcontrol(self.base, self.len, vkabi::MADV_SETMAP, master.raw())
    }

    /// `mcontrol(MADV_INVAL)` on `pages` pages from page `first`.
    pub fn inval(&self, first: u64, pages: u64) -> Result<(), Errno> {
        let va = self.va(first, 0);
        hypercall::mcontrol(va, pages * PAGE_SIZE, vkabi::MADV_INVAL, 0)
    }
}

/// What the SIGSEGV handler does to the tables before returning, so that
/// the retried access succeeds.
#[derive(Clone, Copy, Debug)]
pub enum Fix {
    /// OR `bits` into the entry at `pa` (an upgrade: no INVAL needed).
    Or { pa: GuestPhysAddr, bits: u64 },
    /// Store `value` at `pa` (for an entry the host never translated).
    Store { pa: GuestPhysAddr, value: u64 },
}

/// What the handler saw: the first SIGSEGV's details and how many came.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segv {
    /// SIGSEGVs delivered while armed.
    pub signals: u64,
    /// `si_addr`.
    pub addr: u64,
    /// `si_code`.
    pub code: i32,
    /// `REG_TRAPNO` of the signal's ucontext.
    pub trapno: u64,
    /// `REG_ERR`: the page-fault error bits.
    pub err: u64,
    /// `REG_CR2`.
    pub cr2: u64,
}

/// More SIGSEGVs than this for one access means the fix did not take.
const MAX_SIGNALS: u64 = 8;

static ARMED: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static ADDR: AtomicU64 = AtomicU64::new(0);
static CODE: AtomicI32 = AtomicI32::new(0);
static TRAPNO: AtomicU64 = AtomicU64::new(0);
static ERR: AtomicU64 = AtomicU64::new(0);
static CR2: AtomicU64 = AtomicU64::new(0);
static FIX_OR: AtomicBool = AtomicBool::new(false);
static FIX_PA: AtomicU64 = AtomicU64::new(0);
static FIX_VALUE: AtomicU64 = AtomicU64::new(0);

/// Install the SIGSEGV handler (`SA_SIGINFO`). Until [`expect_segv`] arms it,
/// a SIGSEGV prints a FAIL line and kills the process.
pub fn install_segv_handler() -> io::Result<()> {
    // SAFETY: `sigaction` is plain data, valid when zeroed.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsegv as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa` is a valid sigaction whose handler has the SA_SIGINFO
    // signature and touches only atomics and async-signal-safe calls.
    let r = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, ptr::null_mut())
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Run `access` (one load or store through a window) expecting SIGSEGV: the
/// handler records the first signal's details, applies `fix` to the tables
/// and returns, so the access is retried. Returns the access's result and
/// what the handler saw (`signals == 0` if nothing came).
pub fn expect_segv<R>(fix: Fix, access: impl FnOnce() -> R) -> (R, Segv) {
    SIGNALS.store(0, Ordering::SeqCst);
    for a in [&ADDR, &TRAPNO, &ERR, &CR2] {
        a.store(0, Ordering::SeqCst);
    }
    CODE.store(0, Ordering::SeqCst);
    let (or, pa, value) = match fix {
        Fix::Or { pa, bits } => (true, pa, bits),
        Fix::Store { pa, value } => (false, pa, value),
    };
    FIX_OR.store(or, Ordering::SeqCst);
    FIX_PA.store(pa.raw(), Ordering::SeqCst);
    FIX_VALUE.store(value, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    compiler_fence(Ordering::SeqCst);
    let r = access();
    compiler_fence(Ordering::SeqCst);
    ARMED.store(false, Ordering::SeqCst);
    let seen = Segv {
        signals: SIGNALS.load(Ordering::SeqCst),
        addr: ADDR.load(Ordering::SeqCst),
        code: CODE.load(Ordering::SeqCst),
        trapno: TRAPNO.load(Ordering::SeqCst),
        err: ERR.load(Ordering::SeqCst),
        cr2: CR2.load(Ordering::SeqCst),
    };
    (r, seen)
}

/// Write `msg` to stdout with write(2) (async-signal-safe).
fn say(msg: &[u8]) {
    // SAFETY: `msg` is readable for its length.
    unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
}

extern "C" fn on_sigsegv(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !ARMED.load(Ordering::SeqCst) {
        say(b"vpt-demo: FAIL unexpected SIGSEGV\n");
        // SAFETY: restoring the default action is async-signal-safe; the
        // access faults again and the default action kills the process.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        // SAFETY: for an SA_SIGINFO handler the kernel passes a valid
        // siginfo_t and ucontext_t, live for the handler's duration.
        let (addr, code, gregs) = unsafe {
            let uc = &*ctx.cast::<libc::ucontext_t>();
            (
                (*info).si_addr() as u64,
                (*info).si_code,
                uc.uc_mcontext.gregs,
            )
        };
        ADDR.store(addr, Ordering::SeqCst);
        CODE.store(code, Ordering::SeqCst);
        TRAPNO.store(gregs[libc::REG_TRAPNO as usize] as u64, Ordering::SeqCst);
        ERR.store(gregs[libc::REG_ERR as usize] as u64, Ordering::SeqCst);
        CR2.store(gregs[libc::REG_CR2 as usize] as u64, Ordering::SeqCst);
    }
    if n > MAX_SIGNALS {
        say(b"vpt-demo: FAIL SIGSEGV repeats after the handler fixed the tables\n");
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(1) };
    }
    let Some(word) = RAM
        .get()
        .and_then(|ram| ram.get((FIX_PA.load(Ordering::SeqCst) / 8) as usize))
    else {
        return;
    };
    let value = FIX_VALUE.load(Ordering::SeqCst);
    if FIX_OR.load(Ordering::SeqCst) {
        word.fetch_or(value, Ordering::SeqCst);
    } else {
        word.store(value, Ordering::SeqCst);
    }
}
