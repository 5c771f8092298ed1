//! Work at a guest thread's stop that must wait on its process's agent
//! (an install, the lock shared with the resolver), done off the tracer
//! thread: the tracer leaves the thread stopped and hands the work to the
//! process's **stop worker**; the worker does it and queues what is left
//! (resuming the thread, delivering a signal: `ptrace` requests, which only
//! the tracer may make) for the tracer, which polls [`Deferred::fd`].
//!
//! So the tracer waits on nothing a guest controls: an agent that a
//! hostile process has broken stalls that process's own stop worker (for
//! the agent's bound, after which the process is killed), never the tracer
//! or another process. One worker per process keeps a process's stops in
//! the order they came.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak, mpsc};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::sys::lock;
use crate::tracee::Tracer;

/// How a deferred stop ended, for the supervisor.
#[derive(Debug)]
pub enum StopDone {
    /// The thread was resumed (or is gone, and its exit is reported as
    /// usual).
    Resumed,
    /// The thread died while the tracer finished the work: its status.
    Gone(WaitStatus),
    /// Deliver this signal to the thread as the kernel would (the
    /// supervisor traces it).
    Deliver(Signal),
}

/// The tracer's part of a deferred stop.
pub type Finish = Box<dyn FnOnce(&Tracer) -> StopDone + Send>;
/// The worker's part: returns the tracer's.
pub type Work = Box<dyn FnOnce() -> Finish + Send>;

/// The stop workers and the tracer's queue.
pub struct Deferred {
    workers: Mutex<HashMap<Pid, mpsc::Sender<(Pid, Work)>>>,
    /// Threads stopped with work outstanding: a thread that exits meanwhile
    /// is taken out, so its finish is dropped, never applied to a reused
    /// tid.
    waiting: Mutex<HashSet<Pid>>,
    done: Mutex<Vec<(Pid, Finish)>>,
    done_fd: EventFd,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("waiting", &*lock(&self.waiting))
            .finish_non_exhaustive()
    }
}

impl Deferred {
    pub fn new() -> Result<Self, Errno> {
        Ok(Self {
            workers: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashSet::new()),
            done: Mutex::new(Vec::new()),
            done_fd: EventFd::from_value_and_flags(
                0,
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?,
        })
    }

    /// Readable when finishes are queued for the tracer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.done_fd.as_fd()
    }

    /// Do `work` for stopped thread `tid` of process `tgid` on the
    /// process's stop worker (started on first use). If no worker can be
    /// started, the work is done here, as it was before there were
    /// workers, rather than not at all.
    pub fn submit(self: &Arc<Self>, tgid: Pid, tid: Pid, work: Work) {
        lock(&self.waiting).insert(tid);
        let mut workers = lock(&self.workers);
        let tx = match workers.get(&tgid) {
            Some(tx) => tx.clone(),
            None => match self.start_worker(tgid) {
                Some(tx) => {
                    workers.insert(tgid, tx.clone());
                    tx
                }
                None => {
                    drop(workers);
                    let finish = work();
                    self.push(tid, finish);
                    return;
                }
            },
        };
        drop(workers);
        if let Err(mpsc::SendError((tid, work))) = tx.send((tid, work)) {
            // The worker ended (it only does when the process is forgotten).
            let finish = work();
            self.push(tid, finish);
        }
    }

    /// Do `work` on process `tgid`'s stop worker, for no stopped thread
    /// (nothing for the tracer to finish); here if there is no worker.
    pub fn detached(self: &Arc<Self>, tgid: Pid, work: Box<dyn FnOnce() + Send>) {
        let tx = lock(&self.workers).get(&tgid).cloned();
        let job: Work = Box::new(move || {
            work();
            Box::new(|_: &Tracer| StopDone::Resumed)
        });
        match tx {
            // Its finish is for no waiting thread, so `take` drops it.
            Some(tx) => {
                if let Err(mpsc::SendError((_, job))) = tx.send((Pid::from_raw(0), job)) {
                    drop(job());
                }
            }
            None => drop(job()),
        }
    }

    fn start_worker(self: &Arc<Self>, tgid: Pid) -> Option<mpsc::Sender<(Pid, Work)>> {
        let (tx, rx) = mpsc::channel::<(Pid, Work)>();
        let me: Weak<Self> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("vkrun-stops-{tgid}"))
            .spawn(move || {
                while let Ok((tid, work)) = rx.recv() {
                    let finish = work();
                    match me.upgrade() {
                        Some(me) => me.push(tid, finish),
                        None => return,
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(%tgid, "cannot start a stop worker ({e}); serving stops on the tracer");
                None
            }
        }
    }

    fn push(&self, tid: Pid, finish: Finish) {
        lock(&self.done).push((tid, finish));
        let _ = self.done_fd.write(1);
    }

    /// The finishes queued for the tracer, each with its thread, without
    /// those of threads that exited meanwhile.
    pub fn take(&self) -> Vec<(Pid, Finish)> {
        let _ = self.done_fd.read();
        let done = std::mem::take(&mut *lock(&self.done));
        let mut waiting = lock(&self.waiting);
        done.into_iter()
            .filter(|(tid, _)| waiting.remove(tid))
            .collect()
    }

    /// Thread `tid` exited: drop any finish still to come for it.
    pub fn forget_thread(&self, tid: Pid) {
        lock(&self.waiting).remove(&tid);
    }

    /// Process `tgid` is gone: its worker ends once its queue is done.
    pub fn forget_process(&self, tgid: Pid) {
        lock(&self.workers).remove(&tgid);
    }

    /// Whether `tid` is stopped with work outstanding.
    #[cfg(test)]
    fn is_waiting(&self, tid: Pid) -> bool {
        lock(&self.waiting).contains(&tid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_done(d: &Deferred, n: usize, limit: Duration) -> Vec<(Pid, Finish)> {
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < n && start.elapsed() < limit {
            got.extend(d.take());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn work_runs_off_the_caller_and_finishes_come_back_in_order_per_process() {
        let d = Arc::new(Deferred::new().expect("eventfd"));
        let caller = std::thread::current().id();
        let (a, b) = (Pid::from_raw(101), Pid::from_raw(102));
        for tid in [a, b] {
            d.submit(
                Pid::from_raw(100),
                tid,
                Box::new(move || {
                    assert_ne!(std::thread::current().id(), caller);
                    Box::new(move |_: &Tracer| StopDone::Deliver(Signal::SIGSEGV))
                }),
            );
        }
        let got: Vec<Pid> = wait_done(&d, 2, Duration::from_secs(5))
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(got, vec![a, b]);
        assert!(!d.is_waiting(a) && !d.is_waiting(b));
    }

    #[test]
    fn a_stalled_process_does_not_hold_up_another() {
        let d = Arc::new(Deferred::new().expect("eventfd"));
        let (release, stalled) = mpsc::channel::<()>();
        let stalled = Mutex::new(stalled);
        d.submit(
            Pid::from_raw(200),
            Pid::from_raw(201),
            Box::new(move || {
                let _ = lock(&stalled).recv_timeout(Duration::from_secs(5));
                Box::new(|_: &Tracer| StopDone::Resumed)
            }),
        );
        d.submit(
            Pid::from_raw(300),
            Pid::from_raw(301),
            Box::new(|| Box::new(|_: &Tracer| StopDone::Resumed)),
        );
        let first = wait_done(&d, 1, Duration::from_secs(5));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, Pid::from_raw(301));
        release.send(()).expect("worker waits");
        assert_eq!(
            wait_done(&d, 1, Duration::from_secs(5))[0].0,
            Pid::from_raw(201)
        );
    }

    #[test]
    fn the_finish_of_a_thread_that_exited_meanwhile_is_dropped() {
        let d = Arc::new(Deferred::new().expect("eventfd"));
        let tid = Pid::from_raw(401);
        let (go, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        d.submit(
            Pid::from_raw(400),
            tid,
            Box::new(move || {
                let _ = lock(&wait).recv_timeout(Duration::from_secs(5));
                Box::new(|_: &Tracer| StopDone::Resumed)
            }),
        );
        d.forget_thread(tid);
        go.send(()).expect("worker waits");
        assert!(wait_done(&d, 1, Duration::from_millis(200)).is_empty());
    }
}
