//! The supervisor's event loop: the main thread is the ptrace tracer of every
//! guest task (it holds the [`Tracer`] token) and keeps their accounting;
//! the hypercall server's threads answer notifications.
//!
//! The tracer thread waits on the kernel (`poll(2)` on the signalfd and
//! the vmspace job queue, `waitpid(2)` for a tracee it is driving) and,
//! bounded at 10 s, on a guest process's agent; never on an execution
//! context (README, "What bounds each wait"). A signal that interrupts RUN
//! leaves its thread stopped until the kicked context reports, and a job
//! then resumes it; a new context reports ready to the hypercall thread
//! that asked for it.
//!
//! The tracer sleeps in `poll(2)` on a signalfd (SIGCHLD for tracee state
//! changes, plus the signals vkrun forwards). Tracee stops are handled as
//! ptrace(2) prescribes for a
//! `PTRACE_SEIZE`d tracee: events are continued, signals are re-injected,
//! group-stops are `PTRACE_LISTEN`ed so that job control behaves as it would
//! without vkrun.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use vkabi::Hypercall;

use nix::sys::ptrace::{self, Event, Options};
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::error::Error;
use crate::gdb::Gdb;
use crate::hypercall::{self, Pool, Server, StopCalls};
use crate::ram::GuestRam;
use crate::stats::Stats;
use crate::sys::seccomp::NotifyFd;
use crate::sys::signal::install_wake_handler;
use crate::sys::spawn::{self, Child, ChildPlan, ChildStep};
use crate::sys::{lock, proc};
use crate::trace::TraceWriter;
use crate::trace::format::{format_exec, format_new_task};
use crate::tracee::Tracer;
use crate::vmspace::Vmspaces;
use crate::vpt::{ContextFaults, SegvAction, StopDone, Vpt};
use crate::{Config, Outcome, resolve_program};

mod gdb;
mod signals;
use gdb::listen_for_gdb;
use signals::{is_stop_signal, resume, trace_signal};

/// Signals sent to vkrun (by `kill`, not by the terminal) that it passes on
/// to the guest.
const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Run the guest described by `config` to its end.
///
/// Precondition: the calling process is single-threaded (it forks the guest
/// and becomes its tracer). The calling thread's signal mask is changed for
/// the duration of the call and restored afterwards.
pub fn run(config: Config) -> Result<Outcome, Error> {
    let Config {
        program,
        args,
        ram_size,
        trace: trace_options,
        output,
        stats: want_stats,
        stats_zeros,
        gdb,
        fast_run,
    } = config;
    crate::sys::fatal::install_panic_hook();
    let path = resolve_program(&program)?;
    let ram = Arc::new(GuestRam::create(ram_size)?);
    install_wake_handler().map_err(Error::sys("installing the wake-up handler"))?;

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    FORWARDED.iter().for_each(|s| mask.add(*s));
    let mut old_mask = SigSet::empty();
    signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old_mask))
        .map_err(Error::sys("blocking signals"))?;
    let result = (|| {
        let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(Error::sys("signalfd"))?;
        let argv = std::iter::once(program.clone()).chain(args).collect();
        let envp = std::env::vars_os()
            .map(|(mut k, v)| {
                k.push("=");
                k.push(v);
                k
            })
            .collect();
        let exe = path.clone();
        let plan = ChildPlan::new(
            path.into_os_string(),
            argv,
            envp,
            ram.raw_fd(),
            hypercall::filter(),
        )
        .map_err(|errno| Error::CannotExecute {
            program: program.to_string_lossy().into_owned(),
            errno,
        })?;
        let child = spawn::fork_guest(&plan).map_err(Error::sys("fork"))?;
        let options = Options::PTRACE_O_EXITKILL
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_TRACEVFORK
            | Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEEXEC
            | Options::PTRACE_O_TRACESYSGOOD
            | Options::PTRACE_O_TRACESECCOMP;
        if let Err(errno) = ptrace::seize(child.pid, options) {
            let _ = signal::kill(child.pid, Signal::SIGKILL);
            let _ = waitpid(child.pid, None);
            return Err(Error::Sys {
                what: "PTRACE_SEIZE of the guest",
                errno,
            });
        }
        child.release().map_err(Error::sys("releasing the guest"))?;
        let tracer = Tracer::this_thread();
        let gdb = match gdb {
            Some(opts) => Some(listen_for_gdb(&opts, &tracer, &child, exe)?),
            None => None,
        };
        let mut sup = Supervisor {
            tracer,
            ram_fd_guess: ram.raw_fd(),
            ram,
            main: child.pid,
            child,
            program: program.to_string_lossy().into_owned(),
            exec_seen: false,
            server: None,
            sigfd,
            tracees: HashSet::new(),
            announced: HashSet::new(),
            early_exits: HashSet::new(),
            outcome: None,
            failure: None,
            out: Arc::new(Mutex::new(TraceWriter::new(output, trace_options))),
            stats: Arc::new(Stats::default()),
            fast_run,
            vpt: None,
            vmspaces: None,
            stop_calls: None,
            gdb,
        };
        let vpt = Arc::new(
            Vpt::new(
                Arc::clone(&sup.ram),
                Arc::clone(&sup.stats),
                Arc::clone(&sup.out),
            )
            .map_err(Error::sys("eventfd"))?,
        );
        sup.vmspaces = Some(Arc::new(
            Vmspaces::new(
                Arc::clone(&sup.stats),
                Arc::clone(&vpt),
                Arc::clone(&sup.ram),
            )
            .map_err(Error::sys("eventfd"))?,
        ));
        if let Some(gdb) = sup.gdb.as_mut() {
            gdb.set_vmspaces(Arc::clone(sup.vmspaces.as_ref().expect("just set")));
        }
        let vmspaces: Arc<dyn ContextFaults> = Arc::clone(sup.vmspaces()) as _;
        vpt.set_context_faults(Arc::downgrade(&vmspaces));
        drop(vmspaces);
        sup.stop_calls = Some(StopCalls {
            vpt: Arc::clone(&vpt),
            vmspaces: Arc::clone(sup.vmspaces()),
            stats: Arc::clone(&sup.stats),
            trace: Arc::clone(&sup.out),
        });
        sup.vpt = Some(vpt);
        sup.tracees.insert(sup.main);
        let result = sup.event_loop();
        if let Some(server) = sup.server.take() {
            server.stop();
        }
        let mut out = lock(&sup.out);
        if want_stats {
            out.write(sup.stats.render(stats_zeros).as_bytes());
        }
        out.flush();
        result
    })();
    let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    result
}

/// The state of one supervision.
struct Supervisor {
    /// This is the tracer thread.
    tracer: Tracer,
    ram: Arc<GuestRam>,
    child: Child,
    /// The guest's first process: its end is vkrun's outcome.
    main: Pid,
    /// Display name of the guest program.
    program: String,
    /// Whether `main` has completed its first `execve` (before that, an exit
    /// is a start-up failure).
    exec_seen: bool,
    /// The hypercall server, once the guest has started.
    server: Option<Arc<Server>>,
    sigfd: SignalFd,
    /// Every task (thread id) being traced.
    tracees: HashSet<Pid>,
    /// Tasks whose creation event (fork, vfork, clone) has been seen and
    /// that have not exited yet.
    announced: HashSet<Pid>,
    /// Tasks that exited before their creation event was seen (an
    /// auto-attached child can run and exit first): their late event must
    /// not count them again.
    early_exits: HashSet<Pid>,
    outcome: Option<Outcome>,
    failure: Option<Error>,
    out: Arc<Mutex<TraceWriter>>,
    stats: Arc<Stats>,
    /// `Config::fast_run`.
    fast_run: bool,
    ram_fd_guess: i32,
    /// MAP_VPAGETABLE state of the guest's processes.
    vpt: Option<Arc<Vpt>>,
    /// The guest's vmspaces and their stubs.
    vmspaces: Option<Arc<Vmspaces>>,
    /// The hypercalls served at a seccomp stop.
    stop_calls: Option<StopCalls>,
    /// The GDB stub (`--gdb`).
    gdb: Option<Gdb>,
}

impl Supervisor {
    /// Serve hypercalls and tracee stops until no tracee is left.
    fn event_loop(&mut self) -> Result<Outcome, Error> {
        loop {
            let vmspaces = Arc::clone(self.vmspaces());
            let vpt = Arc::clone(self.vpt());
            let polled = {
                // The stub's socket is a fourth descriptor only with --gdb.
                let gdb_fd = self.gdb.as_ref().and_then(Gdb::fd);
                let n = if gdb_fd.is_some() { 4 } else { 3 };
                let mut fds = [
                    PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
                    PollFd::new(vmspaces.jobs_fd(), PollFlags::POLLIN),
                    PollFd::new(vpt.finishes_fd(), PollFlags::POLLIN),
                    PollFd::new(gdb_fd.unwrap_or(self.sigfd.as_fd()), PollFlags::POLLIN),
                ];
                let ready = |fd: &PollFd<'_>| fd.any().unwrap_or(false);
                match poll(&mut fds[..n], PollTimeout::NONE) {
                    Ok(_) => Ok((ready(&fds[1]), ready(&fds[2]), n == 4 && ready(&fds[3]))),
                    Err(Errno::EINTR) => Ok((false, false, false)),
                    Err(errno) => Err(errno),
                }
            };
            let (jobs_ready, finishes_ready, gdb_ready) =
                polled.map_err(|errno| self.abort(Error::sys("poll")(errno)))?;
            crate::sys::fatal::test_panic_point("tracer");
            if jobs_ready {
                vmspaces.run_jobs(&self.tracer);
            }
            if finishes_ready {
                self.finish_stops(&vpt)?;
            }
            if gdb_ready {
                self.with_gdb(|g| g.on_readable());
            }
            if self.on_signals()? {
                break;
            }
            if let Some(server) = &self.server {
                server.on_guest_tasks(self.tracees.len(), false);
            }
        }
        if let Some(err) = self.failure.take() {
            return Err(err);
        }
        self.outcome.ok_or(Error::Sys {
            what: "the guest vanished without an exit status",
            errno: Errno::ECHILD,
        })
    }

    fn vmspaces(&self) -> &Arc<Vmspaces> {
        self.vmspaces
            .as_ref()
            .expect("the vmspace registry exists from the start")
    }

    fn vpt(&self) -> &Arc<Vpt> {
        self.vpt.as_ref().expect("created before the event loop")
    }

    /// Kill the guest after a supervisor failure and return the error.
    fn abort(&mut self, err: Error) -> Error {
        tracing::error!("supervisor failure, killing the guest: {err}");
        for tid in &self.tracees {
            let _ = signal::kill(*tid, Signal::SIGKILL);
        }
        err
    }

    /// Collect every pending tracee state change. Returns true when vkrun has
    /// no tracee or child left.
    fn reap(&mut self) -> Result<bool, Error> {
        loop {
            match waitpid(None, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return Ok(false),
                Ok(status) => match status.pid() {
                    Some(pid) if self.vmspaces().is_stub(pid) => {
                        self.vmspaces().on_stub_status(&self.tracer, pid, status);
                    }
                    _ => self.on_wait_status(status)?,
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return Ok(true),
                Err(errno) => return Err(self.abort(Error::sys("waitpid")(errno))),
            }
        }
    }

    /// End the stops whose agent work a stop worker finished.
    fn finish_stops(&mut self, vpt: &Vpt) -> Result<(), Error> {
        for (tid, finish) in vpt.take_finishes() {
            match finish(&self.tracer) {
                StopDone::Resumed => {}
                StopDone::Gone(status) => self.on_wait_status(status)?,
                StopDone::Deliver(sig) if self.gdb_holds(|g| g.on_signal_stop(tid, sig)) => {}
                StopDone::Deliver(sig) => {
                    trace_signal(&self.out, tid);
                    resume(tid, Some(sig));
                }
            }
        }
        Ok(())
    }

    fn on_wait_status(&mut self, status: WaitStatus) -> Result<(), Error> {
        match status {
            WaitStatus::Exited(pid, code) => self.on_exit(pid, Outcome::Exited(code)),
            WaitStatus::Signaled(pid, signal, core_dumped) => self.on_exit(
                pid,
                Outcome::Signaled {
                    signal,
                    core_dumped,
                },
            ),
            WaitStatus::Stopped(pid, Signal::SIGSEGV) => {
                self.tracees.insert(pid);
                let tgid = proc::tgid_of(pid).unwrap_or(pid);
                match self.vpt().on_sigsegv(pid, tgid) {
                    SegvAction::Deliver
                        if self.gdb_holds(|g| g.on_signal_stop(pid, Signal::SIGSEGV)) => {}
                    SegvAction::Deliver => {
                        trace_signal(&self.out, pid);
                        resume(pid, Some(Signal::SIGSEGV));
                    }
                    SegvAction::Deferred => {}
                }
            }
            WaitStatus::Stopped(pid, sig) => {
                // Signal-delivery-stop: deliver the signal as the kernel would.
                self.tracees.insert(pid);
                if let Some(server) = &self.server {
                    server.on_guest_tasks(self.tracees.len(), true);
                }
                if !self.gdb_holds(|g| g.on_signal_stop(pid, sig)) {
                    self.deliver_signal(pid, sig);
                }
            }
            WaitStatus::PtraceEvent(pid, sig, event) => {
                self.tracees.insert(pid);
                self.on_ptrace_event(pid, sig, event)?;
            }
            WaitStatus::PtraceSyscall(pid) => resume(pid, None),
            WaitStatus::Continued(_) | WaitStatus::StillAlive => {}
        }
        Ok(())
    }

    fn on_ptrace_event(&mut self, pid: Pid, sig: Signal, event: i32) -> Result<(), Error> {
        const STOP: i32 = libc::PTRACE_EVENT_STOP;
        match event {
            STOP if !is_stop_signal(sig) && self.gdb_holds(|g| g.on_event_stop(pid)) => {
                return Ok(());
            }
            STOP if is_stop_signal(sig) => {
                // Group-stop: stay stopped, keep reporting (job control).
                if self.gdb_holds(|g| g.on_group_stop(pid)) {
                    return Ok(());
                }
                if let Err(errno) = crate::sys::ptrace::listen(pid) {
                    tracing::debug!(%pid, %errno, "PTRACE_LISTEN failed");
                }
                return Ok(());
            }
            e if e == Event::PTRACE_EVENT_SECCOMP as i32 => {
                // A `TracerStop` hypercall (see the hypercall table).
                let calls = self.stop_calls.as_ref().expect("set before the event loop");
                let stepping = self.gdb.as_ref().is_some_and(|g| g.is_stepping(pid));
                let outcome = calls.at_stop(&self.tracer, pid, stepping);
                self.tracees.extend(outcome.new_threads);
                if let Some(status) = outcome.gone {
                    self.on_wait_status(status)?;
                }
                return Ok(());
            }
            e if e == Event::PTRACE_EVENT_EXEC as i32 => {
                // A new program: the old mm's windows and agent are gone.
                self.vpt().forget(pid);
                // The exec'ing thread took over the leader's id; its old id is gone.
                if let Ok(former) = ptrace::getevent(pid) {
                    let former = Pid::from_raw(former as i32);
                    if former != pid {
                        self.tracees.remove(&former);
                    }
                }
                let first = pid == self.main && !self.exec_seen;
                if !first {
                    self.with_gdb(|g| g.on_exec(pid));
                }
                if first {
                    self.exec_seen = true;
                    self.on_guest_started()?;
                }
                self.trace_process(pid, || {
                    crate::sys::proc::program(pid).map(|(exe, args)| format_exec(&exe, &args))
                });
                if first && self.gdb_holds(|g| g.hold_at_start(pid)) {
                    return Ok(());
                }
            }
            e if e == Event::PTRACE_EVENT_FORK as i32
                || e == Event::PTRACE_EVENT_VFORK as i32
                || e == Event::PTRACE_EVENT_CLONE as i32 =>
            {
                // The child may already have run and exited: its own stops
                // can come before its parent's event. Then it must not be
                // counted again (vkrun would wait for it forever).
                if let Ok(new) = ptrace::getevent(pid)
                    && !self.early_exits.remove(&Pid::from_raw(new as i32))
                {
                    let child = Pid::from_raw(new as i32);
                    self.trace_process(pid, || {
                        let regs = ptrace::getregs(pid).ok()?;
                        Some(format_new_task(regs.orig_rax, regs.rdi, child.as_raw()))
                    });
                    self.tracees.insert(child);
                    self.announced.insert(child);
                    if e == Event::PTRACE_EVENT_FORK as i32 {
                        self.with_gdb(|g| g.on_fork(child));
                    }
                    if e != Event::PTRACE_EVENT_VFORK as i32 {
                        self.strip_windows(pid, child)?;
                    }
                }
            }
            _ => {}
        }
        resume(pid, None);
        Ok(())
    }

    /// A process event of task `pid` (a fork, clone or exec) for the trace,
    /// if `-e trace=process` (or all) asks for it.
    fn trace_process(&self, pid: Pid, text: impl FnOnce() -> Option<String>) {
        let mut out = lock(&self.out);
        if !out.set().process {
            return;
        }
        if let Some(text) = text() {
            out.line(pid.as_raw(), SystemTime::now(), &text, None);
        }
    }

    /// A new process that does not share `parent`'s mm must not keep its
    /// windows (no agent serves them there): take them away while the child
    /// is at its first stop.
    fn strip_windows(&mut self, parent: Pid, child: Pid) -> Result<(), Error> {
        let tgid = proc::tgid_of(parent).unwrap_or(parent);
        if !self.vpt().has_windows(tgid) || crate::sys::kcmp::same_vm(parent, child) {
            return Ok(());
        }
        // Its first stop: an auto-attached task starts in PTRACE_EVENT_STOP.
        loop {
            match waitpid(child, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::Stopped(..)) => break,
                Ok(status) => return self.on_wait_status(status),
                Err(Errno::EINTR) => continue,
                Err(_) => return Ok(()),
            }
        }
        if let Some(status) = self.vpt().on_fork(&self.tracer, tgid, child) {
            self.on_wait_status(status)?;
        }
        Ok(())
    }

    /// The guest's first `execve` succeeded: take over its hypercall listener.
    fn on_guest_started(&mut self) -> Result<(), Error> {
        let fd = self
            .child
            .take_listener()
            .map_err(|errno| self.abort(Error::sys("receiving the seccomp listener")(errno)))?;
        let notify = NotifyFd::new(fd);
        if let Err(errno) = notify.set_sync_wake_up() {
            tracing::info!(%errno, "SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP unavailable");
        }
        let server = Arc::new(Server {
            ram: Arc::clone(&self.ram),
            notify: Arc::new(notify),
            stats: Arc::clone(&self.stats),
            trace: Arc::clone(&self.out),
            vpt: Arc::clone(self.vpt()),
            vmspaces: Arc::clone(self.vmspaces()),
            ram_fd_guess: AtomicI32::new(self.ram_fd_guess),
            pool: Pool::default(),
        });
        // Traced RUNs take the hypercall, where they can be traced.
        let traced = {
            let out = lock(&self.out);
            out.set().runs || out.set().hypercall(Some(Hypercall::VmspaceCtl))
        };
        self.vmspaces().set_env(Arc::new(crate::vmspace::RunEnv {
            fast: self.fast_run && !traced,
            notify: Arc::clone(&server.notify),
            stats: Arc::clone(&self.stats),
            trace: Arc::clone(&self.out),
            vpt: Arc::clone(self.vpt()),
        }));
        server.start().map_err(|e| {
            self.abort(Error::Sys {
                what: "starting the hypercall thread",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })
        })?;
        self.server = Some(server);
        Ok(())
    }

    fn on_exit(&mut self, pid: Pid, outcome: Outcome) {
        self.tracees.remove(&pid);
        self.vpt().forget_thread(pid);
        self.vmspaces().forget_thread(pid);
        if self.vpt().take_agent(pid) {
            return; // vkrun's own thread in the guest
        }
        if !self.announced.remove(&pid) && pid != self.main {
            self.early_exits.insert(pid);
        }
        let main = pid == self.main;
        self.with_gdb(|g| g.on_exit(pid, outcome, main));
        self.vpt().forget(pid);
        let mut out = lock(&self.out);
        if !out.set().is_empty() {
            let text = match outcome {
                Outcome::Exited(code) => format!("+++ exited with {code} +++"),
                Outcome::Signaled {
                    signal,
                    core_dumped,
                } => format!(
                    "+++ killed by {}{} +++",
                    signal.as_str(),
                    if core_dumped { " (core dumped)" } else { "" }
                ),
            };
            out.line(pid.as_raw(), SystemTime::now(), &text, None);
        }
        drop(out);
        if self.tracees.is_empty() && !self.vmspaces().is_empty() {
            // The guest's last task is gone: so are its vmspaces.
            self.vmspaces().destroy_all(&self.tracer);
        }
        if pid != self.main {
            return;
        }
        if self.exec_seen {
            self.outcome = Some(outcome);
            return;
        }
        let program = self.program.clone();
        self.failure = Some(match self.child.failure() {
            Some(f) if f.step == ChildStep::Exec => match f.errno {
                Errno::ENOENT | Errno::ENOTDIR => Error::NotFound { program },
                errno => Error::CannotExecute { program, errno },
            },
            Some(f) => Error::Setup {
                step: match f.step {
                    ChildStep::Prepare => "preparing the child",
                    _ => "installing the seccomp filter",
                },
                errno: f.errno,
            },
            None => Error::Setup {
                step: "the guest died before execve",
                errno: Errno::ECHILD,
            },
        });
    }
}
