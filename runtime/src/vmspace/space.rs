//! One vmspace's host side: its stub process, vkrun's mapping of the stub
//! region (code, data, context blocks), the books of what its user range
//! maps ([`Maps`], pure), and making and reaping stubs (tracer thread).
//!
//! The context blocks are writable by the user code running in the stub:
//! every word read from them is hostile input.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use vkabi::USER_MAX;

use super::context::Context;
use crate::stats::Stats;
use crate::sys::region::SharedRegion;
use crate::sys::stub::{
    self, CONTEXTS, CTX_SIZE, CX_OPEN, CX_SEQ, DATA, MAX_CONTEXTS, STUB_BASE, STUB_LEN,
};
use crate::sys::{futex, lock, signal};
use crate::tracee::Tracer;

/// What a range of a vmspace maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A MAP_VPAGETABLE window (the stub's `Vpt` state knows the rest).
    Window,
    /// RAM, linearly, from this RAM offset.
    Linear { off: u64 },
    /// Private anonymous memory of the stub.
    Anon,
}

/// One mapping of a vmspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub len: u64,
    pub kind: Kind,
    /// `PROT_*` of the mapping (pread and pwrite honour it).
    pub prot: i32,
}

/// What a vmspace's user range maps: start → mapping, never overlapping.
#[derive(Debug, Default)]
pub struct Maps(BTreeMap<u64, Mapping>);

impl Maps {
    /// Whether `[s, e)` is entirely mapped.
    pub fn covered(&self, s: u64, e: u64) -> bool {
        let mut at = s;
        if let Some((&k, m)) = self.0.range(..=s).next_back()
            && k + m.len > s
        {
            at = k + m.len;
        }
        for (&k, m) in self.0.range(s..e) {
            if k > at {
                return false;
            }
            at = at.max(k + m.len);
        }
        at >= e
    }

    /// Forget what `[s, e)` maps (cutting mappings that straddle it).
    pub fn cut(&mut self, s: u64, e: u64) {
        let overlapping: Vec<(u64, Mapping)> = self
            .0
            .range(..e)
            .filter(|&(&k, m)| k + m.len > s)
            .map(|(&k, &m)| (k, m))
            .collect();
        for (k, m) in overlapping {
            self.0.remove(&k);
            if k < s {
                self.0.insert(k, Mapping { len: s - k, ..m });
            }
            let end = k + m.len;
            if end > e {
                let kind = match m.kind {
                    Kind::Linear { off } => Kind::Linear { off: off + (e - k) },
                    other => other,
                };
                let right = Mapping {
                    len: end - e,
                    kind,
                    prot: m.prot,
                };
                self.0.insert(e, right);
            }
        }
    }

    /// Map `m` at `start` (the caller cut the range first).
    pub fn insert(&mut self, start: u64, m: Mapping) {
        self.0.insert(start, m);
    }

    /// The mapping holding `va`: its start and what it is.
    pub fn at(&self, va: u64) -> Option<(u64, Mapping)> {
        let (&k, &m) = self.0.range(..=va).next_back()?;
        (va < k + m.len).then_some((k, m))
    }

    /// Whether `[s, e)` holds anything but windows.
    pub fn has_non_window(&self, s: u64, e: u64) -> bool {
        self.0
            .range(..e)
            .any(|(&k, m)| k + m.len > s && m.kind != Kind::Window)
    }
}

/// One vmspace: its stub, its region, its mappings and contexts.
///
/// Lock order: `gone` before `contexts`, `slots`, `maps`, `ram_fd` (each
/// of those held alone) and before a context's run state.
#[derive(Debug)]
pub struct Vmspace {
    pub id: u64,
    /// The stub process (its main thread).
    pub stub: Pid,
    /// vkrun's mapping of the stub region's header (code, data).
    pub region: SharedRegion,
    /// vkrun's mapping of the context blocks (the rest of the region).
    pub blocks: SharedRegion,
    /// The blocks' memfd, which the fast RUN hands to the guest.
    pub blocks_file: File,
    pub stats: Arc<Stats>,
    pub maps: Mutex<Maps>,
    /// Execution contexts, by guest thread.
    pub contexts: Mutex<HashMap<Pid, Arc<Context>>>,
    /// Context thread of each block (to reuse a block only once its thread
    /// is gone).
    pub slots: Mutex<Vec<Option<Pid>>>,
    dead: AtomicBool,
    /// True once destroyed. Calls served off the tracer thread (RUN's
    /// start, mcontrol, pread, pwrite) hold it for reading while they use
    /// the vmspace; destroy takes it for writing, so a call either sees the
    /// vmspace destroyed (`ENOENT`, as if it had never been found) or holds
    /// destroy off (a RUN it started makes destroy `EBUSY`).
    pub gone: RwLock<bool>,
    /// The stub's descriptor of RAM, once opened.
    pub ram_fd: Mutex<Option<u64>>,
}

impl Vmspace {
    /// A vmspace `id` for a fresh `stub` with its `region`.
    pub fn new(id: u64, stub: Pid, region: Region, stats: Arc<Stats>) -> Self {
        Self {
            id,
            stub,
            region: region.header,
            blocks: region.blocks,
            blocks_file: region.blocks_file,
            stats,
            maps: Mutex::new(Maps::default()),
            contexts: Mutex::new(HashMap::new()),
            slots: Mutex::new(vec![None; MAX_CONTEXTS]),
            dead: AtomicBool::new(false),
            gone: RwLock::new(false),
            ram_fd: Mutex::new(None),
        }
    }

    /// The offset of context block `slot` in the blocks' memfd (the stub
    /// maps it at `STUB_BASE + CONTEXTS`).
    pub fn block(slot: usize) -> usize {
        (slot as u64 * CTX_SIZE) as usize
    }

    /// A 32-bit word of context block `slot`.
    pub fn block_word(&self, slot: usize, off: usize) -> &AtomicU32 {
        self.blocks.word(Self::block(slot) + off)
    }

    /// A 64-bit word of context block `slot`.
    pub fn block_qword(&self, slot: usize, off: usize) -> &AtomicU64 {
        self.blocks.qword(Self::block(slot) + off)
    }

    /// Whether the stub is gone (killed, crashed, destroyed).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Note the stub dead without killing it (it is being torn down).
    pub fn set_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// Declare the stub broken: kill it and wake every waiter.
    pub fn mark_dead(&self) {
        self.set_dead();
        let _ = kill(self.stub, Signal::SIGKILL);
        for ctx in lock(&self.contexts).values() {
            // A fast RUN's wrapper waiting on the block sees it closed.
            self.block_word(ctx.slot, CX_OPEN)
                .store(0, Ordering::SeqCst);
            let _ = futex::wake(self.block_word(ctx.slot, CX_SEQ));
        }
    }

    /// Interrupt context thread `tid` (its user code).
    pub fn kick(&self, tid: Pid) -> Result<(), Errno> {
        signal::tgkill(self.stub, tid, stub::KICK_SIGNAL)
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// A stub's region as vkrun holds it: the header (code, data) and the
/// context blocks, each its own memfd.
pub struct Region {
    pub header: SharedRegion,
    pub blocks: SharedRegion,
    pub blocks_file: File,
}

/// Make a stub: its region (code and data), the fork, the seize, and the
/// wait for its `int3`.
pub fn spawn(_: &Tracer) -> Result<(Pid, Region), Errno> {
    let (memfd, header) = SharedRegion::create(c"vkrun-stub", CONTEXTS)?;
    header.write(0, stub::code());
    header.write(DATA as usize, &stub::data_page());
    let (blocks_file, blocks) = SharedRegion::create(c"vkrun-contexts", STUB_LEN - CONTEXTS)?;
    let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pid = stub::fork_stub(memfd.as_fd(), blocks_file.as_fd(), go_read.as_fd())?;
    drop(go_read);
    // TRACECLONE: the agent's threads (MAP_VPAGETABLE) are traced like the
    // guest's; execution contexts are cloned CLONE_UNTRACED.
    let options = Options::PTRACE_O_EXITKILL | Options::PTRACE_O_TRACECLONE;
    if let Err(errno) = ptrace::seize(pid, options) {
        reap(pid);
        return Err(errno);
    }
    nix::unistd::write(&go_write, &[1]).inspect_err(|_| reap(pid))?;
    // Its int3 says it is ready; anything else means it is broken.
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
            Ok(WaitStatus::PtraceEvent(..)) => {
                let _ = ptrace::cont(pid, None);
            }
            Ok(status) => {
                tracing::warn!(%pid, ?status, "a vmspace stub failed while starting");
                reap(pid);
                return Err(Errno::EAGAIN);
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                reap(pid);
                return Err(errno);
            }
        }
    }
    tracing::debug!(%pid, "vmspace stub ready");
    let region = Region {
        header,
        blocks,
        blocks_file,
    };
    Ok((pid, region))
}

/// Kill a stub (or a thread of one) and collect it.
pub fn reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

// The region's layout is fixed at build time.
const _: () = {
    assert!(CONTEXTS + MAX_CONTEXTS as u64 * CTX_SIZE <= STUB_LEN);
    assert!(MAX_CONTEXTS >= 32);
    // Below the agent's region.
    assert!(STUB_BASE + STUB_LEN <= USER_MAX + 0x10_0000);
    // Blocks are aligned to their size (the handler finds its block from
    // its stack pointer).
    assert!((STUB_BASE + CONTEXTS).is_multiple_of(CTX_SIZE));
};

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 0x1000;

    fn anon(pages: u64) -> Mapping {
        Mapping {
            len: pages * P,
            kind: Kind::Anon,
            prot: libc::PROT_READ,
        }
    }

    #[test]
    fn cover_needs_every_byte_mapped() {
        let mut m = Maps::default();
        m.insert(0x10000, anon(2));
        m.insert(0x12000, anon(1));
        assert!(m.covered(0x10000, 0x13000));
        assert!(m.covered(0x11000, 0x12800));
        assert!(!m.covered(0x10000, 0x14000));
        assert!(!m.covered(0xf000, 0x11000));
        m.cut(0x11000, 0x12000);
        assert!(!m.covered(0x10000, 0x13000));
        assert!(m.covered(0x12000, 0x13000));
    }

    #[test]
    fn a_cut_keeps_both_ends_and_moves_linear_offsets() {
        let mut m = Maps::default();
        let linear = Mapping {
            len: 8 * P,
            kind: Kind::Linear { off: 0x40000 },
            prot: libc::PROT_READ | libc::PROT_WRITE,
        };
        m.insert(0x100000, linear);
        m.insert(0x200000, anon(4));
        m.cut(0x102000, 0x104000);
        assert_eq!(
            m.at(0x100fff),
            Some((
                0x100000,
                Mapping {
                    len: 2 * P,
                    ..linear
                }
            ))
        );
        assert_eq!(m.at(0x102000), None);
        let right = Mapping {
            len: 4 * P,
            kind: Kind::Linear { off: 0x44000 },
            ..linear
        };
        assert_eq!(m.at(0x107fff), Some((0x104000, right)));
        assert_eq!(m.at(0x108000), None);
        assert!(m.has_non_window(0x1ff000, 0x201000));
        m.insert(
            0x300000,
            Mapping {
                len: P,
                kind: Kind::Window,
                prot: 3,
            },
        );
        assert!(!m.has_non_window(0x300000, 0x301000));
    }
}
