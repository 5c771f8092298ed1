//! Resolving faults in windows: the ONE path that resolves a page
//! ([`Vpt::resolve_page`]: look up the window, walk, install or poison,
//! count, trace), its four entry points, and the fault thread.
//!
//! The entry points differ only in what they know and what they do with
//! the answer:
//! - [`Vpt::on_missing`]: a missing-page fault read from the uffd (fault
//!   thread); the faulting thread waits in the uffd until woken;
//! - [`Vpt::prefault`]: RUN's retry after `T_PAGEFLT` (hypercall thread);
//! - [`Vpt::on_sigsegv`]: a `SIGSEGV` stop of a guest thread (tracer);
//! - [`Vpt::on_stub_fault`]: a fault an execution context's handler
//!   reported (hypercall thread): every fault in a vmspace's windows, whose
//!   pages are `PROT_NONE` until installed.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use vkabi::{PGEX_I, PGEX_W};
use vpte::{Access, GuestVirtAddr, PageIndex, Translation, Vpte, WalkError};

use super::agent::RamRun;
use super::deferred::StopDone;
use super::windows::{MmState, PREFAULT_MAX, Poison, Window};
use super::{PAGE, Process, Space, Vpt, page_down, segv};
use crate::sys::agent_code::{
    RES_FWD_HEAD, RES_FWD_RING, RES_FWD_SLOTS, RES_FWD_TAIL, RES_SUP_WAKE,
};
use crate::sys::uffd::{PageFault, UFFD_EVENT_PAGEFAULT};
use crate::sys::{fatal, futex, kcmp};
use crate::trace::format::format_fault;
use crate::tracee::Tracer;

/// What the tracer should do with a `SIGSEGV` stop.
#[derive(Debug)]
pub enum SegvAction {
    /// Not ours: deliver it unchanged.
    Deliver,
    /// Ours: the thread stays stopped; a finish from
    /// [`Vpt::take_finishes`](super::Vpt::take_finishes) ends the stop.
    Deferred,
}

/// What a fault in a vmspace's context comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StubFault {
    /// Resolved: run the instruction again.
    Retry,
    /// The vkernel's: `T_PAGEFLT` with these error bits.
    Report(u64),
}

/// Who asks for a page, which decides what happens around the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The page is missing (uffd): install it with the neighbours a
    /// prefault run allows; poison it if the walk fails (or, in a vmspace,
    /// let the execution context report it).
    Missing,
    /// A retry is about to touch the page: install it ahead if the walk
    /// now succeeds; leave installed or poisoned pages and failed walks be.
    Ahead,
    /// A host mapping refused the access (`SIGSEGV`): a poisoned page is
    /// re-armed and its fault reported; else the page alone is installed
    /// if the walk allows the access.
    Refused,
}

/// How the access is known.
#[derive(Debug, Clone, Copy)]
enum AccessOf {
    Known(Access),
    /// A `SIGSEGV` that is not a fetch: an installed page refused a write;
    /// a page not installed was being re-armed (`PROT_NONE` for a moment),
    /// so the kind is unknown: walk for a read (a write faults again).
    Segv,
}

/// What [`Vpt::resolve_page`] did.
#[derive(Debug)]
enum Resolved {
    /// Not a window page (or the process is going away).
    NoWindow,
    /// Nothing to do (`Mode::Ahead` only).
    Skipped,
    /// Installed `[va, va + len)`.
    Installed(u64, u64),
    /// The page was poisoned by an earlier failed walk: it is re-armed,
    /// and that walk's fault is to be delivered.
    Poisoned(Poison),
    /// The walk failed: this fault is to be delivered (`Mode::Missing`:
    /// the page is poisoned for the retry).
    Failed(Poison),
    /// Installing (or poisoning) failed.
    Error(Errno),
}

/// One fault to resolve.
#[derive(Debug, Clone, Copy)]
struct Fault {
    addr: u64,
    access: AccessOf,
    mode: Mode,
    /// The faulting thread (trace lines name it, or its guest thread).
    tid: Pid,
}

impl Vpt {
    /// THE path that resolves a fault at `f.addr` in process `p`.
    fn resolve_page(&self, p: &Process, f: Fault) -> Resolved {
        crate::sys::fatal::test_panic_point("faults");
        let page = page_down(f.addr);
        let Ok(mut mm) = self.enter(p) else {
            return Resolved::NoWindow;
        };
        let Some(w) = mm.window_at(page) else {
            return Resolved::NoWindow;
        };
        match f.mode {
            Mode::Ahead if mm.is_installed(page) || mm.poisoned.contains_key(&page) => {
                return Resolved::Skipped;
            }
            Mode::Refused => {
                if let Some(poison) = mm.poisoned.remove(&page) {
                    // Re-arm the page so the retried access walks again.
                    if let Err(errno) = self.rearm(p, &[(page, PAGE)]) {
                        tracing::warn!(%errno, "re-arming a faulted page failed");
                    }
                    return Resolved::Poisoned(poison);
                }
            }
            _ => {}
        }
        let access = match f.access {
            AccessOf::Known(a) => a,
            AccessOf::Segv if mm.is_installed(page) => Access::Write,
            AccessOf::Segv => Access::Read,
        };
        let walk = self.walk_window(&w, page, access);
        let resolved = match &walk {
            Ok(t) => {
                // A host mapping that refused the access is replaced alone
                // (its new protection); a page not installed yet (a
                // vmspace's first touch) comes with its neighbours.
                let run = if f.mode == Mode::Refused && mm.is_installed(page) {
                    RamRun {
                        va: page,
                        len: PAGE,
                        prot: prot_of(t),
                        flags: (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                        pa: t.pa.0,
                    }
                } else {
                    self.prefault_run(&mm, &w, page, t, access == Access::Write)
                };
                match self.install(p, &mut mm, run) {
                    Ok(()) => Resolved::Installed(run.va, run.len),
                    Err(e) => Resolved::Error(e),
                }
            }
            Err(e) => {
                let (si_code, pgex) = segv::poison_of(e.as_ref(), access);
                let poison = Poison { si_code, pgex };
                match f.mode {
                    Mode::Missing => {
                        mm.poisoned.insert(page, poison);
                        match self.poison(p, page) {
                            Ok(()) => Resolved::Failed(poison),
                            Err(e) => Resolved::Error(e),
                        }
                    }
                    _ => Resolved::Failed(poison),
                }
            }
        };
        drop(mm);
        let installed = matches!(resolved, Resolved::Installed(..));
        if installed {
            self.stats.vpagetable_faults.fetch_add(1, Ordering::Relaxed);
        }
        // A retry ahead of time that installs nothing is no fault at all.
        if f.mode != Mode::Ahead || installed {
            self.trace_fault(p, f.tid, f.addr, w.master, access, &walk);
        }
        resolved
    }

    /// A missing-page fault read from `p`'s uffd: resolve it, then wake the
    /// faulting thread.
    fn on_missing(&self, p: &Process, f: &PageFault) {
        let page = page_down(f.address);
        let access = if f.write { Access::Write } else { Access::Read };
        let fault = Fault {
            addr: f.address,
            access: AccessOf::Known(access),
            mode: Mode::Missing,
            tid: Pid::from_raw(f.tid),
        };
        let wake = match self.resolve_page(p, fault) {
            Resolved::Installed(va, len) => (va, len),
            Resolved::Error(Errno::ESRCH) => {
                // The process is going away (its agent died with it).
                tracing::debug!(page = format_args!("{page:#x}"), "fault of a dying process");
                (page, PAGE)
            }
            Resolved::Error(errno) => {
                tracing::warn!(%errno, page = format_args!("{page:#x}"), "installing a fault's page failed");
                (page, PAGE)
            }
            _ => (page, PAGE),
        };
        let _ = p.uffd.wake(wake.0, wake.1);
    }

    /// A vmspace's user code is about to retry the access at `addr` that
    /// ended its last RUN with `T_PAGEFLT`: if the walk now succeeds (the
    /// vkernel filled the VPTE), install the page before it runs rather than
    /// let it fault a second time. The walk sets A (and M) as the retried
    /// access is about to; one that still fails installs nothing, and the
    /// access then faults and takes the usual path.
    /// `trace_tid` is the guest thread the trace line names.
    pub fn prefault(&self, tgid: Pid, addr: u64, write: bool, trace_tid: Pid) {
        let Some(p) = self.process_of(tgid) else {
            return;
        };
        let access = if write { Access::Write } else { Access::Read };
        let fault = Fault {
            addr,
            access: AccessOf::Known(access),
            mode: Mode::Ahead,
            tid: trace_tid,
        };
        self.resolve_page(&p, fault);
    }

    /// A `SIGSEGV` stop of `tid`: a write to a read-only install (upgrade it),
    /// an access to a page whose walk failed (deliver the ABI's fault), or
    /// not ours. On the tracer: it reads the fault (kernel calls only) and
    /// hands the walk and install, which may wait on the process's agent,
    /// to the process's stop worker; the thread stays stopped until the
    /// tracer runs the finish ([`deferred`](super::deferred)).
    pub fn on_sigsegv(self: &Arc<Self>, tid: Pid, tgid: Pid) -> SegvAction {
        let Some(p) = self.process_of(tgid) else {
            return SegvAction::Deliver;
        };
        let Ok(info) = crate::sys::ptrace::fault_info(tid) else {
            return SegvAction::Deliver;
        };
        let rip = ptrace::getregs(tid).map(|r| r.rip).unwrap_or(0);
        let fault = Fault {
            addr: info.addr,
            access: if rip == info.addr {
                AccessOf::Known(Access::Execute)
            } else {
                AccessOf::Segv
            },
            mode: Mode::Refused,
            tid,
        };
        let me = Arc::clone(self);
        self.deferred.submit(
            tgid,
            tid,
            Box::new(move || {
                let resolved = me.resolve_page(&p, fault);
                Box::new(move |tracer: &Tracer| me.finish_sigsegv(tracer, tid, info.addr, resolved))
            }),
        );
        SegvAction::Deferred
    }

    /// The tracer's end of a `SIGSEGV` stop, once the walk is done.
    fn finish_sigsegv(&self, tracer: &Tracer, tid: Pid, addr: u64, resolved: Resolved) -> StopDone {
        match resolved {
            Resolved::Installed(..) => {
                // The instruction restarts and now succeeds.
                let _ = ptrace::cont(tid, None);
                StopDone::Resumed
            }
            Resolved::Poisoned(poison) | Resolved::Failed(poison) => {
                self.trace_segv(tid, addr, poison.si_code);
                match segv::deliver_page_fault(tracer, tid, addr, poison) {
                    Some(status) => StopDone::Gone(status),
                    None => StopDone::Resumed,
                }
            }
            _ => StopDone::Deliver(Signal::SIGSEGV),
        }
    }

    /// A fault that reached an execution context's handler in vmspace stub
    /// `tgid` at `addr`, with the hardware's error bits `err`: resolve it
    /// here if a walk allows the access (a read-only page written, a page
    /// being re-armed), else say what the vkernel must see (`T_PAGEFLT`
    /// with these `PGEX` bits). `trace_tid` is the guest thread running
    /// the context (for the trace).
    pub fn on_stub_fault(&self, tgid: Pid, addr: u64, err: u64, trace_tid: Pid) -> StubFault {
        let Some(p) = self.process_of(tgid) else {
            return StubFault::Report(err);
        };
        let access = if err & PGEX_I != 0 {
            Access::Execute
        } else if err & PGEX_W != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let fault = Fault {
            addr,
            access: AccessOf::Known(access),
            mode: Mode::Refused,
            tid: trace_tid,
        };
        match self.resolve_page(&p, fault) {
            Resolved::Installed(..) => StubFault::Retry,
            Resolved::Poisoned(poison) | Resolved::Failed(poison) => StubFault::Report(poison.pgex),
            _ => StubFault::Report(err),
        }
    }

    /// The run to install for translation `t` of `page` in window `w` (a
    /// walk just made): the page with the uninstalled neighbours whose VPTEs
    /// already carry A (and M) in the same mapping.
    fn prefault_run(
        &self,
        mm: &MmState,
        w: &Window,
        page: u64,
        t: &Translation,
        write: bool,
    ) -> RamRun {
        let first = w.off >> 12;
        let window = PageIndex(first)..PageIndex(first.saturating_add(w.len >> 12));
        let run = vpte::prefault_run(self.ram.words(), t, window, PREFAULT_MAX, self.ram.size());
        let (va, len, pa) = if run.count > 0 {
            let before = t.pindex.0 - run.first.0;
            let start = page - before * PAGE;
            let (lo, hi) = mm.uninstalled_around(page, start, start + run.count * PAGE);
            (lo, hi - lo, t.pa.0 - (page - lo))
        } else {
            (page, PAGE, t.pa.0)
        };
        let populate = if write { libc::MAP_POPULATE as u64 } else { 0 };
        RamRun {
            va,
            len,
            prot: prot_of(t),
            flags: (libc::MAP_SHARED | libc::MAP_FIXED) as u64 | populate,
            pa,
        }
    }

    /// Walk window `w`'s tables for `page` (`Err(None)`: the page index
    /// overflows).
    pub(super) fn walk_window(
        &self,
        w: &Window,
        page: u64,
        access: Access,
    ) -> Result<Translation, Option<WalkError>> {
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

    fn trace_fault(
        &self,
        p: &Process,
        tid: Pid,
        va: u64,
        master: u64,
        access: Access,
        result: &Result<Translation, Option<WalkError>>,
    ) {
        if !crate::sys::lock(&self.trace).set().faults {
            return;
        }
        // Looked up without the trace's lock held.
        let tid = self.trace_tid(tid);
        let text = format_fault(va, master, access, result, p.space == Space::Vmspace);
        crate::sys::lock(&self.trace).line(tid.as_raw(), SystemTime::now(), &text, None);
    }

    /// Start the fault thread of `p`.
    pub(super) fn start_fault_thread(self: &Arc<Self>, p: &Arc<Process>) -> Result<(), Errno> {
        let vpt = Arc::clone(self);
        let pp = Arc::clone(p);
        std::thread::Builder::new()
            .name(format!("vkrun-faults-{}", p.tgid))
            .spawn(move || vpt.serve_faults(&pp))
            .map(drop)
            .map_err(|e| {
                tracing::error!("cannot start the fault thread: {e}");
                Errno::EAGAIN
            })
    }

    /// The fault thread of process `p`: until it dies, take the faults the
    /// resolver forwards and resolve each.
    fn serve_faults(&self, p: &Process) {
        let a = &p.agent;
        let mut checked = Instant::now();
        while !p.dead.load(Ordering::Acquire) {
            if checked.elapsed() >= DESCRIPTOR_CHECK {
                self.check_descriptors(p);
                checked = Instant::now();
            }
            // A stub has no resolver: its ring is the user code's to write.
            if p.space == Space::Vmspace
                || p.resolver_gone.load(Ordering::Acquire)
                    && a.res_word(RES_FWD_HEAD).load(Ordering::Acquire)
                        == a.res_word(RES_FWD_TAIL).load(Ordering::Relaxed)
            {
                self.serve_faults_directly(p);
                break;
            }
            let seen = a.res_word(RES_SUP_WAKE).load(Ordering::Acquire);
            let head = a.res_word(RES_FWD_HEAD).load(Ordering::Acquire);
            let mut tail = a.res_word(RES_FWD_TAIL).load(Ordering::Relaxed);
            // The ring is in the guest's memory: never more than one
            // ring's worth of entries per look.
            if head.wrapping_sub(tail) > RES_FWD_SLOTS {
                tail = head.wrapping_sub(RES_FWD_SLOTS);
            }
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
                if event == UFFD_EVENT_PAGEFAULT {
                    let f = PageFault {
                        address,
                        write: flags & 1 != 0,
                        tid: ptid as i32,
                    };
                    self.on_missing(p, &f);
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
        let mut checked = Instant::now();
        while !p.dead.load(Ordering::Acquire) {
            if checked.elapsed() >= DESCRIPTOR_CHECK {
                self.check_descriptors(p);
                checked = Instant::now();
            }
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
                self.on_missing(p, f);
            }
        }
    }
}

/// How often a fault thread checks that a guest process still holds the
/// descriptors vkrun gave its agent.
const DESCRIPTOR_CHECK: Duration = Duration::from_millis(500);

impl Vpt {
    /// The agent in a guest process works through two descriptors vkrun
    /// put in the guest's table (768 and up): its userfaultfd and the RAM
    /// memfd. The guest can close them (then the resolver ends and the fault
    /// thread reads the uffd itself; the RAM is opened again) or replace
    /// them with other files (`dup2` of a pipe: the resolver would read
    /// forged fault messages and nobody the real ones). The second cannot be
    /// repaired from outside: vkrun ends the guest with one line and 125.
    fn check_descriptors(&self, p: &Process) {
        if p.space == Space::Vmspace {
            return; // a stub's user code makes no system calls
        }
        let a = &p.agent;
        // The uffd by file (every userfaultfd shares one anonymous inode);
        // the RAM by inode (the agent opens it anew through /proc: another
        // file of the same memfd).
        let uffd = i32::try_from(a.uffd_fd.load(Ordering::Relaxed)).ok();
        if let Some(fd) = uffd
            && kcmp::same_file(p.uffd.as_fd(), p.tgid, fd) == Ok(false)
        {
            replaced(p.tgid, fd, "userfaultfd");
        }
        let ram = i32::try_from(a.ram_fd.load(Ordering::Relaxed)).ok();
        if let Some(fd) = ram
            && let Ok(theirs) = nix::sys::stat::stat(format!("/proc/{}/fd/{fd}", p.tgid).as_str())
            && let Ok(ours) = nix::sys::stat::fstat(self.ram_fd())
            && (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
        {
            replaced(p.tgid, fd, "RAM memfd");
        }
    }
}

fn replaced(tgid: Pid, fd: i32, what: &str) -> ! {
    fatal::fail(&format!(
        "guest process {tgid} replaced descriptor {fd}, the {what} vkrun installed for its \
         page-table windows, with another file"
    ))
}

/// The host protection of an install for translation `t`.
fn prot_of(t: &Translation) -> u64 {
    let mut prot = libc::PROT_READ;
    if t.writable {
        prot |= libc::PROT_WRITE;
    }
    if t.executable {
        prot |= libc::PROT_EXEC;
    }
    prot as u64
}
