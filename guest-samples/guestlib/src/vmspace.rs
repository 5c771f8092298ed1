//! A vmspace (ABI section 7) owned by the guest: `vmspace_create` on
//! [`Vmspace::create`], `vmspace_destroy` on drop, and the calls a vkernel
//! makes on it, each failing with the hypercall's name and errno.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use vkabi::hypercall::{self, Errno};
use vkabi::{
    MADV_INVAL, MADV_SETMAP, MAP_FIXED, MAP_SHARED, MAP_VPAGETABLE, PROT_EXEC, PROT_READ,
    PROT_WRITE, TrapFrame, VMSPACE_CTL_RUN, VextFrame,
};

use crate::errno::strerror;

/// A failed hypercall: its name and the errno it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {}", strerror(.errno.0))]
pub struct HypercallError {
    /// The hypercall, as DragonFly names it.
    pub call: &'static str,
    /// What it returned.
    pub errno: Errno,
}

/// Attach the hypercall's name to its errno.
fn named<T>(call: &'static str, r: Result<T, Errno>) -> Result<T, HypercallError> {
    r.map_err(|errno| HypercallError { call, errno })
}

/// A vmspace created by this guest and destroyed when dropped.
///
/// Its id is `pid << 32 | n` for the `n`th vmspace this host process
/// creates: not NULL and unique among all the host processes of a guest,
/// which share one registry (ABI section 7: a forked guest shares its
/// parent's).
pub struct Vmspace {
    id: u64,
}

/// Vmspaces created by this host process so far.
static CREATED: AtomicU64 = AtomicU64::new(0);

impl fmt::Debug for Vmspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vmspace({:#x})", self.id())
    }
}

impl Vmspace {
    /// `vmspace_create(id, 0, NULL)`: a new, empty user address space.
    ///
    /// An id still in use (`EEXIST`: a vmspace a process of the same pid
    /// created earlier and another process kept, see
    /// [`Vmspace::into_id`]) is skipped, up to 64 times.
    pub fn create() -> Result<Vmspace, HypercallError> {
        // SAFETY: getpid has no preconditions and cannot fail.
        let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
        let mut tries = 0;
        loop {
            let n = CREATED.fetch_add(1, Ordering::Relaxed) + 1;
            let id = pid << 32 | n;
            match hypercall::vmspace_create(id, 0, 0) {
                Err(Errno(libc::EEXIST)) if tries < 64 => tries += 1,
                r => {
                    named("vmspace_create", r)?;
                    return Ok(Vmspace { id });
                }
            }
        }
    }

    /// Take over the vmspace `id` that another host process of the guest
    /// created and gave up with [`Vmspace::into_id`] (the registry is one
    /// per guest, ABI section 7): it is destroyed when this one is
    /// dropped. Its window and the tables it points at are as that process
    /// left them; nothing may run in it.
    pub fn adopt(id: u64) -> Vmspace {
        Vmspace { id }
    }

    /// Give up this vmspace without destroying it; its id, for
    /// [`Vmspace::adopt`].
    pub fn into_id(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }

    /// The opaque id the hypercalls take.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `vmspace_mmap(MAP_SHARED|MAP_VPAGETABLE|MAP_FIXED)` of guest RAM
    /// (`ram_fd`) over `[addr, addr + len)` with file offset `off`, read,
    /// write and execute: a window whose pages the host translates through
    /// the tables [`Vmspace::setmap`] names. The leaves decide each page's
    /// protection (ABI section 3), as in DragonFly's `cpu_vmspace_alloc()`.
    /// Returns the address the window got.
    pub fn map_vpagetable(
        &self,
        addr: u64,
        len: u64,
        off: u64,
        ram_fd: i32,
    ) -> Result<u64, HypercallError> {
        named(
            "vmspace_mmap",
            hypercall::vmspace_mmap(
                self.id(),
                addr,
                len,
                PROT_READ | PROT_WRITE | PROT_EXEC,
                MAP_SHARED | MAP_VPAGETABLE | MAP_FIXED,
                ram_fd,
                off,
            ),
        )
    }

    /// `vmspace_mcontrol(MADV_SETMAP, master)` on `[addr, addr + len)`:
    /// `master` (a raw VPTE) names the tables the window is translated
    /// through.
    pub fn setmap(&self, addr: u64, len: u64, master: u64) -> Result<(), HypercallError> {
        named(
            "vmspace_mcontrol(MADV_SETMAP)",
            hypercall::vmspace_mcontrol(self.id(), addr, len, MADV_SETMAP, master),
        )
    }

    /// `vmspace_mcontrol(MADV_INVAL)` on `[addr, addr + len)`: the host
    /// forgets its translations there, so changed or removed leaves take
    /// effect (ABI section 5).
    pub fn inval(&self, addr: u64, len: u64) -> Result<(), HypercallError> {
        named(
            "vmspace_mcontrol(MADV_INVAL)",
            hypercall::vmspace_mcontrol(self.id(), addr, len, MADV_INVAL, 0),
        )
    }

    /// `vmspace_ctl(VMSPACE_CTL_RUN)`: run the user context with `tf` and
    /// `vf` until it traps; `tf` then holds its registers and the trap.
    pub fn run(&self, tf: &mut TrapFrame, vf: &mut VextFrame) -> Result<(), HypercallError> {
        named(
            "vmspace_ctl(VMSPACE_CTL_RUN)",
            hypercall::vmspace_ctl(self.id(), VMSPACE_CTL_RUN, tf, vf),
        )
    }

    /// [`Vmspace::run`] on the vmspace with id `id`, for a thread that
    /// does not hold the [`Vmspace`] (another guest thread owns it and
    /// keeps it alive while this one runs in it).
    pub fn run_id(id: u64, tf: &mut TrapFrame, vf: &mut VextFrame) -> Result<(), HypercallError> {
        named(
            "vmspace_ctl(VMSPACE_CTL_RUN)",
            hypercall::vmspace_ctl(id, VMSPACE_CTL_RUN, tf, vf),
        )
    }

    /// `vmspace_pread`: copy up to `buf.len()` bytes from user address
    /// `vaddr`; a short count means the next byte is not accessible.
    pub fn pread(&self, buf: &mut [u8], vaddr: u64) -> Result<usize, HypercallError> {
        named(
            "vmspace_pread",
            hypercall::vmspace_pread(self.id(), buf, 0, vaddr),
        )
    }
}

impl Drop for Vmspace {
    fn drop(&mut self) {
        // Nothing runs in it any more (RUN returned), so destroy cannot be
        // EBUSY; if it fails anyway the vmspace goes when the guest exits.
        let _ = hypercall::vmspace_destroy(self.id());
    }
}
