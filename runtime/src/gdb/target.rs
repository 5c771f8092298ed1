//! The gdbstub target: the guest's threads as gdb sees them. Registers come
//! from ptrace (the thread is held at a stop), memory from `/proc/TID/mem`
//! (an installed window page is RAM; one never touched cannot be read: the
//! kernel does not fault a userfaultfd page in for a remote access), software breakpoints
//! are `int3` bytes written into the main process's memory and hidden from
//! gdb's reads. Resuming only records [`Order`]s: the supervisor carries
//! them out, so that a signal gdb passes is delivered by the supervisor's
//! one path (RUN's semantics included).

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use gdbstub::common::{Signal as GdbSignal, Tid};
use gdbstub::target::ext::auxv::{Auxv, AuxvOps};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint, SwBreakpointOps,
    WatchKind,
};
use gdbstub::target::ext::exec_file::{ExecFile, ExecFileOps};
use gdbstub::target::ext::extended_mode::{
    Args, AttachKind, CurrentActivePid, CurrentActivePidOps, ExtendedMode, ExtendedModeOps,
    ShouldTerminate,
};
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::{Target, TargetError, TargetResult};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::regs::{Amd64Linux, ThreadRegs, from_gdb};
use super::watch::{Watch, Watchpoints};
use crate::sys::proc;
use crate::tracee::Tracer;
use crate::vmspace::Vmspaces;

/// `int3`.
const INT3: u8 = 0xcc;

/// Why gdb holds a guest thread stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// At a ptrace event stop (`PTRACE_EVENT_STOP`, the first `execve`):
    /// there is no signal to pass on.
    Event,
    /// At a signal-delivery-stop for `sig`. `reported` when gdb was told
    /// of it: then gdb decides what is delivered; otherwise (another
    /// thread's stop was reported first) the signal is delivered on resume
    /// unless gdb names another.
    Signal { sig: Signal, reported: bool },
    /// In a group-stop (job control): on resume it goes back to it
    /// (`PTRACE_LISTEN`), to run at `SIGCONT`.
    GroupStop,
}

/// What the supervisor must do for gdb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Resume a held thread.
    Resume(Resumption),
    /// Kill every guest process (gdb's `kill`).
    KillAll,
}

/// How one held thread goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumption {
    pub pid: Pid,
    /// `PTRACE_SINGLESTEP` rather than `PTRACE_CONT`.
    pub step: bool,
    /// The signal to deliver.
    pub signal: Option<Signal>,
    /// The thread is at a signal-delivery-stop (only there can a signal be
    /// delivered, or one be suppressed).
    pub at_signal: bool,
    /// Back to a group-stop (`PTRACE_LISTEN`) instead.
    pub listen: bool,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Continue(Option<GdbSignal>),
    Step(Option<GdbSignal>),
}

/// The guest as a gdbstub target. Lives on the tracer thread.
#[derive(Debug)]
pub struct Inferior {
    tracer: Tracer,
    /// The guest's main process: breakpoints live in its memory.
    pub main: Pid,
    /// The guest program, for `qXfer:exec-file` when `/proc` no longer
    /// tells.
    pub exe: PathBuf,
    /// Every guest thread (vkrun's own threads in the guest excluded).
    pub threads: BTreeSet<Pid>,
    /// Threads gdb keeps stopped.
    pub held: BTreeMap<Pid, Held>,
    /// Threads interrupted (`PTRACE_INTERRUPT`) whose stop has not come.
    pub stopping: BTreeSet<Pid>,
    /// Threads gdb asked to single-step.
    pub stepping: BTreeSet<Pid>,
    /// Inserted software breakpoints: address and the byte under the `int3`.
    pub breakpoints: BTreeMap<u64, u8>,
    /// Hardware watchpoints, set in every guest thread of the main process.
    pub watch: Watchpoints,
    /// Whether a watchpoint was ever set: then each resumed thread gets
    /// the debug registers of now (new threads included).
    watch_used: bool,
    actions: BTreeMap<Pid, Action>,
    /// gdb's scheduler-locking: threads without an action stay stopped.
    lock_others: bool,
    /// What the supervisor must do next.
    pub orders: Vec<Order>,
    /// The guest's vmspaces, for `monitor vmspace`.
    pub vmspaces: Option<Arc<Vmspaces>>,
}

pub fn tid(pid: Pid) -> Tid {
    NonZeroUsize::new(pid.as_raw() as usize).expect("thread ids are positive")
}

fn pid(tid: Tid) -> Pid {
    Pid::from_raw(tid.get() as i32)
}

fn errno_of(e: Errno) -> TargetError<&'static str> {
    TargetError::Errno(e as i32 as u8)
}

impl Inferior {
    pub fn new(tracer: Tracer, main: Pid, exe: PathBuf) -> Inferior {
        Inferior {
            tracer,
            main,
            exe,
            threads: BTreeSet::new(),
            held: BTreeMap::new(),
            stopping: BTreeSet::new(),
            stepping: BTreeSet::new(),
            breakpoints: BTreeMap::new(),
            watch: Watchpoints::default(),
            watch_used: false,
            actions: BTreeMap::new(),
            lock_others: false,
            orders: Vec::new(),
            vmspaces: None,
        }
    }

    /// Interrupt every guest thread gdb does not hold yet (all-stop):
    /// each reports a `PTRACE_EVENT_STOP` (ptrace(2), `PTRACE_INTERRUPT`).
    /// A thread waiting in a hypercall's notification is taken out of it
    /// as by a signal: its call restarts when it is resumed (a RUN takes
    /// over the run in flight).
    pub fn stop_all(&mut self) {
        let _ = &self.tracer;
        let running: Vec<Pid> = self
            .threads
            .iter()
            .filter(|t| !self.held.contains_key(t) && !self.stopping.contains(t))
            .copied()
            .collect();
        for t in running {
            match ptrace::interrupt(t) {
                Ok(()) => {
                    self.stopping.insert(t);
                }
                Err(errno) => tracing::debug!(%t, %errno, "PTRACE_INTERRUPT failed"),
            }
        }
    }

    /// Whether every guest thread is held.
    pub fn all_held(&mut self) -> bool {
        let threads = &self.threads;
        self.stopping.retain(|t| threads.contains(t));
        self.stopping.is_empty()
    }

    /// Give every held thread back, for a detach: breakpoints are taken
    /// out first; signals gdb never saw are delivered, and so is a reported
    /// one gdb would pass (not its own `SIGTRAP`, not the `SIGINT` of ^C).
    pub fn release_all(&mut self) {
        self.remove_all_breakpoints();
        self.watch = Watchpoints::default();
        self.apply_watch();
        self.stepping.clear();
        for (pid, held) in std::mem::take(&mut self.held) {
            let (signal, at_signal) = match held {
                Held::Event | Held::GroupStop => (None, false),
                Held::Signal { sig, reported } => {
                    let quiet = reported && matches!(sig, Signal::SIGTRAP | Signal::SIGINT);
                    ((!quiet).then_some(sig), true)
                }
            };
            self.orders.push(Order::Resume(Resumption {
                pid,
                step: false,
                signal,
                at_signal,
                listen: held == Held::GroupStop,
            }));
        }
    }

    /// Put back the bytes under every breakpoint.
    pub fn remove_all_breakpoints(&mut self) {
        for (addr, byte) in std::mem::take(&mut self.breakpoints) {
            if let Err(e) = poke(self.main, addr, &[byte]) {
                tracing::debug!(addr, %e, "removing a breakpoint failed");
            }
        }
    }

    /// A forked child got a copy of the main process's memory, `int3`s
    /// included: restore the original bytes there.
    pub fn scrub_child(&self, child: Pid) {
        for (addr, byte) in &self.breakpoints {
            let _ = poke(child, *addr, &[*byte]);
        }
    }

    /// Give every held thread of the main process the debug registers of
    /// now. Returns false if a thread refused them.
    fn apply_watch(&self) -> bool {
        if !self.watch_used {
            return true;
        }
        let mut ok = true;
        for t in self.held.keys().filter(|t| self.same_mm_as_main(**t)) {
            if let Err(errno) = self.watch.apply(*t) {
                tracing::debug!(%t, %errno, "setting debug registers failed");
                ok = false;
            }
        }
        ok
    }

    fn same_mm_as_main(&self, t: Pid) -> bool {
        proc::tgid_of(t).unwrap_or(t) == self.main
    }

    fn check_held(&self, t: Pid) -> TargetResult<(), Self> {
        if self.held.contains_key(&t) {
            Ok(())
        } else {
            Err(TargetError::Errno(libc::ESRCH as u8))
        }
    }
}

fn mem_file(t: Pid, write: bool) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/{t}/mem"))
}

/// Write `data` at `addr` in `t`'s memory (`/proc/TID/mem` writes through
/// read-only mappings, as a debugger's must).
pub fn poke(t: Pid, addr: u64, data: &[u8]) -> std::io::Result<()> {
    mem_file(t, true)?.write_all_at(data, addr)
}

fn peek(t: Pid, addr: u64, data: &mut [u8]) -> std::io::Result<usize> {
    let file = mem_file(t, false)?;
    let mut done = 0;
    while done < data.len() {
        match file.read_at(&mut data[done..], addr + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(done)
}

impl Target for Inferior {
    type Arch = Amd64Linux;
    type Error = &'static str;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_exec_file(&mut self) -> Option<ExecFileOps<'_, Self>> {
        Some(self)
    }

    fn support_auxv(&mut self) -> Option<AuxvOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_extended_mode(&mut self) -> Option<ExtendedModeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for Inferior {
    fn read_registers(&mut self, regs: &mut ThreadRegs, tid: Tid) -> TargetResult<(), Self> {
        let t = pid(tid);
        self.check_held(t)?;
        regs.gpr = ptrace::getregs(t).map_err(errno_of)?;
        regs.fpu = ptrace::getregset::<ptrace::regset::NT_PRFPREG>(t).map_err(errno_of)?;
        Ok(())
    }

    fn write_registers(&mut self, regs: &ThreadRegs, tid: Tid) -> TargetResult<(), Self> {
        let t = pid(tid);
        self.check_held(t)?;
        ptrace::setregs(t, regs.gpr).map_err(errno_of)?;
        ptrace::setregset::<ptrace::regset::NT_PRFPREG>(t, regs.fpu).map_err(errno_of)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let t = pid(tid);
        let n = peek(t, start, data).map_err(TargetError::Io)?;
        if self.same_mm_as_main(t) {
            // Show the bytes under the stub's own int3s.
            let end = start.saturating_add(n as u64);
            for (addr, byte) in self.breakpoints.range(start..end) {
                data[(addr - start) as usize] = *byte;
            }
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let t = pid(tid);
        let mut data = data.to_vec();
        if self.same_mm_as_main(t) {
            // A write over a breakpoint changes the byte under it.
            let end = start.saturating_add(data.len() as u64);
            for (addr, byte) in self.breakpoints.range_mut(start..end) {
                let i = (addr - start) as usize;
                *byte = data[i];
                data[i] = INT3;
            }
        }
        poke(t, start, &data).map_err(TargetError::Io)
    }

    fn list_active_threads(&mut self, report: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        self.threads.iter().for_each(|t| report(tid(*t)));
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for Inferior {
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.apply_watch();
        let actions = std::mem::take(&mut self.actions);
        let held: Vec<(Pid, Held)> = self.held.iter().map(|(p, h)| (*p, *h)).collect();
        for (t, h) in held {
            let action = match actions.get(&t) {
                Some(a) => *a,
                None if self.lock_others => continue,
                None => Action::Continue(None),
            };
            let (step, asked) = match action {
                Action::Continue(s) => (false, s),
                Action::Step(s) => (true, s),
            };
            let signal = match (asked.map(from_gdb), h) {
                (Some(sig), _) => sig,
                (
                    None,
                    Held::Signal {
                        sig,
                        reported: false,
                    },
                ) => Some(sig),
                (None, _) => None,
            };
            self.held.remove(&t);
            if step {
                self.stepping.insert(t);
            }
            self.orders.push(Order::Resume(Resumption {
                pid: t,
                step: step && h != Held::GroupStop,
                signal,
                at_signal: matches!(h, Held::Signal { .. }),
                listen: h == Held::GroupStop,
            }));
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.clear();
        self.lock_others = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        signal: Option<GdbSignal>,
    ) -> Result<(), Self::Error> {
        self.actions.insert(pid(tid), Action::Continue(signal));
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for Inferior {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        signal: Option<GdbSignal>,
    ) -> Result<(), Self::Error> {
        self.actions.insert(pid(tid), Action::Step(signal));
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for Inferior {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.lock_others = true;
        Ok(())
    }
}

impl Breakpoints for Inferior {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl HwWatchpoint for Inferior {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watch { addr, len, kind };
        if !self.watch.insert(w) {
            return Ok(false);
        }
        self.watch_used = true;
        if !self.apply_watch() {
            // The kernel refused it (an address it will not watch).
            self.watch.remove(w);
            self.apply_watch();
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let removed = self.watch.remove(Watch { addr, len, kind });
        self.apply_watch();
        Ok(removed)
    }
}

impl SwBreakpoint for Inferior {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        let mut byte = [0u8];
        if peek(self.main, addr, &mut byte).map_err(TargetError::Io)? != 1 {
            return Ok(false);
        }
        poke(self.main, addr, &[INT3]).map_err(TargetError::Io)?;
        self.breakpoints.insert(addr, byte[0]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.breakpoints.remove(&addr) {
            Some(byte) => {
                poke(self.main, addr, &[byte]).map_err(TargetError::Io)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Copy the part of `data` that `offset`/`length` ask for into `buf`.
fn window(data: &[u8], offset: u64, length: usize, buf: &mut [u8]) -> usize {
    let Ok(start) = usize::try_from(offset) else {
        return 0;
    };
    if start >= data.len() {
        return 0;
    }
    let n = length.min(buf.len()).min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

impl ExecFile for Inferior {
    fn get_exec_file(
        &self,
        pid: Option<gdbstub::common::Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        use std::os::unix::ffi::OsStrExt;
        let process = pid.map_or(self.main, |p| Pid::from_raw(p.get() as i32));
        let path =
            std::fs::read_link(format!("/proc/{process}/exe")).unwrap_or_else(|_| self.exe.clone());
        Ok(window(path.as_os_str().as_bytes(), offset, length, buf))
    }
}

impl Auxv for Inferior {
    fn get_auxv(&self, offset: u64, length: usize, buf: &mut [u8]) -> TargetResult<usize, Self> {
        let auxv = std::fs::read(format!("/proc/{}/auxv", self.main)).map_err(TargetError::Io)?;
        Ok(window(&auxv, offset, length, buf))
    }
}

/// Only for what it brings to `target remote`: the guest's real pid in
/// thread ids, and `kill` answered as gdb expects. vkrun runs one guest,
/// so `run` and `attach` are refused.
impl ExtendedMode for Inferior {
    fn run(
        &mut self,
        _file: Option<&[u8]>,
        _args: Args<'_, '_>,
    ) -> TargetResult<gdbstub::common::Pid, Self> {
        Err(TargetError::Errno(libc::EPERM as u8))
    }

    fn attach(&mut self, _pid: gdbstub::common::Pid) -> TargetResult<(), Self> {
        Err(TargetError::Errno(libc::EPERM as u8))
    }

    /// "Attached": quitting gdb detaches and the guest runs on under
    /// vkrun, as a machine under QEMU's `-s` does.
    fn query_if_attached(&mut self, _pid: gdbstub::common::Pid) -> TargetResult<AttachKind, Self> {
        Ok(AttachKind::Attach)
    }

    fn kill(&mut self, _pid: Option<gdbstub::common::Pid>) -> TargetResult<ShouldTerminate, Self> {
        self.remove_all_breakpoints();
        self.orders.push(Order::KillAll);
        Ok(ShouldTerminate::Yes)
    }

    fn restart(&mut self) -> Result<(), Self::Error> {
        Err("vkrun cannot restart the guest")
    }

    fn support_current_active_pid(&mut self) -> Option<CurrentActivePidOps<'_, Self>> {
        Some(self)
    }
}

impl CurrentActivePid for Inferior {
    fn current_active_pid(&mut self) -> Result<gdbstub::common::Pid, Self::Error> {
        NonZeroUsize::new(self.main.as_raw() as usize).ok_or("no main process")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_copies_only_what_exists() {
        let mut buf = [0u8; 8];
        assert_eq!(window(b"/bin/true", 0, 4, &mut buf), 4);
        assert_eq!(&buf[..4], b"/bin");
        assert_eq!(window(b"/bin/true", 5, 100, &mut buf), 4);
        assert_eq!(&buf[..4], b"true");
        assert_eq!(window(b"/bin/true", 9, 4, &mut buf), 0);
        assert_eq!(window(b"/bin/true", u64::MAX, 4, &mut buf), 0);
    }
}
