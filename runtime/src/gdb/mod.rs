//! The GDB remote stub (`vkrun --gdb ADDR`): gdb debugs the guest through
//! vkrun, its one tracer. The protocol is the `gdbstub` crate's; this
//! module is its target side, driven from the tracer's event loop: the
//! socket is one more descriptor in its `poll(2)`, every wait status of a
//! guest thread is offered here first, and what gdb asks for (resume,
//! step, kill) comes back as [`Order`]s that the supervisor carries out.
//!
//! All-stop: when one thread stops for gdb (a breakpoint, a step, a
//! signal, ^C), every other guest thread is interrupted
//! (`PTRACE_INTERRUPT`) and the stop is reported once all are held. A
//! thread interrupted inside a hypercall (a RUN included) has its call
//! restarted when it is resumed, as after a signal without a handler.
//! vkrun's own threads in the guest (agent, resolver) are never stopped
//! and never shown.
//!
//! Off by default: without `--gdb` nothing of this exists.

mod conn;
mod monitor;
mod regs;
mod target;
mod watch;

use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use conn::{Conn, Listener, Stream, WRITE_TIMEOUT};
pub use conn::{GdbAddr, GdbOptions};
use target::{Held, Inferior, tid};
pub use target::{Order, Resumption};

use crate::Outcome;
use crate::tracee::Tracer;

type Machine = GdbStubStateMachine<'static, Inferior, Conn>;

/// Where a session is.
#[derive(Debug)]
enum Phase {
    /// No gdb: the guest runs (or waits at its start).
    Detached,
    /// gdb connected; waiting for every thread to stop before serving it.
    Attaching(Conn),
    /// gdb let the guest run.
    Running,
    /// A stop to report once every thread is held.
    Stopping(MultiThreadStopReason<u64>),
    /// Every thread held; gdb is served.
    Stopped,
}

/// The stub: its listener, the session and the guest as gdb sees it.
pub struct Gdb {
    listener: Listener,
    inf: Inferior,
    machine: Option<Machine>,
    /// The connection again (a duplicate descriptor), for reading: the
    /// state machine owns the one it writes to.
    peer: Option<Conn>,
    phase: Phase,
    /// `--gdb-wait`: hold the guest at its start until gdb attaches.
    wait: bool,
    /// Where the stub listens, for messages.
    addr: String,
    /// Threads whose process was seen catching a signal lately, and when:
    /// a handler is assumed to stay for [`CAUGHT_FOR`], so that a vkernel
    /// taking signals by design pays one `/proc` read per thread and
    /// interval, not one per signal (a handler removed meanwhile only
    /// costs a post mortem).
    caught: HashMap<(Pid, i32), Instant>,
}

/// How long a handler seen is trusted to be there.
const CAUGHT_FOR: Duration = Duration::from_millis(200);

impl std::fmt::Debug for Gdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gdb")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// The outcome of offering a wait status to the stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The stub holds the thread stopped: the supervisor leaves it.
    Held,
    /// Not the stub's: the supervisor handles it as without gdb.
    Pass,
}

fn say(text: &str) {
    let _ = std::io::stderr().write_all(format!("vkrun: {text}\n").as_bytes());
}

impl Gdb {
    /// Listen on `opts.addr` before the guest starts, and say where on
    /// stderr (as gdbserver does), with the port when 0 was asked for.
    /// `tracer` proves this is the tracer thread; the stub keeps a token.
    pub fn listen(
        opts: &GdbOptions,
        tracer: &Tracer,
        main: Pid,
        exe: PathBuf,
    ) -> std::io::Result<Gdb> {
        let (listener, addr) = match &opts.addr {
            GdbAddr::Tcp(addr) => {
                let l = TcpListener::bind(addr)?;
                let addr = l.local_addr()?.to_string();
                (Listener::Tcp(l), addr)
            }
            GdbAddr::Unix(path) => {
                let l = UnixListener::bind(path)?;
                (Listener::Unix(l, path.clone()), path.display().to_string())
            }
        };
        say(&format!("gdb: listening on {addr}"));
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(Gdb {
            listener,
            inf: Inferior::new(tracer.share(), main, exe),
            machine: None,
            peer: None,
            phase: Phase::Detached,
            wait: opts.wait,
            addr,
            caught: HashMap::new(),
        })
    }

    /// The guest's vmspaces, for `monitor vmspace`.
    pub fn set_vmspaces(&mut self, vmspaces: std::sync::Arc<crate::vmspace::Vmspaces>) {
        self.inf.vmspaces = Some(vmspaces);
    }

    /// The descriptor the tracer polls for the stub: the listener with no
    /// gdb, the connection while gdb may talk (^C while running).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match (&self.phase, &self.machine) {
            (Phase::Detached, _) => Some(match &self.listener {
                Listener::Tcp(l) => l.as_fd(),
                Listener::Unix(l, _) => l.as_fd(),
            }),
            (Phase::Running | Phase::Stopped, Some(_)) => self.peer.as_ref().map(Conn::fd),
            _ => None,
        }
    }

    /// The guest threads now (vkrun's own excluded), from the supervisor.
    pub fn set_threads(&mut self, threads: impl Iterator<Item = Pid>) {
        self.inf.threads = threads.collect();
        let threads = &self.inf.threads;
        self.inf.held.retain(|t, _| threads.contains(t));
        self.inf.stepping.retain(|t| threads.contains(t));
    }

    /// What the supervisor must do now.
    pub fn take_orders(&mut self) -> Vec<Order> {
        std::mem::take(&mut self.inf.orders)
    }

    /// The guest's main process completed its first `execve`: with
    /// `--gdb-wait` (the default) it stays there, at its first
    /// instruction, until gdb attaches.
    pub fn hold_at_start(&mut self, pid: Pid) -> Verdict {
        if !self.wait {
            return Verdict::Pass;
        }
        self.inf.held.insert(pid, Held::Event);
        Verdict::Held
    }

    /// The descriptor polled is readable: accept gdb, or serve its bytes.
    pub fn on_readable(&mut self) {
        match self.phase {
            Phase::Detached => self.accept(),
            Phase::Running | Phase::Stopped => self.serve(),
            _ => {}
        }
    }

    fn accept(&mut self) {
        let stream = match &self.listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(%e, "accepting gdb failed");
                return;
            }
        };
        let ready = match &stream {
            Stream::Tcp(s) => s
                .set_nonblocking(false)
                .and_then(|()| s.set_write_timeout(Some(WRITE_TIMEOUT))),
            Stream::Unix(s) => s
                .set_nonblocking(false)
                .and_then(|()| s.set_write_timeout(Some(WRITE_TIMEOUT))),
        };
        if let Err(e) = ready {
            tracing::warn!(%e, "setting up gdb's connection failed");
            return;
        }
        let peer = match &stream {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        };
        match peer {
            Ok(p) => self.peer = Some(Conn(p)),
            Err(e) => {
                tracing::warn!(%e, "duplicating gdb's connection failed");
                return;
            }
        }
        tracing::info!("gdb attached");
        self.phase = Phase::Attaching(Conn(stream));
        self.inf.stop_all();
        self.progress();
    }

    /// Read what gdb sent (the socket is readable: one read does not
    /// block) and feed it to the protocol.
    fn serve(&mut self) {
        let Some(mut machine) = self.machine.take() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let Some(peer) = self.peer.as_mut() else {
            return;
        };
        let n = match peer.stream().read(&mut buf) {
            Ok(0) => {
                tracing::info!("gdb closed the connection: the guest runs on");
                return self.end_session(DisconnectReason::Disconnect);
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                self.machine = Some(machine);
                return;
            }
            Err(e) => {
                tracing::info!(%e, "gdb's connection failed: the guest runs on");
                return self.end_session(DisconnectReason::Disconnect);
            }
        };
        for &byte in &buf[..n] {
            let next = match machine {
                GdbStubStateMachine::Idle(m) => m.incoming_data(&mut self.inf, byte),
                GdbStubStateMachine::Running(m) => m.incoming_data(&mut self.inf, byte),
                // ^C, or the end: bytes after it wait for the stop.
                other => {
                    machine = other;
                    break;
                }
            };
            machine = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%e, "gdb session failed: the guest runs on");
                    return self.end_session(DisconnectReason::Disconnect);
                }
            };
            if self.orders_resume() {
                // gdb resumed the guest (vCont, c, s).
                self.phase = Phase::Running;
            }
        }
        self.machine = Some(machine);
        self.after_machine();
    }

    /// Whether gdb's last packet resumed threads.
    fn orders_resume(&self) -> bool {
        self.inf
            .orders
            .iter()
            .any(|o| matches!(o, Order::Resume(_)))
            && matches!(self.phase, Phase::Stopped)
    }

    /// Act on the state the protocol is in after gdb's bytes.
    fn after_machine(&mut self) {
        match self.machine.take() {
            Some(GdbStubStateMachine::Disconnected(m)) => self.end_session(m.get_reason()),
            Some(GdbStubStateMachine::CtrlCInterrupt(m)) => {
                self.machine = Some(GdbStubStateMachine::CtrlCInterrupt(m));
                if matches!(self.phase, Phase::Running) {
                    let thread = self.inf.threads.first().copied().unwrap_or(self.inf.main);
                    self.phase = Phase::Stopping(MultiThreadStopReason::SignalWithThread {
                        tid: tid(thread),
                        signal: regs::to_gdb(Signal::SIGINT),
                    });
                    self.inf.stop_all();
                    self.progress();
                } else {
                    // Idle: every thread is held already.
                    let m = match self.machine.take() {
                        Some(GdbStubStateMachine::CtrlCInterrupt(m)) => m,
                        _ => unreachable!("put back above"),
                    };
                    let reason = MultiThreadStopReason::SignalWithThread {
                        tid: tid(self.inf.main),
                        signal: regs::to_gdb(Signal::SIGINT),
                    };
                    let next = m.interrupt_handled(&mut self.inf, Some(reason));
                    self.land(next);
                }
            }
            other => self.machine = other,
        }
    }

    fn land(&mut self, next: Result<Machine, impl std::fmt::Display>) {
        match next {
            Ok(m) => {
                self.machine = Some(m);
                self.after_machine();
            }
            Err(e) => {
                tracing::warn!(%e, "gdb session failed: the guest runs on");
                self.end_session(DisconnectReason::Disconnect);
            }
        }
    }

    /// The session is over: detach (breakpoints out, threads resumed) or,
    /// for gdb's `kill`, kill the guest.
    fn end_session(&mut self, reason: DisconnectReason) {
        self.machine = None;
        self.peer = None;
        self.phase = Phase::Detached;
        match reason {
            DisconnectReason::Kill => {
                if !self.inf.orders.contains(&Order::KillAll) {
                    self.inf.remove_all_breakpoints();
                    self.inf.orders.push(Order::KillAll);
                }
            }
            DisconnectReason::Disconnect => self.inf.release_all(),
            DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_) => {
                self.inf.release_all()
            }
        }
    }

    /// If every thread is held now, finish what was waiting for it:
    /// start serving a new gdb, or report the stop.
    fn progress(&mut self) {
        if !self.inf.all_held() {
            return;
        }
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Attaching(conn) => {
                let stub = GdbStub::new(conn);
                match stub.run_state_machine(&mut self.inf) {
                    Ok(m) => self.machine = Some(m),
                    Err(e) => {
                        tracing::warn!(%e, "starting the gdb session failed");
                        self.end_session(DisconnectReason::Disconnect);
                    }
                }
            }
            Phase::Stopping(reason) => match self.machine.take() {
                Some(GdbStubStateMachine::Running(m)) => {
                    let next = m.report_stop(&mut self.inf, reason);
                    self.land(next);
                }
                Some(GdbStubStateMachine::CtrlCInterrupt(m)) => {
                    let next = m.interrupt_handled(&mut self.inf, Some(reason));
                    self.land(next);
                }
                other => self.machine = other,
            },
            phase => self.phase = phase,
        }
    }

    /// A signal-delivery-stop of guest thread `pid` (after vkrun's own
    /// window faults were taken out: gdb never sees those). With gdb
    /// attached, the stub holds it and reports it (a `SIGTRAP` of the
    /// stub's `int3` as a breakpoint, one after `PTRACE_SINGLESTEP` as a
    /// finished step).
    pub fn on_signal_stop(&mut self, pid: Pid, sig: Signal) -> Verdict {
        if !self.inf.threads.contains(&pid) {
            return Verdict::Pass;
        }
        let fatal = matches!(self.phase, Phase::Detached) && self.is_fatal(pid, sig);
        let reason = match self.phase {
            Phase::Detached if fatal => {
                // Post mortem: the thread waits at its fatal signal for gdb,
                // which finds it there; continuing delivers the signal.
                say(&format!(
                    "gdb: {} in thread {pid}: waiting for gdb on {}",
                    sig.as_str(),
                    self.addr
                ));
                self.inf.held.insert(
                    pid,
                    Held::Signal {
                        sig,
                        reported: false,
                    },
                );
                return Verdict::Held;
            }
            Phase::Detached => return Verdict::Pass,
            Phase::Stopped => {
                // Cannot happen (all are held), but never lose a signal.
                self.inf.held.insert(
                    pid,
                    Held::Signal {
                        sig,
                        reported: false,
                    },
                );
                return Verdict::Held;
            }
            _ => self.classify(pid, sig),
        };
        self.inf.stopping.remove(&pid);
        match (&self.phase, reason) {
            (Phase::Running, Some(reason)) => {
                let held = match reason {
                    MultiThreadStopReason::SwBreak(_) => Held::Event,
                    _ if self.inf.stepping.remove(&pid) && sig == Signal::SIGTRAP => Held::Event,
                    _ => Held::Signal {
                        sig,
                        reported: true,
                    },
                };
                self.inf.held.insert(pid, held);
                self.phase = Phase::Stopping(reason);
                self.inf.stop_all();
            }
            (_, reason) => {
                // Another thread's stop is being reported: this one waits,
                // its signal kept (a breakpoint hit is taken again, the
                // pc having been put back on the int3).
                let held = match reason {
                    Some(MultiThreadStopReason::SwBreak(_)) => Held::Event,
                    _ if self.inf.stepping.remove(&pid) && sig == Signal::SIGTRAP => Held::Event,
                    _ => Held::Signal {
                        sig,
                        reported: false,
                    },
                };
                self.inf.held.insert(pid, held);
            }
        }
        self.progress();
        Verdict::Held
    }

    /// What gdb is told of `pid`'s stop for `sig`; puts the pc back on a
    /// breakpoint's address.
    fn classify(&mut self, pid: Pid, sig: Signal) -> Option<MultiThreadStopReason<u64>> {
        let t = tid(pid);
        if sig == Signal::SIGTRAP {
            let code = crate::sys::ptrace::signal_info(pid).map_or(0, |i| i.code);
            if code == libc::SI_KERNEL
                && let Ok(mut regs) = ptrace::getregs(pid)
                && self.inf.breakpoints.contains_key(&regs.rip.wrapping_sub(1))
            {
                regs.rip -= 1;
                if ptrace::setregs(pid, regs).is_ok() {
                    return Some(MultiThreadStopReason::SwBreak(t));
                }
            }
            if code == libc::TRAP_HWBKPT
                && let Some(w) = self.inf.watch.hit(pid)
            {
                return Some(MultiThreadStopReason::Watch {
                    tid: t,
                    kind: w.kind,
                    addr: w.addr,
                });
            }
            if self.inf.stepping.contains(&pid) {
                return Some(MultiThreadStopReason::SignalWithThread {
                    tid: t,
                    signal: regs::to_gdb(Signal::SIGTRAP),
                });
            }
        }
        Some(MultiThreadStopReason::SignalWithThread {
            tid: t,
            signal: regs::to_gdb(sig),
        })
    }

    /// Whether `sig` is a crash that ends `pid`'s process: a fault or an
    /// abort (a core-dumping signal a program raises on itself, not one
    /// sent to stop it), neither caught nor ignored (signal(7)).
    fn is_fatal(&mut self, pid: Pid, sig: Signal) -> bool {
        use Signal::*;
        if !matches!(
            sig,
            SIGSEGV | SIGBUS | SIGILL | SIGFPE | SIGABRT | SIGSYS | SIGTRAP
        ) {
            return false;
        }
        // By thread: finding its process would cost the /proc read this
        // saves.
        let key = (pid, sig as i32);
        let now = Instant::now();
        if self
            .caught
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < CAUGHT_FOR)
        {
            return false;
        }
        if crate::sys::proc::takes_default(pid, sig as i32) {
            return true;
        }
        self.caught
            .retain(|_, t| now.duration_since(*t) < CAUGHT_FOR);
        self.caught.insert(key, now);
        false
    }

    /// A `PTRACE_EVENT_STOP` (not a group-stop) of `pid`: the stop an
    /// interrupt asked for, or a new thread's first stop while gdb holds
    /// the guest.
    pub fn on_event_stop(&mut self, pid: Pid) -> Verdict {
        if !self.inf.threads.contains(&pid) {
            return Verdict::Pass;
        }
        if matches!(self.phase, Phase::Running) && self.inf.stepping.remove(&pid) {
            // A step over a hypercall served at a tracer stop ends here
            // (the supervisor interrupted the thread as it resumed it).
            self.inf.held.insert(pid, Held::Event);
            self.phase = Phase::Stopping(MultiThreadStopReason::SignalWithThread {
                tid: tid(pid),
                signal: regs::to_gdb(Signal::SIGTRAP),
            });
            self.inf.stop_all();
            self.progress();
            return Verdict::Held;
        }
        match self.phase {
            Phase::Detached | Phase::Running if !self.inf.stopping.contains(&pid) => {
                return Verdict::Pass;
            }
            _ => {}
        }
        self.inf.stopping.remove(&pid);
        self.inf.held.insert(pid, Held::Event);
        self.progress();
        Verdict::Held
    }

    /// vkrun got a signal it passes to the guest (^C, `kill`): a guest
    /// waiting for gdb (at its start, or at a fatal signal) stops waiting,
    /// so that the signal can act and nothing hangs.
    pub fn on_signal_to_vkrun(&mut self) {
        if !matches!(self.phase, Phase::Detached) {
            return;
        }
        if !self.inf.held.is_empty() || self.wait {
            say("gdb: no longer waiting for gdb");
        }
        // A guest not at its start yet does not wait there either.
        self.wait = false;
        self.inf.release_all();
    }

    /// A `PTRACE_EVENT_STOP` of `pid` in a group-stop (job control): the
    /// answer to an interrupt of a thread stopped by `SIGSTOP`. The stub
    /// holds it (gdb reads it); resumed, it goes back to its group-stop.
    pub fn on_group_stop(&mut self, pid: Pid) -> Verdict {
        if !self.inf.stopping.remove(&pid) {
            return Verdict::Pass;
        }
        self.inf.held.insert(pid, Held::GroupStop);
        self.progress();
        Verdict::Held
    }

    /// Process `pid` ran `execve`: if it is the main process, its old
    /// image and the stub's int3s in it are gone (the kernel clears debug
    /// registers too).
    pub fn on_exec(&mut self, pid: Pid) {
        if pid == self.inf.main {
            self.inf.breakpoints.clear();
            self.inf.watch = Default::default();
        }
    }

    /// Whether gdb single-steps `pid` now.
    pub fn is_stepping(&self, pid: Pid) -> bool {
        self.inf.stepping.contains(&pid)
    }

    /// A forked child: take the stub's breakpoints out of its copy of the
    /// memory (gdb follows the parent).
    pub fn on_fork(&mut self, child: Pid) {
        self.inf.scrub_child(child);
    }

    /// Guest thread `pid` is gone; `main` when it was the main process,
    /// whose end gdb is told of.
    pub fn on_exit(&mut self, pid: Pid, outcome: Outcome, main: bool) {
        self.inf.threads.remove(&pid);
        self.inf.held.remove(&pid);
        self.inf.stopping.remove(&pid);
        self.inf.stepping.remove(&pid);
        if !main {
            self.progress();
            return;
        }
        let reason = match outcome {
            Outcome::Exited(code) => MultiThreadStopReason::Exited(code as u8),
            Outcome::Signaled { signal, .. } => {
                MultiThreadStopReason::Terminated(regs::to_gdb(signal))
            }
        };
        self.inf.breakpoints.clear();
        match self.machine.take() {
            Some(GdbStubStateMachine::Running(m)) => {
                self.phase = Phase::Stopped;
                let next = m.report_stop(&mut self.inf, reason);
                self.land(next);
            }
            Some(GdbStubStateMachine::CtrlCInterrupt(m)) => {
                self.phase = Phase::Stopped;
                let next = m.interrupt_handled(&mut self.inf, Some(reason));
                self.land(next);
            }
            _ => {}
        }
        // Whatever gdb does next, the guest is gone.
        self.machine = None;
        self.peer = None;
        self.phase = Phase::Detached;
    }
}
