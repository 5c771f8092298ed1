//! ADDRESS SPACES: MAP_VPAGETABLE windows in one host mm (ABI sections 3-6),
//! for a guest process (`vk_mmap`) or a vmspace's stub (`vmspace_mmap`):
//! windows created, master PDEs set by `mcontrol(MADV_SETMAP)`,
//! translations dropped by `MADV_INVAL`, and faults resolved by walking
//! the guest's VPTEs.
//!
//! Per address space that maps a window, vkrun sets up:
//! - an **agent** ([`agent`]): threads of vkrun's in the process that run
//!   `mmap`s in its mm on request, so installs never stop a guest thread,
//!   and (guest processes) the **resolvers**, the fast path of faults, one
//!   kept on each CPU the process may use;
//! - a **userfaultfd** created in the process without `UFFD_USER_MODE_ONLY`
//!   (so kernel-mode accesses are caught too) and owned by the supervisor;
//! - a **fault thread** in the supervisor ([`resolve`]) that walks and
//!   installs a true alias (`mmap(MAP_SHARED|MAP_FIXED, ram, pa)`) or, when
//!   the walk fails, a `PROT_NONE` page that turns the retried access into a
//!   real `SIGSEGV` (user mode) or `EFAULT` (kernel mode).
//!
//! Every fault, whoever sees it (the fault thread, the tracer at a
//! `SIGSEGV`, RUN's retry, an execution context's report), is resolved by
//! the one path of [`resolve`].
//!
//! A guest's window is anonymous `MAP_NORESERVE` memory registered for
//! missing-page faults; dropping translations maps fresh anonymous memory
//! over a range and registers it again (cost per VMA, not per page). A
//! vmspace's window is anonymous `PROT_NONE` memory, registered with
//! nothing: its user code makes no system calls (no kernel-mode access to
//! catch), so a first touch raises `SIGSEGV` in the execution context,
//! which reports it as it reports a system call, and RUN's waiter walks
//! ([`Vpt::on_stub_fault`]): the vkernel gets a failed walk's `T_PAGEFLT`
//! in one hand-off. Host VMAs are budgeted
//! ([`windows`]): the least recently installed runs are evicted before the
//! process nears `vm.max_map_count`, and an install that fails with
//! `ENOMEM` evicts more and retries ([`install`]).
//!
//! Lock order: [`Vpt::procs`] (never held across a call) before a process's
//! `mm`, before the lock shared with its resolver (taken by [`Vpt::enter`]).
//! The mm lock serialises every change to the process's window mappings
//! (agent batches, injected drops), and a fault walks and installs under
//! it: so once `MADV_INVAL` has dropped a range, no walk made before it can
//! install. The trace's lock is taken last, alone.
//!
//! Threads: `vk_mmap`, `vmspace_mmap`, fork stripping and `SIGSEGV`
//! delivery start on the tracer thread (they take a [`Tracer`]); what of
//! them waits on a guest process's agent (a window once the agent is set
//! up, a `SIGSEGV`'s walk and install) runs on the process's stop worker
//! ([`deferred`]) and the tracer finishes it. The tracer never takes a
//! process's `mm` lock and waits (it reads [`Process::ranges`]). `mcontrol`
//! runs on a hypercall thread; faults on each process's fault thread.

mod agent;
mod deferred;
mod install;
mod resolve;
mod segv;
mod windows;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use nix::errno::Errno;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use vkabi::{
    MADV_INVAL, MADV_SETMAP, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, MAP_STACK, MAP_VPAGETABLE,
    PAGE_SIZE, PROT_READ, PROT_WRITE, USER_MAX,
};

use crate::error::{CallError, TraceeError, errno_or};
use crate::ram::GuestRam;
use crate::stats::Stats;
use crate::sys::agent_code::RES_SUP_WAKE;
use crate::sys::uffd::Userfault;
use crate::sys::{futex, kcmp, lock, proc};
use crate::trace::TraceWriter;
use crate::tracee::Tracer;
use crate::tracee::inject::{self, Injector};
use crate::tracee::remote::{self, RemoteAddr};

use agent::Agent;
pub use deferred::{Finish, StopDone};
pub use resolve::{SegvAction, StubFault};
use windows::{MmState, Window};

const PAGE: u64 = PAGE_SIZE;
/// Flags of vkrun's own fresh memory in a window (registered, missing).
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE) as u64;

/// What the execution side does for the address spaces of vmspaces: the
/// seam between address spaces (here) and execution contexts (`vmspace`).
/// (A fault in a vmspace's window reaches the execution side by itself: the
/// page is `PROT_NONE` until installed, so the context takes the `SIGSEGV`
/// and reports it; RUN's waiter asks [`Vpt::on_stub_fault`].)
pub trait ContextFaults: Send + Sync {
    /// The guest thread whose context runs in stub thread `ctid` (trace
    /// lines name it, as RUN's lines do).
    fn guest_of(&self, ctid: Pid) -> Option<Pid>;
}

/// The state of MAP_VPAGETABLE for every address space using it.
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
    /// Whether the user was told that the VMA budget forces evictions.
    told_evicting: AtomicBool,
    /// The execution side, for faults in vmspaces.
    contexts: OnceLock<Weak<dyn ContextFaults>>,
    /// Stop work that waits on an agent, done off the tracer.
    deferred: Arc<deferred::Deferred>,
}

impl std::fmt::Debug for dyn ContextFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextFaults")
    }
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

/// An address space with windows: its agent, its uffd and its fault thread.
#[derive(Debug)]
struct Process {
    tgid: Pid,
    space: Space,
    agent: Agent,
    uffd: Userfault,
    mm: Mutex<MmState>,
    /// The windows' ranges as last published, for the tracer, which must
    /// not wait for `mm` (held across agent batches and the lock shared
    /// with the resolver, both of which the guest can stall).
    ranges: Mutex<Vec<(u64, u64)>>,
    /// The process is gone or exec'd: the fault thread stops.
    dead: AtomicBool,
    /// The resolver thread exited (the guest closed its uffd descriptor):
    /// the fault thread reads the uffd itself.
    resolver_gone: AtomicBool,
}

/// A process's mm state with its locks held: [`Process::mm`] and, in a
/// guest process, the lock shared with the in-guest resolver (released
/// first, on drop).
struct Locked<'a> {
    mm: MutexGuard<'a, MmState>,
    agent: Option<&'a Agent>,
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
        if let Some(agent) = self.agent {
            agent.unlock_shared();
        }
    }
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

/// The argument rules of ABI section 4 for a window: its page-rounded
/// length and whether it is `MAP_FIXED`, or EINVAL.
fn window_args(addr: u64, len: u64, prot: i32, flags: i32, off: u64) -> Result<(u64, bool), Errno> {
    let fixed = flags & MAP_FIXED != 0;
    let len = page_len(len).ok_or(Errno::EINVAL)?;
    if flags & 3 != MAP_SHARED
        || flags & MAP_PRIVATE != 0
        || flags & MAP_STACK != 0
        || prot & (PROT_READ | PROT_WRITE) != PROT_READ | PROT_WRITE
        || !off.is_multiple_of(PAGE)
        || len > USER_MAX
        || (fixed && (!addr.is_multiple_of(PAGE) || addr > USER_MAX - len))
    {
        return Err(Errno::EINVAL);
    }
    Ok((len, fixed))
}

/// `len` rounded up to whole pages; `None` if zero or overflowing.
fn page_len(len: u64) -> Option<u64> {
    (len > 0).then(|| len.checked_add(PAGE - 1).map(page_down))?
}

impl Vpt {
    /// No process uses MAP_VPAGETABLE yet.
    pub fn new(
        ram: Arc<GuestRam>,
        stats: Arc<Stats>,
        trace: Arc<Mutex<TraceWriter>>,
    ) -> Result<Self, Errno> {
        Ok(Self {
            ram,
            stats,
            trace,
            procs: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashSet::new()),
            resolvers: Mutex::new(HashMap::new()),
            tgids: Mutex::new(HashMap::new()),
            max_runs: windows::max_runs(proc::max_map_count().unwrap_or(65530)),
            told_evicting: AtomicBool::new(false),
            contexts: OnceLock::new(),
            deferred: Arc::new(deferred::Deferred::new()?),
        })
    }

    /// Readable when stops handed off the tracer are ready to finish.
    pub fn finishes_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.deferred.fd()
    }

    /// The tracer's part of every stop whose work is done, each with its
    /// thread (threads that exited meanwhile are left out).
    pub fn take_finishes(&self) -> Vec<(Pid, Finish)> {
        self.deferred.take()
    }

    /// Let `contexts` name the guest threads of vmspace faults in the trace.
    pub fn set_context_faults(&self, contexts: Weak<dyn ContextFaults>) {
        let _ = self.contexts.set(contexts);
    }

    fn context_faults(&self) -> Option<Arc<dyn ContextFaults>> {
        self.contexts.get()?.upgrade()
    }

    fn process_of(&self, tgid: Pid) -> Option<Arc<Process>> {
        lock(&self.procs).get(&tgid).cloned()
    }

    /// Whether `tid` is one of vkrun's own threads in a guest process.
    pub fn is_agent(&self, tid: Pid) -> bool {
        lock(&self.agents).contains(&tid) || lock(&self.resolvers).contains_key(&tid)
    }

    /// Whether `tid` is one of vkrun's agent threads; forgets it if so
    /// (call when it exits).
    pub fn take_agent(&self, tid: Pid) -> bool {
        let mut resolvers = lock(&self.resolvers);
        let gone = resolvers.remove(&tid);
        // The process's last resolver: another one may still be blocked
        // reading the uffd (the file lives on in its read), and it takes
        // the next fault and forwards what it cannot install through the
        // ring, which the fault thread must go on reading until then.
        let last = gone.filter(|tgid| !resolvers.values().any(|t| t == tgid));
        drop(resolvers);
        if let Some(tgid) = last {
            // A resolver ends early only when its uffd descriptor is gone;
            // faults must still be served: by the fault thread itself.
            if let Some(p) = self.process_of(tgid) {
                tracing::debug!(%tgid, "resolver gone; the supervisor reads the uffd");
                p.resolver_gone.store(true, Ordering::Release);
                let _ = futex::wake(p.agent.res_word(RES_SUP_WAKE));
            }
        }
        lock(&self.agents).remove(&tid)
    }

    /// `vk_mmap(addr, len, prot, flags, fd, off)` (ABI section 4) in
    /// process `tgid`, through `inj`, its thread stopped at the hypercall.
    pub fn vk_mmap(
        self: &Arc<Self>,
        inj: &mut Injector,
        tgid: Pid,
        a: [u64; 6],
    ) -> Result<i64, CallError> {
        let (addr, len, prot, flags, fd, off) =
            (a[0], a[1], a[2] as i32, a[3] as i32, a[4] as i32, a[5]);
        if flags & MAP_VPAGETABLE == 0 {
            // An ordinary mmap, made in the caller's address space.
            return Ok(errno_or(inj.syscall(libc::SYS_mmap, a)?)?);
        }
        let is_ram = kcmp::same_file(self.ram_fd(), inj.tid(), fd) == Ok(true);
        if fd < 0 || !is_ram {
            return Err(Errno::EINVAL.into());
        }
        let start = self.map_window(inj, tgid, addr, len, prot, flags, off, Space::Guest)?;
        Ok(start as i64)
    }

    /// vkrun's descriptor of guest RAM (to tell a guest's descriptor of it).
    pub fn ram_descriptor(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ram_fd()
    }

    pub(super) fn ram_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.ram)
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
    ) -> Result<u64, CallError> {
        let (len, fixed) = window_args(addr, len, prot, flags, off)?;
        let fresh = self.process_of(tgid).is_none();
        let proc_ = self.process(inj, tgid, space)?;
        let call = &mut |nr, a| Ok(inj.syscall(nr, a)?);
        self.map_window_with(&proc_, call, addr, len, fixed, off, fresh)
    }

    /// [`Vpt::vk_mmap`] of a window in guest process `tgid` whose agent is
    /// set up, made by the agent (the caller's thread stays stopped and
    /// runs nothing): what a stop worker does, off the tracer. `None` if
    /// the process has no agent yet (the tracer must set it up through the
    /// stopped thread) or the call makes no window.
    pub fn vk_mmap_by_agent(&self, tgid: Pid, a: [u64; 6]) -> Option<Result<i64, Errno>> {
        let (addr, len, prot, flags, off) = (a[0], a[1], a[2] as i32, a[3] as i32, a[5]);
        if flags & MAP_VPAGETABLE == 0 {
            return None;
        }
        let p = self.process_of(tgid).filter(|p| p.space == Space::Guest)?;
        let result = window_args(addr, len, prot, flags, off).and_then(|(len, fixed)| {
            let agent_call = &mut |nr: i64, args: [u64; 6]| -> Result<i64, CallError> {
                Ok(p.agent.run(tgid, &[(nr, args)])?[0])
            };
            self.map_window_with(&p, agent_call, addr, len, fixed, off, false)
                .map(|start| start as i64)
                .map_err(|e| match e {
                    CallError::Guest(errno) => errno,
                    CallError::Tracee(_) => Errno::ESRCH,
                })
        });
        Some(result)
    }

    /// Whether guest process `tgid`'s agent is set up (so a `vk_mmap` of it
    /// can be made by [`Vpt::vk_mmap_by_agent`]).
    pub fn has_agent(&self, tgid: Pid) -> bool {
        self.process_of(tgid)
            .is_some_and(|p| p.space == Space::Guest)
    }

    /// Hand `work` for thread `tid` of process `tgid`, stopped, to the
    /// process's stop worker; its finish comes back through
    /// [`Vpt::take_finishes`].
    pub fn defer(&self, tgid: Pid, tid: Pid, work: deferred::Work) {
        self.deferred.submit(tgid, tid, work);
    }

    /// The window itself, in process `p`, with `call` making the system
    /// calls in its mm (an injection into a stopped thread, or the agent).
    /// `fresh`: `p` was set up for this window, so its resolver has none
    /// yet and takes no lock: only `mm` is taken (a guest that wrote the
    /// shared lock's word cannot stall the set-up on the tracer).
    #[allow(clippy::too_many_arguments)]
    fn map_window_with(
        &self,
        proc_: &Process,
        call: &mut dyn FnMut(i64, [u64; 6]) -> Result<i64, CallError>,
        addr: u64,
        len: u64,
        fixed: bool,
        off: u64,
        fresh: bool,
    ) -> Result<u64, CallError> {
        let mut mm = if fresh {
            self.enter_fresh(proc_)
        } else {
            self.enter(proc_)?
        };
        let map_flags = ANON | if fixed { libc::MAP_FIXED as u64 } else { 0 };
        let hint = if fixed { addr } else { 0 };
        // PROT_NONE until registered: another guest thread touching the
        // range meanwhile (it may still hold the memory a MAP_FIXED window
        // replaces) must not fault in a zero page that the registration would
        // then never see (MISSING fires only for missing pages). A touch now
        // is a SIGSEGV the tracer handles once the window exists.
        let none = libc::PROT_NONE as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let ret = call(libc::SYS_mmap, [hint, len, none, map_flags, u64::MAX, 0])?;
        let start = errno_or(ret)? as u64;
        if start.checked_add(len).is_none_or(|end| end > USER_MAX) {
            call(libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
            return Err(Errno::ENOMEM.into());
        }
        // A vmspace's window stays PROT_NONE: a first touch raises SIGSEGV
        // in the execution context itself, which reports it (the one
        // hand-off a system call's exit takes); see `Vpt::on_stub_fault`.
        if proc_.space == Space::Guest {
            if let Err(e) = proc_.uffd.register_missing(start, len) {
                call(libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
                return Err(e.into());
            }
            if let Err(e) = errno_or(call(libc::SYS_mprotect, [start, len, rw, 0, 0, 0])?) {
                call(libc::SYS_munmap, [start, len, 0, 0, 0, 0])?;
                return Err(e.into());
            }
        }
        mm.forget_range(start, start + len);
        let w = Window {
            start,
            len,
            off,
            master: 0,
        };
        mm.windows.insert(start, w);
        self.publish_windows(proc_, &mm);
        self.stats.vpagetable_mmap.fetch_add(1, Ordering::Relaxed);
        Ok(start)
    }

    /// `mcontrol(addr, len, behav, value)` (ABI section 5) for thread `tid`,
    /// served from the hypercall thread: drops go through the agent.
    pub fn mcontrol(&self, tid: Pid, a: [u64; 6]) -> Result<i64, Errno> {
        let tgid = self.tgid(tid);
        self.mcontrol_in(tgid, a, |s, e, covered| {
            // Whether [s, e) maps memory that is not a window.
            proc::mapped_ranges(tgid).into_iter().any(|(a, b)| {
                let (a, b) = (a.max(s), b.min(e));
                a < b && !covered.iter().any(|&(ws, we)| ws <= a && b <= we)
            })
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
        let mut covered = Vec::new();
        if let Some(p) = self.process_of(tgid) {
            let mut mm = self.enter(&p)?;
            let pieces = mm.pieces(start, end);
            if behav == MADV_SETMAP {
                for w in mm.windows.values_mut() {
                    if w.start < end && start < w.end() {
                        w.master = value;
                    }
                }
            }
            self.publish_windows(&p, &mm);
            for &(s, e) in &pieces {
                self.drop_translations(&p, &mut mm, s, e)?;
                covered.push((s, e));
            }
        }
        if behav == MADV_SETMAP && other(start, end, &covered) {
            return Err(Errno::EINVAL);
        }
        Ok(0)
    }

    /// The thread-group id of guest thread `tid` (cached; see
    /// [`Vpt::forget_thread`]).
    fn tgid(&self, tid: Pid) -> Pid {
        if let Some(t) = lock(&self.tgids).get(&tid) {
            return *t;
        }
        let tgid = proc::tgid_of(tid).unwrap_or(tid);
        lock(&self.tgids).insert(tid, tgid);
        tgid
    }

    /// Thread `tid` exited: its id may be reused.
    pub fn forget_thread(&self, tid: Pid) {
        lock(&self.tgids).remove(&tid);
        self.deferred.forget_thread(tid);
    }

    /// The process state of `tgid`, setting up its agent and uffd (through
    /// `inj`, a stopped thread of it) and its fault thread on first use.
    fn process(
        self: &Arc<Self>,
        inj: &mut Injector,
        tgid: Pid,
        space: Space,
    ) -> Result<Arc<Process>, CallError> {
        if let Some(p) = self.process_of(tgid) {
            return Ok(p);
        }
        let (agent, uffd) = self.set_up_agent(inj, tgid, space)?;
        let p = Arc::new(Process {
            tgid,
            space,
            agent,
            uffd,
            mm: Mutex::new(MmState::default()),
            ranges: Mutex::new(Vec::new()),
            dead: AtomicBool::new(false),
            resolver_gone: AtomicBool::new(space == Space::Vmspace),
        });
        lock(&self.procs).insert(tgid, Arc::clone(&p));
        self.start_fault_thread(&p)?;
        Ok(p)
    }

    /// `[s, e)` of process `tgid` was unmapped: forget the windows there
    /// (cutting those that straddle it) and what was installed in them.
    pub fn unmap(&self, tgid: Pid, s: u64, e: u64) {
        let Some(p) = self.process_of(tgid) else {
            return;
        };
        let Ok(mut mm) = self.enter(&p) else {
            return;
        };
        mm.forget_range(s, e);
        self.publish_windows(&p, &mm);
    }

    /// The RAM address a user access to `va` in a window of process `tgid`
    /// reaches (setting A, and M for a write, as the access would), or
    /// `None` if the walk fails or `va` is in no window.
    pub fn translate(&self, tgid: Pid, va: u64, write: bool) -> Option<u64> {
        let p = self.process_of(tgid)?;
        let w = self.enter(&p).ok()?.window_at(page_down(va))?;
        let access = if write {
            vpte::Access::Write
        } else {
            vpte::Access::Read
        };
        let t = self.walk_window(&w, page_down(va), access).ok()?;
        Some(t.pa.0 + va % PAGE)
    }

    /// Whether process `tgid` has VPAGETABLE windows.
    pub fn has_windows(&self, tgid: Pid) -> bool {
        self.process_of(tgid)
            .is_some_and(|p| !lock(&p.ranges).is_empty())
    }

    /// A fork of process `parent` created `child` (stopped at its first
    /// stop, not sharing the parent's mm): take the windows away from it, so
    /// that it gets a clean `SIGSEGV` there instead of memory no agent
    /// serves. Runs `munmap`s in the child through the agent code's
    /// `syscall; int3` gadget (the agent region is inherited), then resumes
    /// it. Returns the child's wait status if it died meanwhile.
    pub fn on_fork(&self, tracer: &Tracer, parent: Pid, child: Pid) -> Option<WaitStatus> {
        let (ranges, gadget) = {
            let p = self.process_of(parent)?;
            let ranges = lock(&p.ranges).clone();
            (ranges, p.agent.syscall_gadget())
        };
        // A child forked before the agent (and so before any window) was
        // made has neither: nothing to take away.
        let mut code = [0u8; 2];
        if remote::read_bytes(child, RemoteAddr(gadget), &mut code).is_err() || code != [0x0f, 0x05]
        {
            return None;
        }
        let calls: Vec<_> = ranges
            .iter()
            .map(|&(s, l)| (libc::SYS_munmap, [s, l, 0, 0, 0, 0]))
            .collect();
        match inject::run_at_stop(tracer, child, gadget, &calls) {
            Ok(()) => None,
            Err(TraceeError::Gone(gone)) => Some(gone.status),
            Err(e) => {
                tracing::warn!("removing windows from a forked child failed: {e}");
                None
            }
        }
    }

    /// Process `tgid` exec'd or exited: its windows, agent and uffd are gone.
    pub fn forget(self: &Arc<Self>, tgid: Pid) {
        if let Some(p) = lock(&self.procs).remove(&tgid) {
            p.dead.store(true, Ordering::Release);
            let _ = futex::wake(p.agent.res_word(RES_SUP_WAKE));
            // On the tracer: the books are settled here unless a thread
            // holds them (waiting on this process's agent), and then by
            // the process's stop worker, behind whatever it is doing.
            let settled = match p.mm.try_lock() {
                Ok(mut mm) => {
                    self.settle(&p, &mut mm);
                    true
                }
                Err(_) => false,
            };
            if !settled {
                let me = Arc::clone(self);
                self.deferred
                    .detached(tgid, Box::new(move || me.settle(&p, &mut lock(&p.mm))));
            }
        }
        self.deferred.forget_process(tgid);
    }

    /// The books of a process that is gone: what its resolver resolved
    /// is counted, its installs and VMAs are no longer held.
    fn settle(&self, p: &Process, mm: &mut MmState) {
        self.count_resolved(p, mm);
        mm.clear_installed();
        self.sync_vma_gauge(mm);
    }
}
