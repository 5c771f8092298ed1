//! MAP_VPAGETABLE in the guest's own address space (ABI sections 3-6):
//! windows created by `vk_mmap`, master PDEs set by `mcontrol(MADV_SETMAP)`,
//! translations dropped by `MADV_INVAL`, and faults resolved by walking the
//! guest's VPTEs.
//!
//! Per guest process that maps a window, vkrun sets up:
//! - an **agent** thread in the process (machine code from
//!   [`crate::sys::agent_code`]) that runs `mmap`s in the guest's mm on
//!   request, so installs never stop a guest thread;
//! - a **userfaultfd** created in the guest without `UFFD_USER_MODE_ONLY`
//!   (so kernel-mode accesses are caught too) and owned by the supervisor;
//! - a **fault thread** in the supervisor that reads the uffd, walks, and
//!   installs a true alias (`mmap(MAP_SHARED|MAP_FIXED, ram, pa)`) or, when
//!   the walk fails, a `PROT_NONE` page that turns the retried access into a
//!   real `SIGSEGV` (user mode) or `EFAULT` (kernel mode).
//!
//! A window is anonymous `MAP_NORESERVE` memory registered for missing-page
//! faults; dropping translations maps fresh anonymous memory over a range and
//! registers it again (cost per VMA, not per page; MECHANISMS.md).
//!
//! Read-only installs (RW or M clear) are upgraded when a write faults on
//! them: the tracer sees the `SIGSEGV`, walks for a write (setting M) and, if
//! the walk allows it, installs the page writable and suppresses the signal.
//!
//! Lock order: [`Vpt::procs`] before a process's [`Process::mm`]. The mm lock
//! serialises every change to the process's window mappings (agent batches,
//! injected drops), and a fault walks and installs under it: so once
//! `MADV_INVAL` has dropped a range, no walk made before it can install.
//!
//! Host VMAs are budgeted: each installed run costs at most two VMAs (it
//! splits the window's anonymous VMA), the least recently installed runs are
//! evicted (replaced by registered anonymous memory, whole runs at a time)
//! before the process nears `vm.max_map_count`, and an install that fails
//! with `ENOMEM` evicts more and retries.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use vkabi::{
    Hypercall, MADV_INVAL, MADV_SETMAP, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, MAP_STACK,
    MAP_VPAGETABLE, PAGE_SIZE, PGEX_I, PGEX_U, PGEX_W, PROT_READ, PROT_WRITE, USER_MAX,
};
use vpte::{Access, GuestVirtAddr, PageIndex, Vpte, WalkError};

use crate::inject::{InjectError, Injector, errno_or};
use crate::lock;
use crate::ram::GuestRam;
use crate::remote::{self, RemoteAddr};
use crate::stats::Stats;
use crate::sys::agent_code::{
    self, CTL_COUNT, CTL_DONE, CTL_OPS, CTL_REQ, CTL_RET, CTL_SIGSET, OP_SIZE, RES_BUDGET,
    RES_ENABLED, RES_FWD_HEAD, RES_FWD_RING, RES_FWD_SLOTS, RES_FWD_TAIL, RES_INS_HEAD,
    RES_INS_RING, RES_INS_SLOTS, RES_INS_TAIL, RES_LOCK, RES_MAX_WINDOWS, RES_NWIN, RES_RAM_BASE,
    RES_RAM_FD, RES_RAM_SIZE, RES_RESOLVED, RES_SIGSET, RES_SUP_WAKE, RES_UFFD, RES_WINDOWS,
};
use crate::sys::uffd::{PageFault, Userfault};
use crate::sys::{futex, kcmp};
use crate::trace::TraceWriter;

const PAGE: u64 = PAGE_SIZE;
/// Pages of the agent region: control, code, scratch, two of stack for the
/// installer, the resolver page, two of stack for the resolver.
const AGENT_PAGES: u64 = 8;
const AGENT_INSTALLER_STACK_TOP: u64 = 5 * PAGE;
const AGENT_RESOLVER: u64 = 5 * PAGE;
const AGENT_RESOLVER_STACK_TOP: u64 = 8 * PAGE;
const AGENT_CODE: u64 = PAGE;
const AGENT_SCRATCH: u64 = 2 * PAGE;
/// In the scratch page: the caller's saved signal mask (agent start-up).
const SCRATCH_SIGMASK: u64 = 0;
/// In the scratch page: the RAM memfd's `/proc` path.
const SCRATCH_PATH: u64 = 256;
/// In the scratch page: `struct uffdio_register` slots for the agent.
const SCRATCH_REGISTER: u64 = 512;
/// Register slots (32 bytes each) in the scratch page.
const REGISTER_SLOTS: usize = ((PAGE - SCRATCH_REGISTER) / 32) as usize;
/// Lowest descriptor number the agent's own descriptors are moved to.
const AGENT_FD_FLOOR: u64 = 768;
/// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// Where vkrun asks to put the agent: the 2 MiB above `USER_MAX`, which the
/// ABI keeps out of the guest's reach.
const AGENT_HINT: u64 = USER_MAX + 0x10_0000;
const MAP_ANONYMOUS: u64 = libc::MAP_ANONYMOUS as u64;
const MAP_NORESERVE: u64 = libc::MAP_NORESERVE as u64;
const MAP_POPULATE: u64 = libc::MAP_POPULATE as u64;
const MAP_FIXED_NOREPLACE: u64 = libc::MAP_FIXED_NOREPLACE as u64;
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
/// Pages installed ahead of access around a fault, at most (ABI section 3,
/// Prefault). A run never leaves the faulting page's last-level table (512
/// pages); whole-table runs made sequential touch of A|M-carrying entries
/// cheaper than native (0.27 vs 0.33 µs a page), where 16-page runs cost
/// 1.3 µs a page.
const PREFAULT_MAX: u64 = 512;
/// Host VMAs vkrun lets one guest process's installs reach, below
/// `vm.max_map_count` (65530 here) with room for the guest's own mappings.
const VMA_BUDGET: u64 = 60_000;
/// VMAs one installed run may cost: it splits the window's anonymous VMA.
const VMAS_PER_RUN: u64 = 2;
/// How long the supervisor waits for the agent before checking it is alive.
const AGENT_POLL: Duration = Duration::from_millis(50);
/// How long a batch may take before vkrun gives up on the agent (a guest
/// that overwrote it, or stopped it for good) and kills the guest process:
/// a broken agent must not hang the supervisor.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Offsets in `ucontext_t` (x86-64 glibc/kernel layout) of the registers the
/// ABI fills for a failed walk: `uc_mcontext.gregs[REG_ERR, REG_TRAPNO,
/// REG_CR2]`.
const UC_GREGS: u64 = 40;
const REG_ERR: u64 = 19;
const REG_TRAPNO: u64 = 20;
const REG_CR2: u64 = 22;
const T_PAGEFLT_X86: u64 = 14;
/// `si_code` values of `SIGSEGV` (siginfo.h).
const SEGV_MAPERR: i32 = 1;
const SEGV_ACCERR: i32 = 2;

/// The state of MAP_VPAGETABLE for every guest process using it.
#[derive(Debug)]
pub struct Vpt {
    ram: Arc<GuestRam>,
    stats: Arc<Stats>,
    trace: Arc<Mutex<TraceWriter>>,
    procs: Mutex<HashMap<Pid, Arc<Process>>>,
    /// Thread → thread group, for hypercalls served from notifications.
    tgids: Mutex<HashMap<Pid, Pid>>,
    /// Agent threads (vkrun's, not the guest's: their exits are not traced).
    agents: Mutex<HashSet<Pid>>,
    /// Resolver threads → their process.
    resolvers: Mutex<HashMap<Pid, Pid>>,
    /// Installed runs one process may hold before the oldest are evicted.
    max_runs: u64,
    /// Who takes a failed walk in a vmspace (see [`Vpt::on_vmspace_walk_failed`]).
    vmspace_fault: OnceLock<FailedWalkHook>,
    /// Who ran into a fault in a vmspace, for the trace (see
    /// [`Vpt::on_vmspace_guest_of`]).
    vmspace_guest_of: OnceLock<GuestOfHook>,
}

/// Called with (faulting thread, address, `PGEX` bits) when a walk fails in a
/// vmspace; true if it took the fault.
struct FailedWalkHook(Box<dyn Fn(Pid, u64, u64) -> bool + Send + Sync>);

impl std::fmt::Debug for FailedWalkHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailedWalkHook")
    }
}

/// The guest thread whose execution context is the given stub thread.
struct GuestOfHook(Box<dyn Fn(Pid) -> Option<Pid> + Send + Sync>);

impl std::fmt::Debug for GuestOfHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestOfHook")
    }
}

/// One VPAGETABLE mapping.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: u64,
    len: u64,
    off: u64,
    master: u64,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Why a page is mapped `PROT_NONE`: the walk that failed there.
#[derive(Clone, Copy, Debug)]
struct Poison {
    si_code: i32,
    pgex: u64,
}

/// Mutable per-process state, under [`Process::mm`].
#[derive(Debug, Default)]
struct MmState {
    windows: BTreeMap<u64, Window>,
    poisoned: HashMap<u64, Poison>,
    /// Installed runs: start → (length, install sequence number).
    installed: BTreeMap<u64, (u64, u64)>,
    /// Install order, oldest first; entries whose sequence number no longer
    /// matches `installed` are stale and skipped.
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// VMAs this process's installs are counted for in `host_vmas`.
    counted_vmas: u64,
    /// The resolver's fault count already added to the counters.
    resolved_seen: u64,
}

/// A process's mm state with both locks held: [`Process::mm`] and the lock
/// shared with the in-guest resolver (released first, on drop).
struct Locked<'a> {
    mm: MutexGuard<'a, MmState>,
    agent: &'a Agent,
}

impl std::ops::Deref for Locked<'_> {
    type Target = MmState;
    fn deref(&self) -> &MmState {
        &self.mm
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut MmState {
        &mut self.mm
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.agent.unlock_shared();
    }
}

/// A guest process with windows: its agent, its uffd and its fault thread.
#[derive(Debug)]
struct Process {
    tgid: Pid,
    space: Space,
    agent: Agent,
    uffd: Userfault,
    mm: Mutex<MmState>,
    /// The process is gone or exec'd: the fault thread stops.
    dead: AtomicBool,
    /// The resolver thread exited (the guest closed its uffd descriptor):
    /// the fault thread reads the uffd itself.
    resolver_gone: AtomicBool,
}

/// The supervisor's side of an agent: its shared region.
#[derive(Debug)]
struct Agent {
    region: MmapRaw,
    /// The region's address in the guest.
    guest_base: u64,
    tid: Pid,
    /// The RAM memfd's number in the guest (opened for the agent).
    ram_fd: AtomicU32,
    /// The guest's descriptor of its userfaultfd (the agent registers with it).
    uffd_fd: AtomicU32,
    /// The resolver thread (0 before it starts).
    resolver_tid: AtomicI32,
}

/// A run of RAM to map at a guest address: `mmap(va, len, prot, flags,
/// ram, pa)`.
#[derive(Clone, Copy, Debug)]
struct RamRun {
    va: u64,
    len: u64,
    prot: u64,
    flags: u64,
    pa: u64,
}

/// What the tracer should do with a `SIGSEGV` stop.
#[derive(Debug)]
pub enum SegvAction {
    /// Not ours: deliver it unchanged.
    Deliver,
    /// Handled here (the thread was resumed, or died: the status is given).
    Handled(Option<WaitStatus>),
}

/// Whose address space a window is made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// A guest process (`vk_mmap`).
    Guest,
    /// A vmspace's stub (`vmspace_mmap`): nothing of vkrun may be mapped
    /// below `USER_MAX`.
    Vmspace,
}

/// What a fault in a vmspace's context comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StubFault {
    /// Resolved: run the instruction again.
    Retry,
    /// The vkernel's: `T_PAGEFLT` with these error bits.
    Report(u64),
}

/// Outcome of a hypercall served at a seccomp stop.
#[derive(Debug)]
pub struct StopOutcome {
    /// Threads created meanwhile (the agent), to be tracked.
    pub new_threads: Vec<Pid>,
    /// The thread's exit, if it died during the call.
    pub gone: Option<WaitStatus>,
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

impl Vpt {
    /// No process uses MAP_VPAGETABLE yet.
    pub fn new(ram: Arc<GuestRam>, stats: Arc<Stats>, trace: Arc<Mutex<TraceWriter>>) -> Self {
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65530);
        // Keep a tenth of the limit (at least 4096) for the guest's own VMAs.
        let budget = VMA_BUDGET.min(max_map_count.saturating_sub((max_map_count / 10).max(4096)));
        Self {
            ram,
            stats,
            trace,
            procs: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashSet::new()),
            resolvers: Mutex::new(HashMap::new()),
            tgids: Mutex::new(HashMap::new()),
            max_runs: (budget / VMAS_PER_RUN).max(16),
            vmspace_fault: OnceLock::new(),
            vmspace_guest_of: OnceLock::new(),
        }
    }

    /// Let `hook` take the faults whose walk fails in a vmspace: it ends the
    /// faulting context's RUN with `T_PAGEFLT` directly (the thread is
    /// interrupted in its userfaultfd wait), instead of the guest's way
    /// (poison the page, let the retry raise `SIGSEGV`, re-arm).
    pub fn on_vmspace_walk_failed(
        &self,
        hook: impl Fn(Pid, u64, u64) -> bool + Send + Sync + 'static,
    ) {
        let _ = self.vmspace_fault.set(FailedWalkHook(Box::new(hook)));
    }

    /// Let `hook` name the guest thread behind a vmspace's faulting context
    /// thread, so that fault trace lines name the guest thread, as RUN's do.
    pub fn on_vmspace_guest_of(&self, hook: impl Fn(Pid) -> Option<Pid> + Send + Sync + 'static) {
        let _ = self.vmspace_guest_of.set(GuestOfHook(Box::new(hook)));
    }

    /// Whether `tid` is one of vkrun's agent threads; forgets it if so
    /// (call when it exits).
    pub fn take_agent(&self, tid: Pid) -> bool {
        if let Some(tgid) = lock(&self.resolvers).remove(&tid) {
            // A resolver ends early only when its uffd descriptor is gone;
            // faults must still be served: by the fault thread itself.
            if let Some(p) = lock(&self.procs).get(&tgid) {
                tracing::debug!(%tgid, "resolver gone; the supervisor reads the uffd");
                p.resolver_gone.store(true, Ordering::Release);
                let _ = futex::wake(p.agent.res_word(RES_SUP_WAKE));
            }
        }
        lock(&self.agents).remove(&tid)
    }

    /// Serve `vk_mmap` for `tid`, stopped at
    /// `PTRACE_EVENT_SECCOMP`, and resume it with the result.
    pub fn on_hypercall_stop(self: &Arc<Self>, tid: Pid, tgid: Pid) -> StopOutcome {
        let mut inj = match Injector::at_seccomp_stop(tid) {
            Ok(inj) => inj,
            Err(e) => return outcome_of_error(e, Vec::new()),
        };
        let r = *inj.regs();
        let args = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        let h = Hypercall::from_nr(r.orig_rax);
        let when = SystemTime::now();
        let result = match h {
            Some(Hypercall::VkMmap) => self.vk_mmap(&mut inj, tgid, args),
            _ => Ok(Err(Errno::ENOSYS)),
        };
        let new_threads = std::mem::take(&mut inj.new_threads);
        let result = match result {
            Ok(r) => r,
            Err(e) => return outcome_of_error(e, new_threads),
        };
        crate::hypercall::account_stop_call(
            &self.trace,
            &self.stats,
            tid.as_raw(),
            r.orig_rax,
            args,
            result,
            when,
        );
        let raw = match result {
            Ok(v) => v,
            Err(e) => -(e as i64),
        };
        match inj.finish(raw) {
            Ok(()) => StopOutcome {
                new_threads,
                gone: None,
            },
            Err(e) => outcome_of_error(e, new_threads),
        }
    }

    /// `vk_mmap(addr, len, prot, flags, fd, off)` (ABI section 4).
    fn vk_mmap(
        self: &Arc<Self>,
        inj: &mut Injector,
        tgid: Pid,
        a: [u64; 6],
    ) -> Result<Result<i64, Errno>, InjectError> {
        let (addr, len, prot, flags, fd, off) =
            (a[0], a[1], a[2] as i32, a[3] as i32, a[4] as i32, a[5]);
        if flags & MAP_VPAGETABLE == 0 {
            // An ordinary mmap, made in the caller's address space.
            let ret = inj.syscall(libc::SYS_mmap, a)?;
            return Ok(errno_or(ret));
        }
        let is_ram = kcmp::same_file(self.ram.as_fd(), inj.tid(), fd) == Ok(true);
        if fd < 0 || !is_ram {
            return Ok(Err(Errno::EINVAL));
        }
        self.map_window(inj, tgid, addr, len, prot, flags, off, Space::Guest)
            .map(|r| r.map(|start| start as i64))
    }

    /// A MAP_VPAGETABLE window of RAM (the caller checked the descriptor)
    /// in process `tgid`, through `inj`, a stopped thread of it: the
    /// argument rules of ABI section 4, then anonymous memory registered
    /// with the process's userfaultfd (set up on first use). Returns the
    /// window's start.
    #[allow(clippy::too_many_arguments)]
    pub fn map_window(
        self: &Arc<Self>,
        inj: &mut Injector,
        tgid: Pid,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        off: u64,
        space: Space,
    ) -> Result<Result<u64, Errno>, InjectError> {
        let fixed = flags & MAP_FIXED != 0;
        let len = match len.checked_add(PAGE - 1) {
            Some(l) if len > 0 => page_down(l),
            _ => return Ok(Err(Errno::EINVAL)),
        };
        if flags & 3 != MAP_SHARED
            || flags & MAP_PRIVATE != 0
            || flags & MAP_STACK != 0
            || prot & (PROT_READ | PROT_WRITE) != PROT_READ | PROT_WRITE
            || !off.is_multiple_of(PAGE)
            || len > USER_MAX
            || (fixed && (!addr.is_multiple_of(PAGE) || addr > USER_MAX - len))
        {
            return Ok(Err(Errno::EINVAL));
        }
        let proc_ = match self.process(inj, tgid, space)? {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let mut mm = match self.enter(&proc_) {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let map_flags = libc::MAP_PRIVATE as u64
            | MAP_ANONYMOUS
            | MAP_NORESERVE
            | if fixed { libc::MAP_FIXED as u64 } else { 0 };
        let hint = if fixed { addr } else { 0 };
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let ret = inj.syscall(libc::SYS_mmap, [hint, len, rw, map_flags, u64::MAX, 0])?;
        let start = match errno_or(ret) {
            Ok(v) => v as u64,
            Err(e) => return Ok(Err(e)),
        };
        if start.checked_add(len).is_none_or(|end| end > USER_MAX) {
            inj.syscall(libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
            return Ok(Err(Errno::ENOMEM));
        }
        if let Err(e) = proc_.uffd.register_missing(start, len) {
            inj.syscall(libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
            return Ok(Err(e));
        }
        forget_range(&mut mm, start, start + len);
        mm.windows.insert(
            start,
            Window {
                start,
                len,
                off,
                master: 0,
            },
        );
        self.publish_windows(&proc_, &mm);
        self.stats.vpagetable_mmap.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(start))
    }

    /// `mcontrol(addr, len, behav, value)` (ABI section 5) for thread `tid`,
    /// served from the hypercall thread: drops go through the agent.
    pub fn mcontrol(&self, tid: Pid, a: [u64; 6]) -> Result<i64, Errno> {
        let tgid = self.tgid(tid);
        self.mcontrol_in(tgid, a, |s, e, covered| {
            maps_other_memory(tgid, s, e, covered)
        })
    }

    /// `mcontrol` in process `tgid` (a guest process or a vmspace's stub);
    /// `other(start, end, windows)` says whether `[start, end)` maps memory
    /// that is not a window (`windows`: the window pieces in the range).
    pub fn mcontrol_in(
        &self,
        tgid: Pid,
        a: [u64; 6],
        other: impl Fn(u64, u64, &[(u64, u64)]) -> bool,
    ) -> Result<i64, Errno> {
        let (addr, len, behav, value) = (a[0], a[1], a[2] as i32, a[3]);
        if (0..=9).contains(&behav) {
            return Ok(0);
        }
        if behav != MADV_INVAL && behav != MADV_SETMAP {
            return Err(Errno::EINVAL);
        }
        let start = page_down(addr);
        let end = match addr.checked_add(len).and_then(|e| e.checked_add(PAGE - 1)) {
            Some(e) => page_down(e),
            None => return Err(Errno::EINVAL),
        };
        if end > USER_MAX {
            return Err(Errno::EINVAL);
        }
        if behav == MADV_SETMAP {
            self.stats.vpagetable_setmap.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.vpagetable_inval.fetch_add(1, Ordering::Relaxed);
        }
        let proc_ = lock(&self.procs).get(&tgid).cloned();
        let mut covered = Vec::new();
        if let Some(p) = &proc_ {
            let mut mm = self.enter(p)?;
            let pieces: Vec<(u64, u64)> = mm
                .windows
                .values()
                .filter(|w| w.start < end && start < w.end())
                .map(|w| (w.start.max(start), w.end().min(end)))
                .collect();
            for w in mm.windows.values_mut() {
                if behav == MADV_SETMAP && w.start < end && start < w.end() {
                    w.master = value;
                }
            }
            self.publish_windows(p, &mm);
            for &(s, e) in &pieces {
                self.drop_translations(p, &mut mm, s, e)?;
                covered.push((s, e));
            }
        }
        if behav == MADV_SETMAP && other(start, end, &covered) {
            return Err(Errno::EINVAL);
        }
        Ok(0)
    }

    /// Drop every host translation in `[s, e)` of a window: map fresh
    /// registered anonymous memory over the span that holds installed or
    /// faulted pages (one mmap: its cost is per VMA, not per page), so they
    /// walk again. Caller holds `mm`.
    fn drop_translations(
        &self,
        p: &Process,
        mm: &mut MmState,
        s: u64,
        e: u64,
    ) -> Result<(), Errno> {
        let before = mm
            .installed
            .range(..s)
            .next_back()
            .filter(|&(&k, &(l, _))| k + l > s)
            .map(|(&k, &(l, _))| (k, k + l));
        let runs = mm.installed.range(s..e).map(|(&k, &(l, _))| (k, k + l));
        let poisoned = mm
            .poisoned
            .keys()
            .filter(|&&pg| s <= pg && pg < e)
            .map(|&pg| (pg, pg + PAGE));
        let span = before.into_iter().chain(runs).chain(poisoned).fold(
            None,
            |acc: Option<(u64, u64)>, (a, b)| match acc {
                None => Some((a, b)),
                Some((lo, hi)) => Some((lo.min(a), hi.max(b))),
            },
        );
        let Some((lo, hi)) = span else {
            return Ok(()); // nothing installed here: nothing to drop
        };
        let (lo, hi) = (lo.max(s), hi.min(e));
        self.rearm(p, &[(lo, hi - lo)])?;
        mm.poisoned.retain(|&page, _| page < lo || page >= hi);
        self.forget_installed(mm, lo, hi);
        Ok(())
    }

    /// The thread-group id of guest thread `tid` (cached; see
    /// [`Vpt::forget_thread`]).
    fn tgid(&self, tid: Pid) -> Pid {
        if let Some(t) = lock(&self.tgids).get(&tid) {
            return *t;
        }
        let tgid = crate::supervisor::tgid_of(tid).unwrap_or(tid);
        lock(&self.tgids).insert(tid, tgid);
        tgid
    }

    /// Thread `tid` exited: its id may be reused.
    pub fn forget_thread(&self, tid: Pid) {
        lock(&self.tgids).remove(&tid);
    }

    /// Install RAM `[pa, pa+len)` at `va` in `p`'s guest, keeping the VMA
    /// budget: evict old runs first if needed, and again on `ENOMEM`.
    /// Caller holds `mm`.
    fn install(&self, p: &Process, mm: &mut MmState, run: RamRun) -> Result<(), Errno> {
        self.make_room(p, mm)?;
        let mut attempt = 0;
        loop {
            match p.agent.mmap_ram(p.tgid, self.ram.raw_fd(), run) {
                Ok(()) => break,
                // The host's VMA limit: never fail a valid access for it.
                Err(Errno::ENOMEM) if attempt < 3 && !mm.installed.is_empty() => {
                    attempt += 1;
                    let n = (mm.installed.len() as u64 / 2).max(1);
                    self.evict(p, mm, n)?;
                }
                Err(e) => return Err(e),
            }
        }
        self.record_install(mm, run.va, run.len);
        self.stats
            .host_mappings_installed
            .fetch_add(1, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Evict an eighth of the budget's runs when the process holds as many
    /// as the budget allows. Caller holds `mm`.
    fn make_room(&self, p: &Process, mm: &mut MmState) -> Result<(), Errno> {
        if mm.installed.len() as u64 >= self.max_runs {
            self.evict(p, mm, (self.max_runs / 8).max(1))?;
        }
        Ok(())
    }

    /// Note an installed run for the VMA budget.
    fn record_install(&self, mm: &mut MmState, va: u64, len: u64) {
        // Runs wholly replaced by this one are gone.
        let inside: Vec<u64> = mm.installed.range(va..va + len).map(|(&k, _)| k).collect();
        for k in inside {
            if mm
                .installed
                .get(&k)
                .is_some_and(|&(l, _)| k + l <= va + len)
            {
                mm.installed.remove(&k);
            }
        }
        let seq = mm.next_seq;
        mm.next_seq += 1;
        mm.installed.insert(va, (len, seq));
        mm.order.push_back((va, seq));
    }

    /// Evict up to `count` of the least recently installed runs: replace
    /// each (a whole run, so no split is needed at the limit) with fresh
    /// registered anonymous memory. Caller holds `mm`.
    fn evict(&self, p: &Process, mm: &mut MmState, count: u64) -> Result<(), Errno> {
        let mut victims = Vec::new();
        while (victims.len() as u64) < count {
            let Some((va, seq)) = mm.order.pop_front() else {
                break;
            };
            if let Some(&(len, s)) = mm.installed.get(&va)
                && s == seq
            {
                mm.installed.remove(&va);
                victims.push((va, len));
            }
        }
        self.rearm(p, &victims)?;
        self.stats
            .host_mappings_evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Put fresh registered anonymous memory over each `(va, len)`, dropping
    /// whatever translation was there, with no moment at which another guest
    /// thread could touch unregistered memory (and see zeroes): each range is
    /// mapped `PROT_NONE` first (an access then is a `SIGSEGV` the tracer
    /// resolves once the caller releases `mm`), registered by the agent, and
    /// only then made accessible. Caller holds `mm`.
    fn rearm(&self, p: &Process, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        const OPS_PER_RANGE: usize = 3;
        let none = libc::PROT_NONE as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags =
            libc::MAP_PRIVATE as u64 | MAP_ANONYMOUS | MAP_NORESERVE | libc::MAP_FIXED as u64;
        let uffd = u64::from(p.agent.uffd_fd.load(Ordering::Relaxed));
        let per_batch = (agent_code::MAX_OPS / OPS_PER_RANGE).min(REGISTER_SLOTS);
        for chunk in ranges.chunks(per_batch) {
            let mut ops = Vec::with_capacity(chunk.len() * OPS_PER_RANGE);
            for (i, &(va, len)) in chunk.iter().enumerate() {
                let slot = p.agent.register_slot(i, va, len);
                ops.push((libc::SYS_mmap, [va, len, none, flags, u64::MAX, 0]));
                ops.push((libc::SYS_ioctl, [uffd, UFFDIO_REGISTER, slot, 0, 0, 0]));
                ops.push((libc::SYS_mprotect, [va, len, rw, 0, 0, 0]));
            }
            let r = p.agent.run(p.tgid, &ops)?;
            for (i, &(va, len)) in chunk.iter().enumerate() {
                errno_or(r[OPS_PER_RANGE * i])?;
                if errno_or(r[OPS_PER_RANGE * i + 1]).is_err() {
                    // The guest closed the agent's uffd descriptor: register
                    // from here, and zap whatever was mapped meanwhile.
                    p.uffd.register_missing(va, len)?;
                    let dontneed = libc::MADV_DONTNEED as u64;
                    p.agent
                        .run(p.tgid, &[(libc::SYS_madvise, [va, len, dontneed, 0, 0, 0])])?;
                }
            }
        }
        Ok(())
    }

    /// Forget the installed runs wholly inside `[s, e)` (just dropped).
    fn forget_installed(&self, mm: &mut MmState, s: u64, e: u64) {
        let inside: Vec<u64> = mm
            .installed
            .range(s..e)
            .filter(|&(&k, &(l, _))| k + l <= e)
            .map(|(&k, _)| k)
            .collect();
        for k in inside {
            mm.installed.remove(&k);
        }
        if mm.installed.is_empty() {
            mm.order.clear();
        }
        self.sync_vma_gauge(mm);
    }

    /// Bring `vkrun.host_vmas` (an upper bound: two per installed run) up to
    /// date with this process's runs.
    fn sync_vma_gauge(&self, mm: &mut MmState) {
        let now = mm.installed.len() as u64 * VMAS_PER_RUN;
        if now >= mm.counted_vmas {
            let total = self
                .stats
                .host_vmas
                .fetch_add(now - mm.counted_vmas, Ordering::Relaxed)
                + (now - mm.counted_vmas);
            self.stats
                .host_vmas_peak
                .fetch_max(total, Ordering::Relaxed);
        } else {
            self.stats
                .host_vmas
                .fetch_sub(mm.counted_vmas - now, Ordering::Relaxed);
        }
        mm.counted_vmas = now;
    }

    /// The process state of `tgid`, setting up its agent and uffd (through
    /// `inj`, a stopped thread of it) on first use.
    fn process(
        self: &Arc<Self>,
        inj: &mut Injector,
        tgid: Pid,
        space: Space,
    ) -> Result<Result<Arc<Process>, Errno>, InjectError> {
        if let Some(p) = lock(&self.procs).get(&tgid) {
            return Ok(Ok(Arc::clone(p)));
        }
        let agent = match self.start_agent(inj)? {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        // The uffd: created in the guest (bound to its mm), owned by us.
        let ret = agent.run(
            tgid,
            &[(
                libc::SYS_userfaultfd,
                [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
            )],
        );
        let guest_fd = match ret
            .map(|r| errno_or(r[0]))
            .and_then(|fd| fd.and_then(|fd| agent.raise_fd(tgid, fd)))
        {
            Ok(fd) => fd as i32,
            Err(e) => return Ok(Err(e)),
        };
        // The guest keeps its descriptor (close-on-exec) for the agent's own
        // registrations (see `rearm`).
        let stolen = crate::sys::uffd::steal_fd(tgid.as_raw(), guest_fd);
        agent.uffd_fd.store(guest_fd as u32, Ordering::Relaxed);
        let uffd = match stolen.and_then(Userfault::new) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        // In a vmspace, all of [0, USER_MAX) is the vkernel's: the resolver
        // cannot map RAM there to walk it, so the supervisor walks.
        let fast = !lock(&self.trace).set().faults && space == Space::Guest;
        // In a vmspace the resolver could only forward faults: the fault
        // thread reads the uffd itself (one hand-off less per fault).
        if space == Space::Guest
            && let Err(e) = self.start_resolver(inj, &agent, tgid, &uffd, fast)?
        {
            return Ok(Err(e));
        }
        if space == Space::Vmspace
            && let Err(e) = self.confine_agent(inj, &agent, tgid)?
        {
            return Ok(Err(e));
        }
        let p = Arc::new(Process {
            tgid,
            space,
            agent,
            uffd,
            mm: Mutex::new(MmState::default()),
            dead: AtomicBool::new(false),
            resolver_gone: AtomicBool::new(space == Space::Vmspace),
        });
        lock(&self.procs).insert(tgid, Arc::clone(&p));
        let vpt = Arc::clone(self);
        let pp = Arc::clone(&p);
        let spawned = std::thread::Builder::new()
            .name(format!("vkrun-faults-{tgid}"))
            .spawn(move || vpt.serve_faults(&pp));
        if let Err(e) = spawned {
            tracing::error!("cannot start the fault thread: {e}");
            return Ok(Err(Errno::EAGAIN));
        }
        Ok(Ok(p))
    }

    /// In a vmspace stub the agent's region is within reach of the user
    /// code: make its code read-only (through `inj`, the stub's main
    /// thread) and confine the installer to mm and uffd calls
    /// ([`agent_code::vmspace_agent_filter`]; it installs the filter on
    /// itself). A vmspace has no resolver thread.
    fn confine_agent(
        &self,
        inj: &mut Injector,
        agent: &Agent,
        tgid: Pid,
    ) -> Result<Result<(), Errno>, InjectError> {
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        let code = agent.guest_base + AGENT_CODE;
        if let Err(e) = errno_or(inj.syscall(libc::SYS_mprotect, [code, PAGE, rx, 0, 0, 0])?) {
            return Ok(Err(e));
        }
        // Requests come from the control page: read-only in the stub (vkrun
        // writes it through its own mapping; the agent answers in the
        // response page).
        let ctl = agent.guest_base;
        let ro = libc::PROT_READ as u64;
        if let Err(e) = errno_or(inj.syscall(libc::SYS_mprotect, [ctl, PAGE, ro, 0, 0, 0])?) {
            return Ok(Err(e));
        }
        let filter = agent_code::vmspace_agent_filter();
        let at = AGENT_SCRATCH + SCRATCH_REGISTER;
        let mut bytes = Vec::with_capacity(16 + 8 * filter.len());
        bytes.extend_from_slice(&(filter.len() as u64).to_ne_bytes());
        bytes.extend_from_slice(&(agent.guest_base + at + 16).to_ne_bytes());
        for insn in &filter {
            bytes.extend_from_slice(&insn.code.to_ne_bytes());
            bytes.extend_from_slice(&[insn.jt, insn.jf]);
            bytes.extend_from_slice(&insn.k.to_ne_bytes());
        }
        write_region(&agent.region, at as usize, &bytes);
        let prog = agent.guest_base + at;
        let r = agent.run(
            tgid,
            &[
                (
                    libc::SYS_prctl,
                    [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
                ),
                (
                    libc::SYS_seccomp,
                    [libc::SECCOMP_SET_MODE_FILTER as u64, 0, prog, 0, 0, 0],
                ),
            ],
        );
        Ok(r.and_then(|r| r.iter().try_for_each(|&v| errno_or(v).map(drop))))
    }

    /// Start the resolver thread (the in-guest fast path of faults): map RAM
    /// for it, fill its page, make the uffd blocking (the resolver is its
    /// only reader now) and clone it from `inj`'s thread, signals blocked.
    fn start_resolver(
        &self,
        inj: &mut Injector,
        agent: &Agent,
        tgid: Pid,
        uffd: &Userfault,
        enabled: bool,
    ) -> Result<Result<(), Errno>, InjectError> {
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let shared = libc::MAP_SHARED as u64 | MAP_NORESERVE;
        let ram_fd = u64::from(agent.ram_fd.load(Ordering::Relaxed));
        let size = self.ram.size();
        // The fast path walks RAM through its own mapping; without it the
        // resolver only forwards faults and needs none.
        let ram_base = if !enabled {
            0
        } else {
            match agent
                .run(tgid, &[(libc::SYS_mmap, [0, size, rw, shared, ram_fd, 0])])
                .and_then(|r| errno_or(r[0]))
            {
                Ok(b) => b as u64,
                Err(e) => return Ok(Err(e)),
            }
        };
        agent
            .res_qword(RES_RAM_BASE)
            .store(ram_base, Ordering::Relaxed);
        agent.res_qword(RES_RAM_SIZE).store(size, Ordering::Relaxed);
        agent.res_qword(RES_RAM_FD).store(ram_fd, Ordering::Relaxed);
        let guest_uffd = u64::from(agent.uffd_fd.load(Ordering::Relaxed));
        agent
            .res_qword(RES_UFFD)
            .store(guest_uffd, Ordering::Relaxed);
        agent
            .res_qword(RES_SIGSET)
            .store(u64::MAX, Ordering::Relaxed);
        agent.res_word(RES_BUDGET).store(
            self.max_runs.min(u64::from(u32::MAX)) as u32,
            Ordering::Relaxed,
        );
        agent
            .res_word(RES_ENABLED)
            .store(u32::from(enabled), Ordering::Release);
        if let Err(e) = uffd.set_blocking() {
            return Ok(Err(e));
        }
        let base = agent.guest_base;
        let old_mask = base + AGENT_SCRATCH + SCRATCH_SIGMASK;
        let setmask = libc::SIG_SETMASK as u64;
        inj.syscall(
            libc::SYS_rt_sigprocmask,
            [setmask, base + CTL_SIGSET as u64, old_mask, 8, 0, 0],
        )?;
        let gadget = base + AGENT_CODE + agent_code::resolver_gadget() as u64;
        let child = inj.clone_at(gadget, |r| {
            r.rdi = THREAD_CLONE_FLAGS;
            r.rsi = base + AGENT_RESOLVER_STACK_TOP;
            r.rdx = 0;
            r.r10 = 0;
            r.r8 = 0;
            r.r15 = base + AGENT_RESOLVER;
        });
        inj.syscall(libc::SYS_rt_sigprocmask, [setmask, old_mask, 0, 8, 0, 0])?;
        let tid = child?;
        agent.resolver_tid.store(tid.as_raw(), Ordering::Relaxed);
        lock(&self.agents).insert(tid);
        lock(&self.resolvers).insert(tid, tgid);
        tracing::debug!(%tgid, resolver = %tid, fast = enabled, "resolver started");
        Ok(Ok(()))
    }

    /// Lock `p`'s mm state and the lock shared with its resolver, and take
    /// in what the resolver did meanwhile.
    fn enter<'a>(&self, p: &'a Process) -> Result<Locked<'a>, Errno> {
        let mm = lock(&p.mm);
        p.agent.lock_shared(p.tgid)?;
        let mut locked = Locked {
            mm,
            agent: &p.agent,
        };
        self.sync_from_resolver(p, &mut locked)?;
        Ok(locked)
    }

    /// Take in the resolver's installs (VMA bookkeeping and counters) and
    /// give it a fresh budget, evicting old runs first if needed. Caller
    /// holds both locks.
    fn sync_from_resolver(&self, p: &Process, mm: &mut MmState) -> Result<(), Errno> {
        let a = &p.agent;
        let head = a.res_word(RES_INS_HEAD).load(Ordering::Acquire);
        let mut tail = a.res_word(RES_INS_TAIL).load(Ordering::Relaxed);
        while tail != head {
            let slot = RES_INS_RING + 16 * (tail % RES_INS_SLOTS) as usize;
            let va = a.res_qword(slot).load(Ordering::Relaxed);
            let len = a.res_qword(slot + 8).load(Ordering::Relaxed);
            self.record_install(mm, va, len);
            tail = tail.wrapping_add(1);
        }
        a.res_word(RES_INS_TAIL).store(tail, Ordering::Release);
        self.count_resolved(p, mm);
        self.make_room(p, mm)?;
        let budget = self.max_runs.saturating_sub(mm.installed.len() as u64);
        a.res_word(RES_BUDGET)
            .store(budget.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Add the faults the resolver resolved since the last look to the
    /// counters (each was one walk and one install).
    fn count_resolved(&self, p: &Process, mm: &mut MmState) {
        let resolved = p.agent.res_qword(RES_RESOLVED).load(Ordering::Relaxed);
        let new = resolved.saturating_sub(mm.resolved_seen);
        mm.resolved_seen = resolved;
        self.stats
            .vpagetable_faults
            .fetch_add(new, Ordering::Relaxed);
        self.stats
            .host_mappings_installed
            .fetch_add(new, Ordering::Relaxed);
    }

    /// Copy the window table to the resolver page. Caller holds both locks.
    fn publish_windows(&self, p: &Process, mm: &MmState) {
        let a = &p.agent;
        let n = mm.windows.len().min(RES_MAX_WINDOWS);
        for (i, w) in mm.windows.values().take(n).enumerate() {
            let slot = RES_WINDOWS + 32 * i;
            a.res_qword(slot).store(w.start, Ordering::Relaxed);
            a.res_qword(slot + 8).store(w.end(), Ordering::Relaxed);
            a.res_qword(slot + 16).store(w.off, Ordering::Relaxed);
            a.res_qword(slot + 24).store(w.master, Ordering::Relaxed);
        }
        a.res_word(RES_NWIN).store(n as u32, Ordering::Release);
    }

    /// Create the agent in the process of `inj`'s thread (ABI-invisible:
    /// its region lies above `USER_MAX`).
    fn start_agent(&self, inj: &mut Injector) -> Result<Result<Agent, Errno>, InjectError> {
        let memfd = match nix::sys::memfd::memfd_create(
            c"vkrun-agent",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        ) {
            Ok(fd) => std::fs::File::from(fd),
            Err(e) => return Ok(Err(e)),
        };
        if memfd.set_len(AGENT_PAGES * PAGE).is_err() {
            return Ok(Err(Errno::ENOMEM));
        }
        let region = match MmapOptions::new()
            .len((AGENT_PAGES * PAGE) as usize)
            .map_raw(&memfd)
        {
            Ok(m) => m,
            Err(_) => return Ok(Err(Errno::ENOMEM)),
        };
        // A scratch page in the guest for the path of our memfd.
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let anon = libc::MAP_PRIVATE as u64 | MAP_ANONYMOUS;
        let scratch = inj.syscall(libc::SYS_mmap, [0, PAGE, rw, anon, u64::MAX, 0])?;
        let Ok(scratch) = errno_or(scratch).map(|v| v as u64) else {
            return Ok(Err(Errno::ENOMEM));
        };
        let path = format!("/proc/{}/fd/{}\0", std::process::id(), memfd.as_raw_fd());
        if let Err(e) = remote::write_bytes(inj.tid(), RemoteAddr(scratch), path.as_bytes()) {
            inj.syscall(libc::SYS_munmap, [scratch, PAGE, 0, 0, 0, 0])?;
            return Ok(Err(e));
        }
        let o_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let fd = inj.syscall(libc::SYS_open, [scratch, o_flags, 0, 0, 0, 0])?;
        inj.syscall(libc::SYS_munmap, [scratch, PAGE, 0, 0, 0, 0])?;
        let fd = match errno_or(fd) {
            Ok(fd) => fd as u64,
            Err(e) => return Ok(Err(e)),
        };
        let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let len = AGENT_PAGES * PAGE;
        let shared = libc::MAP_SHARED as u64;
        let mut base = inj.syscall(
            libc::SYS_mmap,
            [AGENT_HINT, len, rwx, shared | MAP_FIXED_NOREPLACE, fd, 0],
        )?;
        if base < 0 {
            base = inj.syscall(libc::SYS_mmap, [0, len, rwx, shared, fd, 0])?;
        }
        inj.syscall(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        let base = match errno_or(base) {
            Ok(b) => b as u64,
            Err(e) => return Ok(Err(e)),
        };
        // Code and control page, through our own mapping of the region.
        let code = agent_code::code();
        write_region(&region, AGENT_CODE as usize, code);
        write_region(&region, CTL_SIGSET, &u64::MAX.to_ne_bytes());
        // Start the thread with every signal blocked (it inherits the mask),
        // then give the caller its mask back.
        let old_mask = base + AGENT_SCRATCH + SCRATCH_SIGMASK;
        let setmask = libc::SIG_SETMASK as u64;
        inj.syscall(
            libc::SYS_rt_sigprocmask,
            [setmask, base + CTL_SIGSET as u64, old_mask, 8, 0, 0],
        )?;
        let stack_top = base + AGENT_INSTALLER_STACK_TOP;
        let child = inj.clone_at(base + AGENT_CODE, |r| {
            r.rdi = THREAD_CLONE_FLAGS;
            r.rsi = stack_top;
            r.rdx = 0;
            r.r10 = 0;
            r.r8 = 0;
            r.r15 = base;
        });
        inj.syscall(libc::SYS_rt_sigprocmask, [setmask, old_mask, 0, 8, 0, 0])?;
        let tid = child?;
        let agent = Agent {
            region,
            guest_base: base,
            tid,
            ram_fd: AtomicU32::new(u32::MAX),
            uffd_fd: AtomicU32::new(u32::MAX),
            resolver_tid: AtomicI32::new(0),
        };
        // The agent's own descriptor for RAM.
        if let Err(e) = agent.open_ram(self.ram.raw_fd(), inj_tgid(inj)) {
            return Ok(Err(e));
        }
        lock(&self.agents).insert(tid);
        tracing::debug!(tid = %inj.tid(), agent = %tid, base = format_args!("{base:#x}"), "agent started");
        Ok(Ok(agent))
    }

    /// The fault thread of process `p`: until it dies, read its uffd and
    /// resolve each fault.
    fn serve_faults(&self, p: &Process) {
        let a = &p.agent;
        while !p.dead.load(Ordering::Acquire) {
            if p.resolver_gone.load(Ordering::Acquire)
                && a.res_word(RES_FWD_HEAD).load(Ordering::Acquire)
                    == a.res_word(RES_FWD_TAIL).load(Ordering::Relaxed)
            {
                self.serve_faults_directly(p);
                break;
            }
            let seen = a.res_word(RES_SUP_WAKE).load(Ordering::Acquire);
            let head = a.res_word(RES_FWD_HEAD).load(Ordering::Acquire);
            let mut tail = a.res_word(RES_FWD_TAIL).load(Ordering::Relaxed);
            if head == tail {
                let _ = futex::wait(a.res_word(RES_SUP_WAKE), seen, Duration::from_millis(200));
                continue;
            }
            while tail != head {
                let slot = RES_FWD_RING + 32 * (tail % RES_FWD_SLOTS) as usize;
                let event = a.res_qword(slot).load(Ordering::Relaxed) as u8;
                let flags = a.res_qword(slot + 8).load(Ordering::Relaxed);
                let address = a.res_qword(slot + 16).load(Ordering::Relaxed);
                let ptid = a.res_qword(slot + 24).load(Ordering::Relaxed) as u32;
                tail = tail.wrapping_add(1);
                a.res_word(RES_FWD_TAIL).store(tail, Ordering::Release);
                let _ = futex::wake(a.res_word(RES_FWD_TAIL));
                if event == crate::sys::uffd::UFFD_EVENT_PAGEFAULT {
                    let f = PageFault {
                        address,
                        write: flags & 1 != 0,
                        tid: ptid as i32,
                    };
                    self.resolve(p, &f);
                }
            }
        }
        tracing::debug!(tgid = %p.tgid, "fault thread done");
    }

    /// The fault thread without a resolver: poll and read the uffd here.
    fn serve_faults_directly(&self, p: &Process) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        if let Err(errno) = p.uffd.set_nonblocking() {
            tracing::warn!(%errno, "cannot make the uffd non-blocking");
        }
        let mut faults = Vec::new();
        while !p.dead.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(p.uffd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => break,
            }
            let ev = fds[0].revents().unwrap_or(PollFlags::empty());
            if ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
                break;
            }
            faults.clear();
            if p.uffd.read_faults(&mut faults).is_err() {
                break;
            }
            for f in &faults {
                self.resolve(p, f);
            }
        }
    }

    /// Walk window `w`'s tables for `page` (`Err(None)`: the page index
    /// overflows).
    fn walk_window(
        &self,
        w: &Window,
        page: u64,
        access: Access,
    ) -> Result<vpte::Translation, Option<WalkError>> {
        let pindex =
            PageIndex::for_fault(GuestVirtAddr(page), GuestVirtAddr(w.start), w.off).ok_or(None)?;
        vpte::walk(
            self.ram.words(),
            Vpte(w.master),
            pindex,
            access,
            self.ram.size(),
        )
        .map_err(Some)
    }

    /// Resolve one missing-page fault: walk, install or poison, wake.
    fn resolve(&self, p: &Process, f: &PageFault) {
        let page = page_down(f.address);
        let access = if f.write { Access::Write } else { Access::Read };
        let mut wake = (page, PAGE);
        let mut mm = match self.enter(p) {
            Ok(l) => l,
            Err(_) => {
                let _ = p.uffd.wake(page, PAGE);
                return;
            }
        };
        let Some(w) = window_at(&mm, page) else {
            drop(mm);
            let _ = p.uffd.wake(page, PAGE);
            return;
        };
        let result = self.walk_window(&w, page, access);
        let ops_result = match &result {
            Ok(t) => {
                let (done, range) = self.install_walked(p, &mut mm, &w, page, t, f.write);
                wake = range;
                done
            }
            Err(e) => {
                let (si_code, pgex) = poison_of(e.as_ref(), access);
                if p.space == Space::Vmspace
                    && self
                        .vmspace_fault
                        .get()
                        .is_some_and(|hook| (hook.0)(Pid::from_raw(f.tid), f.address, pgex))
                {
                    // The context leaves its wait for the vkernel; the page
                    // stays missing and walks again on the next access.
                    drop(mm);
                    self.trace_fault(f.tid, f.address, w.master, access, &result);
                    return;
                }
                mm.poisoned.insert(page, Poison { si_code, pgex });
                let flags = libc::MAP_PRIVATE as u64
                    | MAP_ANONYMOUS
                    | MAP_NORESERVE
                    | libc::MAP_FIXED as u64;
                p.agent
                    .run(
                        p.tgid,
                        &[(libc::SYS_mmap, [page, PAGE, 0, flags, u64::MAX, 0])],
                    )
                    .and_then(|r| errno_or(r[0]).map(drop))
            }
        };
        drop(mm);
        match &ops_result {
            // The process is going away (its agent died with it).
            Err(Errno::ESRCH) => {
                tracing::debug!(page = format_args!("{page:#x}"), "fault of a dying process")
            }
            Err(errno) => {
                tracing::warn!(%errno, page = format_args!("{page:#x}"), "installing a fault's page failed")
            }
            Ok(()) => {}
        }
        let _ = p.uffd.wake(wake.0, wake.1);
        if result.is_ok() && ops_result.is_ok() {
            self.stats.vpagetable_faults.fetch_add(1, Ordering::Relaxed);
        }
        self.trace_fault(f.tid, f.address, w.master, access, &result);
    }

    /// Install the translation `t` of `page` in window `w` (a walk just
    /// made), with the uninstalled neighbours whose VPTEs already carry A
    /// (and M) in the same mapping; returns the result and the range
    /// installed.
    fn install_walked(
        &self,
        p: &Process,
        mm: &mut MmState,
        w: &Window,
        page: u64,
        t: &vpte::Translation,
        write: bool,
    ) -> (Result<(), Errno>, (u64, u64)) {
        let first = w.off >> 12;
        let window = PageIndex(first)..PageIndex(first.saturating_add(w.len >> 12));
        let run = vpte::prefault_run(self.ram.words(), t, window, PREFAULT_MAX, self.ram.size());
        let (va, len, pa) = if run.count > 0 {
            let before = t.pindex.0 - run.first.0;
            // Neighbours already installed stay as they are: the run is the
            // uninstalled stretch around the fault (re-mapping them would
            // cost a run per fault).
            let start = page - before * PAGE;
            let end = start + run.count * PAGE;
            let mut lo = page;
            while lo > start && !is_installed(mm, lo - PAGE) {
                lo -= PAGE;
            }
            let mut hi = page + PAGE;
            while hi < end && !is_installed(mm, hi) {
                hi += PAGE;
            }
            (lo, hi - lo, t.pa.0 - (page - lo))
        } else {
            (page, PAGE, t.pa.0)
        };
        let populate = if write { MAP_POPULATE } else { 0 };
        let run = RamRun {
            va,
            len,
            prot: prot_of(t),
            flags: libc::MAP_SHARED as u64 | libc::MAP_FIXED as u64 | populate,
            pa,
        };
        (self.install(p, mm, run), (va, len))
    }

    /// A vmspace's user code is about to retry the access at `addr` that
    /// ended its last RUN with `T_PAGEFLT`: if the walk now succeeds (the
    /// vkernel filled the VPTE), install the page before it runs rather than
    /// let it fault a second time. The walk sets A (and M) as the retried
    /// access is about to; one that still fails installs nothing, and the
    /// access then faults and takes the usual path.
    /// `trace_tid` is the guest thread the trace line names.
    pub fn prefault(&self, tgid: Pid, addr: u64, write: bool, trace_tid: Pid) {
        let Some(p) = lock(&self.procs).get(&tgid).cloned() else {
            return;
        };
        let page = page_down(addr);
        let Ok(mut mm) = self.enter(&p) else {
            return;
        };
        let Some(w) = window_at(&mm, page) else {
            return;
        };
        if is_installed(&mm, page) || mm.poisoned.contains_key(&page) {
            return;
        }
        let access = if write { Access::Write } else { Access::Read };
        let Ok(t) = self.walk_window(&w, page, access) else {
            return;
        };
        let (done, _) = self.install_walked(&p, &mut mm, &w, page, &t, write);
        drop(mm);
        if done.is_ok() {
            self.stats.vpagetable_faults.fetch_add(1, Ordering::Relaxed);
            self.trace_fault(trace_tid.as_raw(), addr, w.master, access, &Ok(t));
        }
    }

    fn trace_fault(
        &self,
        tid: i32,
        va: u64,
        master: u64,
        access: Access,
        result: &Result<vpte::Translation, Option<WalkError>>,
    ) {
        if !lock(&self.trace).set().faults {
            return;
        }
        // A vmspace's context thread is named by the guest thread it runs
        // for, as in RUN's lines (looked up without the trace's lock held).
        let tid = self
            .vmspace_guest_of
            .get()
            .and_then(|hook| (hook.0)(Pid::from_raw(tid)))
            .map_or(tid, Pid::as_raw);
        let kind = match access {
            Access::Read => "read",
            Access::Write => "write",
            Access::Execute => "exec",
        };
        let outcome = match result {
            Ok(t) => format!("= {:#x} {}", t.pa.0, if t.writable { "rw" } else { "ro" }),
            Err(Some(e)) => format!("= SIGSEGV ({e})"),
            Err(None) => "= SIGSEGV (page index overflows)".to_owned(),
        };
        let text = format!("fault({va:#x}, {}, {kind}) {outcome}", Vpte(master));
        lock(&self.trace).line(tid, SystemTime::now(), &text, None);
    }

    /// A `SIGSEGV` stop of `tid`: a write to a read-only install (upgrade it),
    /// an access to a page whose walk failed (deliver the ABI's fault), or
    /// not ours.
    pub fn on_sigsegv(&self, tid: Pid, tgid: Pid) -> SegvAction {
        let Some(p) = lock(&self.procs).get(&tgid).cloned() else {
            return SegvAction::Deliver;
        };
        let Ok(info) = crate::sys::ptrace::fault_info(tid) else {
            return SegvAction::Deliver;
        };
        let page = page_down(info.addr);
        let Ok(mut mm) = self.enter(&p) else {
            return SegvAction::Deliver;
        };
        let Some(w) = window_at(&mm, page) else {
            return SegvAction::Deliver;
        };
        if let Some(poison) = mm.poisoned.remove(&page) {
            // Re-arm the page so the retried access walks again.
            let armed = self.rearm(&p, &[(page, PAGE)]);
            drop(mm);
            if let Err(errno) = armed {
                tracing::warn!(%errno, "re-arming a faulted page failed");
            }
            self.trace_segv(tid, info.addr, poison.si_code);
            return SegvAction::Handled(deliver_page_fault(tid, info.addr, poison));
        }
        // An installed page refused the access: a write (or a fetch). A page
        // not installed was being re-armed (PROT_NONE for a moment): the
        // access kind is unknown, so walk for a read; a write faults again.
        let rip = ptrace::getregs(tid).map(|r| r.rip).unwrap_or(0);
        let access = if rip == info.addr {
            Access::Execute
        } else if is_installed(&mm, page) {
            Access::Write
        } else {
            Access::Read
        };
        let walk = self.walk_window(&w, page, access);
        match walk {
            Ok(t) => {
                let prot = prot_of(&t);
                let flags = libc::MAP_SHARED as u64 | libc::MAP_FIXED as u64;
                let run = RamRun {
                    va: page,
                    len: PAGE,
                    prot,
                    flags,
                    pa: t.pa.0,
                };
                let done = self.install(&p, &mut mm, run);
                drop(mm);
                self.trace_fault(tid.as_raw(), info.addr, w.master, access, &Ok(t));
                if done.is_err() {
                    return SegvAction::Deliver;
                }
                self.stats.vpagetable_faults.fetch_add(1, Ordering::Relaxed);
                // The instruction restarts and now succeeds.
                let _ = ptrace::cont(tid, None);
                SegvAction::Handled(None)
            }
            Err(e) => {
                drop(mm);
                self.trace_fault(tid.as_raw(), info.addr, w.master, access, &Err(e));
                let (si_code, pgex) = poison_of(e.as_ref(), access);
                self.trace_segv(tid, info.addr, si_code);
                SegvAction::Handled(deliver_page_fault(tid, info.addr, Poison { si_code, pgex }))
            }
        }
    }

    /// A fault that reached an execution context's handler in vmspace stub
    /// `tgid` at `addr`, with the hardware's error bits `err`: resolve it
    /// here if a walk allows the access (a read-only page written, a page
    /// being re-armed), else say what the vkernel must see (`T_PAGEFLT`
    /// with these `PGEX` bits). `trace_tid` is the guest thread running
    /// the context (for the trace).
    pub fn on_stub_fault(&self, tgid: Pid, addr: u64, err: u64, trace_tid: Pid) -> StubFault {
        let Some(p) = lock(&self.procs).get(&tgid).cloned() else {
            return StubFault::Report(err);
        };
        let page = page_down(addr);
        let Ok(mut mm) = self.enter(&p) else {
            return StubFault::Report(err);
        };
        let Some(w) = window_at(&mm, page) else {
            return StubFault::Report(err);
        };
        if let Some(poison) = mm.poisoned.remove(&page) {
            // Failed walk: re-arm the page for the retry after the fix.
            let armed = self.rearm(&p, &[(page, PAGE)]);
            if let Err(errno) = armed {
                tracing::warn!(%errno, "re-arming a faulted page failed");
            }
            return StubFault::Report(poison.pgex);
        }
        let access = if err & PGEX_I != 0 {
            Access::Execute
        } else if err & PGEX_W != 0 {
            Access::Write
        } else {
            Access::Read
        };
        match self.walk_window(&w, page, access) {
            Ok(t) => {
                let run = RamRun {
                    va: page,
                    len: PAGE,
                    prot: prot_of(&t),
                    flags: libc::MAP_SHARED as u64 | libc::MAP_FIXED as u64,
                    pa: t.pa.0,
                };
                let done = self.install(&p, &mut mm, run);
                drop(mm);
                self.trace_fault(trace_tid.as_raw(), addr, w.master, access, &Ok(t));
                if done.is_err() {
                    return StubFault::Report(err);
                }
                self.stats.vpagetable_faults.fetch_add(1, Ordering::Relaxed);
                StubFault::Retry
            }
            Err(e) => {
                drop(mm);
                self.trace_fault(trace_tid.as_raw(), addr, w.master, access, &Err(e));
                StubFault::Report(poison_of(e.as_ref(), access).1)
            }
        }
    }

    /// `[s, e)` of process `tgid` was unmapped: forget the windows there
    /// (cutting those that straddle it) and what was installed in them.
    pub fn unmap(&self, tgid: Pid, s: u64, e: u64) {
        let Some(p) = lock(&self.procs).get(&tgid).cloned() else {
            return;
        };
        let Ok(mut mm) = self.enter(&p) else {
            return;
        };
        let cut: Vec<Window> = mm
            .windows
            .values()
            .filter(|w| w.start < e && s < w.end())
            .copied()
            .collect();
        for w in cut {
            mm.windows.remove(&w.start);
            if w.start < s {
                let mut left = w;
                left.len = s - w.start;
                mm.windows.insert(left.start, left);
            }
            if w.end() > e {
                let mut right = w;
                right.off = w.off + (e - w.start);
                right.start = e;
                right.len = w.end() - e;
                mm.windows.insert(right.start, right);
            }
        }
        forget_range(&mut mm, s, e);
        self.publish_windows(&p, &mm);
    }

    /// The RAM address a user access to `va` in a window of process `tgid`
    /// reaches (setting A, and M for a write, as the access would), or
    /// `None` if the walk fails or `va` is in no window.
    pub fn translate(&self, tgid: Pid, va: u64, write: bool) -> Option<u64> {
        let p = lock(&self.procs).get(&tgid).cloned()?;
        let w = {
            let mm = self.enter(&p).ok()?;
            window_at(&mm, page_down(va))?
        };
        let access = if write { Access::Write } else { Access::Read };
        let t = self.walk_window(&w, page_down(va), access).ok()?;
        Some(t.pa.0 + va % PAGE)
    }

    /// Whether process `tgid` has VPAGETABLE windows.
    pub fn has_windows(&self, tgid: Pid) -> bool {
        lock(&self.procs)
            .get(&tgid)
            .is_some_and(|p| !lock(&p.mm).windows.is_empty())
    }

    /// A fork of process `parent` created `child` (stopped at its first
    /// stop, not sharing the parent's mm): take the windows away from it, so
    /// that it gets a clean `SIGSEGV` there instead of memory no agent
    /// serves. Runs `munmap`s in the child through the agent code's
    /// `syscall; int3` gadget (the agent region is inherited), then resumes
    /// it. Returns the child's wait status if it died meanwhile.
    pub fn on_fork(&self, parent: Pid, child: Pid) -> Option<WaitStatus> {
        let (ranges, gadget) = {
            let procs = lock(&self.procs);
            let p = procs.get(&parent)?;
            let mm = lock(&p.mm);
            let ranges: Vec<(u64, u64)> = mm.windows.values().map(|w| (w.start, w.len)).collect();
            let gadget = p.agent.guest_base + AGENT_CODE + agent_code::syscall_gadget() as u64;
            (ranges, gadget)
        };
        // A child forked before the agent (and so before any window) was
        // made has neither: nothing to take away.
        let mut code = [0u8; 2];
        if crate::remote::read_bytes(child, crate::remote::RemoteAddr(gadget), &mut code).is_err()
            || code != [0x0f, 0x05]
        {
            return None;
        }
        match crate::inject::run_at_stop(
            child,
            gadget,
            &ranges
                .iter()
                .map(|&(s, l)| (libc::SYS_munmap, [s, l, 0, 0, 0, 0]))
                .collect::<Vec<_>>(),
        ) {
            Ok(()) => None,
            Err(InjectError::Gone { status, .. }) => Some(status),
            Err(e) => {
                tracing::warn!("removing windows from a forked child failed: {e}");
                None
            }
        }
    }

    /// Trace the `SIGSEGV` a failed walk delivers (when tracing).
    fn trace_segv(&self, tid: Pid, addr: u64, si_code: i32) {
        let mut trace = lock(&self.trace);
        if trace.set().is_empty() {
            return;
        }
        let info = crate::sys::ptrace::SignalInfo {
            signo: libc::SIGSEGV,
            code: si_code,
            addr: Some(addr),
            sender: None,
        };
        let text = crate::trace::format_signal(&info);
        trace.line(tid.as_raw(), SystemTime::now(), &text, None);
    }

    /// Process `tgid` exec'd or exited: its windows, agent and uffd are gone.
    pub fn forget(&self, tgid: Pid) {
        if let Some(p) = lock(&self.procs).remove(&tgid) {
            p.dead.store(true, Ordering::Release);
            let _ = futex::wake(p.agent.res_word(RES_SUP_WAKE));
            let mut mm = lock(&p.mm);
            self.count_resolved(&p, &mut mm);
            mm.installed.clear();
            self.sync_vma_gauge(&mut mm);
        }
    }
}

/// The host protection of an install for translation `t`.
fn prot_of(t: &vpte::Translation) -> u64 {
    PROT_READ as u64
        | if t.writable { PROT_WRITE as u64 } else { 0 }
        | if t.executable {
            libc::PROT_EXEC as u64
        } else {
            0
        }
}

/// Whether `page` lies in an installed run.
fn is_installed(mm: &MmState, page: u64) -> bool {
    mm.installed
        .range(..=page)
        .next_back()
        .is_some_and(|(&k, &(l, _))| page < k + l)
}

/// The window containing `page`, if any.
fn window_at(mm: &MmState, page: u64) -> Option<Window> {
    mm.windows
        .range(..=page)
        .next_back()
        .map(|(_, w)| *w)
        .filter(|w| page < w.end())
}

/// Remove windows (or their parts) in `[s, e)`: a `MAP_FIXED` mapping
/// replaced them.
fn forget_range(mm: &mut MmState, s: u64, e: u64) {
    let hit: Vec<Window> = mm
        .windows
        .values()
        .filter(|w| w.start < e && s < w.end())
        .copied()
        .collect();
    for w in hit {
        mm.windows.remove(&w.start);
        if w.start < s {
            mm.windows.insert(
                w.start,
                Window {
                    len: s - w.start,
                    ..w
                },
            );
        }
        if w.end() > e {
            let cut = e - w.start;
            mm.windows.insert(
                e,
                Window {
                    start: e,
                    len: w.end() - e,
                    off: w.off + cut,
                    master: w.master,
                },
            );
        }
    }
    mm.poisoned.retain(|&page, _| page < s || page >= e);
}

/// `si_code` and page-fault error bits for a failed walk (ABI section 6).
fn poison_of(e: Option<&WalkError>, access: Access) -> (i32, u64) {
    match e {
        Some(e) => {
            let code = if e.is_protection() {
                SEGV_ACCERR
            } else {
                SEGV_MAPERR
            };
            (code, e.pgex(access) | PGEX_U)
        }
        None => (SEGV_MAPERR, access.pgex() | PGEX_U),
    }
}

/// Deliver the ABI's `SIGSEGV` for a failed walk to `tid` (stopped with that
/// signal): the right `si_code`, and, if the guest handles `SIGSEGV`, the
/// `REG_TRAPNO`/`REG_ERR`/`REG_CR2` of its ucontext. Returns the thread's
/// wait status if it died instead.
fn deliver_page_fault(tid: Pid, addr: u64, poison: Poison) -> Option<WaitStatus> {
    let _ = crate::sys::ptrace::set_fault_code(tid, poison.si_code);
    if !catches_sigsegv(tid) {
        let _ = ptrace::cont(tid, Signal::SIGSEGV);
        return None;
    }
    // Deliver by single-stepping: the thread stops at the handler's first
    // instruction with the frame built; rdx is the ucontext.
    if ptrace::step(tid, Signal::SIGSEGV).is_err() {
        return None;
    }
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Some(s),
            Ok(_) => {
                let _ = ptrace::cont(tid, None);
                return None;
            }
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
    if let Ok(regs) = ptrace::getregs(tid) {
        let gregs = regs.rdx + UC_GREGS;
        let put = |reg: u64, v: u64| {
            let _ = remote::write_bytes(tid, RemoteAddr(gregs + 8 * reg), &v.to_ne_bytes());
        };
        put(REG_ERR, poison.pgex);
        put(REG_TRAPNO, T_PAGEFLT_X86);
        put(REG_CR2, addr);
    }
    let _ = ptrace::cont(tid, None);
    None
}

/// Whether the process of `tid` has a handler for `SIGSEGV` (`SigCgt`).
fn catches_sigsegv(tid: Pid) -> bool {
    catches(tid, libc::SIGSEGV)
}

/// Whether the process of `tid` has a handler for signal `sig` (`SigCgt`).
pub(crate) fn catches(tid: Pid, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// Whether `[start, end)` of `tgid` holds mappings other than the given
/// window pieces (for SETMAP's EINVAL), from `/proc/PID/maps`.
fn maps_other_memory(tgid: Pid, start: u64, end: u64, windows: &[(u64, u64)]) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{tgid}/maps")) else {
        return false;
    };
    maps.lines().any(|line| {
        let Some((range, _)) = line.split_once(' ') else {
            return false;
        };
        let Some((a, b)) = range.split_once('-') else {
            return false;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            return false;
        };
        let (a, b) = (a.max(start), b.min(end));
        a < b && !windows.iter().any(|&(s, e)| s <= a && b <= e)
    })
}

fn outcome_of_error(e: InjectError, new_threads: Vec<Pid>) -> StopOutcome {
    match e {
        InjectError::Gone { status, .. } => StopOutcome {
            new_threads,
            gone: Some(status),
        },
        InjectError::Ptrace { tid, errno } => {
            tracing::warn!(%tid, %errno, "hypercall injection failed");
            StopOutcome {
                new_threads,
                gone: None,
            }
        }
    }
}

fn inj_tgid(inj: &Injector) -> Pid {
    crate::supervisor::tgid_of(inj.tid()).unwrap_or(inj.tid())
}

fn write_region(region: &MmapRaw, offset: usize, bytes: &[u8]) {
    assert!(
        offset + bytes.len() <= region.len(),
        "agent region write in bounds"
    );
    // SAFETY: in bounds (checked above); the region is our own shared
    // mapping, written before the agent runs or only at offsets the agent
    // reads after the release store of `req`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.as_mut_ptr().add(offset), bytes.len());
    }
}

impl Agent {
    fn word(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offsets are constants inside the control page, 4-aligned;
        // the mapping lives as long as `self`.
        unsafe { &*self.region.as_mut_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn qword(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: as for `word`, 8-aligned offsets inside the control page.
        unsafe { &*self.region.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Run a batch of system calls in the guest's mm; returns their raw
    /// results. Callers serialise batches (they hold the process's `mm`).
    fn run(&self, tgid: Pid, ops: &[(i64, [u64; 6])]) -> Result<Vec<i64>, Errno> {
        assert!(
            ops.len() <= agent_code::MAX_OPS,
            "agent batch fits the control page"
        );
        for (i, (nr, args)) in ops.iter().enumerate() {
            let base = CTL_OPS + i * OP_SIZE;
            self.qword(base).store(*nr as u64, Ordering::Relaxed);
            for (k, a) in args.iter().enumerate() {
                self.qword(base + 8 + 8 * k).store(*a, Ordering::Relaxed);
            }
        }
        self.word(CTL_COUNT)
            .store(ops.len() as u32, Ordering::Relaxed);
        let req = self.word(CTL_REQ).load(Ordering::Relaxed).wrapping_add(1);
        self.word(CTL_REQ).store(req, Ordering::Release);
        futex::wake(self.word(CTL_REQ))?;
        let started = std::time::Instant::now();
        loop {
            let done = self.word(CTL_DONE).load(Ordering::Acquire);
            if done == req {
                break;
            }
            futex::wait(self.word(CTL_DONE), done, AGENT_POLL)?;
            if self.word(CTL_DONE).load(Ordering::Acquire) == req {
                break;
            }
            // A dead agent (its process killed) must not hang the supervisor.
            if !task_alive(tgid, self.tid) {
                return Err(Errno::ESRCH);
            }
            // Wake it again: a wake-up is cheap, a lost one would be fatal.
            futex::wake(self.word(CTL_REQ))?;
            if started.elapsed() > AGENT_TIMEOUT && !task_stopped(tgid, self.tid) {
                tracing::error!(%tgid, "the agent does not answer; killing the guest process");
                let _ = nix::sys::signal::kill(tgid, nix::sys::signal::Signal::SIGKILL);
                return Err(Errno::ETIMEDOUT);
            }
        }
        Ok((0..ops.len())
            .map(|i| self.qword(CTL_RET + 8 * i).load(Ordering::Relaxed) as i64)
            .collect())
    }

    fn res_word(&self, offset: usize) -> &AtomicU32 {
        self.word(AGENT_RESOLVER as usize + offset)
    }

    fn res_qword(&self, offset: usize) -> &AtomicU64 {
        self.qword(AGENT_RESOLVER as usize + offset)
    }

    /// Take the lock shared with the resolver (futex mutex in shared
    /// memory). A resolver that dies holding it must not hang vkrun: while
    /// waiting, the resolver's process is checked.
    fn lock_shared(&self, tgid: Pid) -> Result<(), Errno> {
        let word = self.res_word(RES_LOCK);
        if word
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Ok(());
        }
        let started = std::time::Instant::now();
        loop {
            if word.swap(2, Ordering::Acquire) == 0 {
                return Ok(());
            }
            futex::wait(word, 2, AGENT_POLL)?;
            if nix::sys::signal::kill(tgid, None).is_err() {
                return Err(Errno::ESRCH);
            }
            let resolver = Pid::from_raw(self.resolver_tid.load(Ordering::Relaxed));
            if started.elapsed() > AGENT_TIMEOUT && !task_stopped(tgid, resolver) {
                tracing::error!(%tgid, "the resolver holds its lock; killing the guest process");
                let _ = nix::sys::signal::kill(tgid, nix::sys::signal::Signal::SIGKILL);
                return Err(Errno::ETIMEDOUT);
            }
        }
    }

    /// Release the shared lock, waking a waiting resolver.
    fn unlock_shared(&self) {
        let word = self.res_word(RES_LOCK);
        if word.swap(0, Ordering::Release) == 2 {
            let _ = futex::wake(word);
        }
    }

    /// Fill register slot `i` (missing-page mode for `[va, va+len)`) and
    /// return its address in the guest.
    fn register_slot(&self, i: usize, va: u64, len: u64) -> u64 {
        let off = (AGENT_SCRATCH + SCRATCH_REGISTER) as usize + 32 * i;
        let mut bytes = [0u8; 32];
        bytes[0..8].copy_from_slice(&va.to_ne_bytes());
        bytes[8..16].copy_from_slice(&len.to_ne_bytes());
        bytes[16..24].copy_from_slice(&1u64.to_ne_bytes()); // MODE_MISSING
        write_region(&self.region, off, &bytes);
        self.guest_base + off as u64
    }

    /// Open the supervisor's RAM memfd for the agent, via `/proc`.
    fn open_ram(&self, ram_fd: i32, tgid: Pid) -> Result<(), Errno> {
        let path = format!("/proc/{}/fd/{ram_fd}\0", std::process::id());
        write_region(
            &self.region,
            (AGENT_SCRATCH + SCRATCH_PATH) as usize,
            path.as_bytes(),
        );
        let ptr = self.guest_base + AGENT_SCRATCH + SCRATCH_PATH;
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let r = self.run(tgid, &[(libc::SYS_open, [ptr, flags, 0, 0, 0, 0])])?;
        let fd = self.raise_fd(tgid, errno_or(r[0])?)?;
        self.ram_fd.store(fd as u32, Ordering::Relaxed);
        self.res_qword(RES_RAM_FD).store(fd, Ordering::Relaxed);
        Ok(())
    }

    /// Move an agent descriptor to a high number, out of the way of the
    /// guest's own (programs reuse low numbers); keep it where it is if that
    /// fails.
    fn raise_fd(&self, tgid: Pid, fd: i64) -> Result<u64, Errno> {
        let dupfd = libc::F_DUPFD_CLOEXEC as u64;
        let r = self.run(
            tgid,
            &[(libc::SYS_fcntl, [fd as u64, dupfd, AGENT_FD_FLOOR, 0, 0, 0])],
        )?;
        match errno_or(r[0]) {
            Ok(high) => {
                self.run(tgid, &[(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])])?;
                Ok(high as u64)
            }
            Err(_) => Ok(fd as u64),
        }
    }

    /// `mmap` a run of RAM at `va` in the guest (reopening the agent's RAM
    /// descriptor once if the guest closed it).
    fn mmap_ram(&self, tgid: Pid, ram_fd: i32, run: RamRun) -> Result<(), Errno> {
        let RamRun {
            va,
            len,
            prot,
            flags,
            pa,
        } = run;
        for attempt in 0..2 {
            let fd = u64::from(self.ram_fd.load(Ordering::Relaxed));
            let r = self.run(tgid, &[(libc::SYS_mmap, [va, len, prot, flags, fd, pa])])?;
            match errno_or(r[0]) {
                Ok(_) => return Ok(()),
                Err(Errno::EBADF | Errno::EACCES | Errno::ENODEV) if attempt == 0 => {
                    self.open_ram(ram_fd, tgid)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EBADF)
    }
}

/// Whether thread `tid` of `tgid` is stopped (job control, which
/// legitimately pauses an agent thread).
fn task_stopped(tgid: Pid, tid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with(['T', 't']))
        })
        .unwrap_or(false)
}

/// Whether thread `tid` of `tgid` still exists.
fn task_alive(tgid: Pid, tid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}
