//! The notification server: the threads that receive hypercalls from the
//! user-notification listener, their pool, and the dispatch of the
//! `Notification` rows of the table (see [`super::TABLE`]).
//!
//! Lock order: `pool.parked` and `pool.threads` are held alone. The
//! threads wait on the listener (bounded by the pool's stop signal) or, in
//! a RUN, on the context's block (bounded by the waiter's poll).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{Hypercall, VkInfo};

use super::{Arrival, account, arrival};
use crate::ram::GuestRam;
use crate::stats::Stats;
use crate::sys::seccomp::{Notification, NotifyFd};
use crate::sys::signal::WAKE_SIGNAL;
use crate::sys::{kcmp, lock, proc};
use crate::trace::TraceWriter;
use crate::trace::format::format_vk_info;
use crate::tracee::remote::{self, RemoteAddr};
use crate::vmspace::Started;

/// The hypercall server: threads that block in `SECCOMP_IOCTL_NOTIF_RECV`,
/// serve each call and answer it. They need no ptrace access (the tracer is
/// the supervisor's main thread), so a hypercall costs one hand-off each
/// way.
///
/// A thread that receives a RUN stays with it until the user code traps
/// (see [`crate::run`]). Meanwhile another thread must receive if some
/// other guest task may call, and only then: every thread blocked in RECV
/// wakes on every notification (the kernel's wait there is not exclusive),
/// so a second one idle there would cost each call two context switches.
/// So the pool counts the threads available to receive (all but those
/// waiting for a RUN and the parked ones), the RUNs waited for and the
/// guest tasks (the tracer keeps that count), wakes a parked thread or
/// starts one when a RUN leaves none available and another task may call,
/// and parks a thread that finishes a RUN while another is available. A
/// RUN's waiter also checks, each time its wait times out, that no
/// notification is left without a receiver.
#[derive(Debug)]
pub struct Server {
    pub ram: Arc<GuestRam>,
    pub notify: Arc<NotifyFd>,
    pub stats: Arc<Stats>,
    pub trace: Arc<Mutex<TraceWriter>>,
    /// MAP_VPAGETABLE state (for `mcontrol`).
    pub vpt: Arc<crate::vpt::Vpt>,
    /// The guest's vmspaces (RUN, `vmspace_mcontrol`, pread, pwrite).
    pub vmspaces: Arc<crate::vmspace::Vmspaces>,
    /// Last descriptor number at which the RAM memfd was found in a guest.
    pub ram_fd_guess: AtomicI32,
    pub pool: Pool,
}

/// The server's threads (see [`Server`]).
#[derive(Debug, Default)]
pub struct Pool {
    /// Set when the supervision ends.
    stop: AtomicBool,
    /// Threads receiving, or serving a call other than a RUN (they receive
    /// next).
    available: AtomicUsize,
    /// Threads waiting for a RUN's user code.
    running: AtomicUsize,
    /// Guest tasks, as the tracer counts them.
    guest_tasks: AtomicUsize,
    /// Parked threads, and how many of them are wanted back.
    parked: Mutex<(usize, usize)>,
    unpark: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Server {
    /// Start the first thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        self.pool.available.fetch_add(1, Ordering::AcqRel);
        self.spawn_receiver()
    }

    /// A new thread that starts by receiving (already counted available).
    fn spawn_receiver(self: &Arc<Self>) -> std::io::Result<()> {
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("vkrun-hypercall".into())
            .spawn(move || me.serve())?;
        lock(&self.pool.threads).push(thread);
        Ok(())
    }

    /// The tracer's count of guest tasks changed, or a guest task may be
    /// about to call while the threads are busy (a signal stop): make sure
    /// a thread receives if one may be needed.
    pub fn on_guest_tasks(self: &Arc<Self>, tasks: usize, signal_stop: bool) {
        let pool = &self.pool;
        pool.guest_tasks.store(tasks, Ordering::Release);
        if signal_stop {
            // The stopped task may restart a RUN whose run is in flight.
            if pool.available.load(Ordering::Acquire) == 0 {
                self.add_receiver();
            }
        } else {
            self.receiver_if_needed();
        }
    }

    /// Add a receiver if none is available and a guest task that is not
    /// inside a RUN may call.
    fn receiver_if_needed(self: &Arc<Self>) {
        let pool = &self.pool;
        if pool.available.load(Ordering::Acquire) == 0
            && pool.guest_tasks.load(Ordering::Acquire) > pool.running.load(Ordering::Acquire)
        {
            self.add_receiver();
        }
    }

    /// One more thread available: a parked one if any, else a new one.
    fn add_receiver(self: &Arc<Self>) {
        let pool = &self.pool;
        pool.available.fetch_add(1, Ordering::AcqRel);
        let mut parked = lock(&pool.parked);
        if parked.0 > parked.1 {
            parked.1 += 1;
            pool.unpark.notify_one();
            return;
        }
        drop(parked);
        if let Err(e) = self.spawn_receiver() {
            pool.available.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("no thread for more hypercalls: {e}");
        }
    }

    /// Park until wanted as a receiver (true) or the pool stops (false).
    fn park(&self) -> bool {
        let pool = &self.pool;
        let mut parked = lock(&pool.parked);
        parked.0 += 1;
        while parked.1 == 0 && !pool.stop.load(Ordering::Acquire) {
            parked = pool
                .unpark
                .wait(parked)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        parked.0 -= 1;
        if parked.1 > 0 {
            parked.1 -= 1;
            return true;
        }
        false
    }

    /// After a RUN: receive again (true), unless another thread is
    /// available: then park until wanted (true) or the pool stops (false).
    fn receive_again(&self) -> bool {
        let pool = &self.pool;
        if pool
            .available
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return true;
        }
        self.park()
    }

    /// Stop every thread: set the flag, unpark the parked ones and interrupt
    /// the others' blocking calls (with [`WAKE_SIGNAL`]) until they notice,
    /// which they do within one receive or one poll of a RUN's wait.
    pub fn stop(&self) {
        let pool = &self.pool;
        pool.stop.store(true, Ordering::Release);
        {
            let _parked = lock(&pool.parked);
            pool.unpark.notify_all();
        }
        loop {
            let threads = std::mem::take(&mut *lock(&pool.threads));
            if threads.is_empty() {
                return;
            }
            for t in threads {
                while !t.is_finished() {
                    let _ = nix::sys::pthread::pthread_kill(
                        std::os::unix::thread::JoinHandleExt::as_pthread_t(&t),
                        WAKE_SIGNAL,
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
                let _ = t.join();
            }
        }
    }

    /// One thread of the pool, counted available when it starts: serve
    /// hypercalls until the pool stops, no guest task is left, or the
    /// listener fails.
    fn serve(self: &Arc<Self>) {
        let stop = &self.pool.stop;
        let (set, durations) = {
            let trace = lock(&self.trace);
            (*trace.set(), trace.wants_durations())
        };
        while !stop.load(Ordering::Acquire) {
            let n = match self.notify.recv() {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                // The caller died before we received it, or no task uses
                // the filter any more (then RECV fails at once, forever).
                Err(Errno::ENOENT) => {
                    if self.notify.orphaned() {
                        return;
                    }
                    continue;
                }
                Err(errno) => {
                    tracing::warn!(%errno, "SECCOMP_IOCTL_NOTIF_RECV failed, no more hypercalls");
                    return;
                }
            };
            crate::sys::fatal::test_panic_point("hypercall");
            let h = Hypercall::from_nr(n.nr);
            let traced = set.hypercall(h);
            let when = traced.then(SystemTime::now);
            let started = (traced && durations).then(Instant::now);
            let mut shown = None;
            let result = match h {
                Some(Hypercall::VmspaceCtl) => match self.vmspaces.ctl(&n) {
                    Started::Done(r) => r,
                    Started::Nothing => continue,
                    Started::Wait(waiter) => {
                        self.pool.available.fetch_sub(1, Ordering::AcqRel);
                        self.pool.running.fetch_add(1, Ordering::AcqRel);
                        self.receiver_if_needed();
                        waiter.finish(stop, || {
                            if self.pool.available.load(Ordering::Acquire) == 0
                                && self.notify.pending()
                            {
                                self.add_receiver();
                            }
                        });
                        self.pool.running.fetch_sub(1, Ordering::AcqRel);
                        if !self.receive_again() {
                            return;
                        }
                        continue;
                    }
                },
                _ => {
                    let (result, wrote) = self.call(h, &n);
                    shown = wrote.filter(|_| traced);
                    result
                }
            };
            // Traced before answering, so the line precedes anything the
            // guest does next (its exit line in particular).
            let took = started.map(|s| s.elapsed());
            account(
                &self.trace,
                &self.stats,
                n.tid,
                h,
                n.nr,
                n.args,
                result,
                when,
                took,
                shown.as_deref(),
            );
            match self.notify.respond(n.id, result) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(errno) => {
                    tracing::warn!(%errno, tid = n.tid, "SECCOMP_IOCTL_NOTIF_SEND failed");
                }
            }
        }
    }

    /// The dispatch of the `Notification` rows of the table (but RUN, which
    /// [`Server::serve`] waits for): serve notification `n` (a number in the
    /// hypercall range) and return the guest-visible result. Unknown
    /// numbers answer `ENOSYS`. With the result comes, for a call that
    /// fills a struct, the call as the trace shows it (the struct written).
    fn call(&self, h: Option<Hypercall>, n: &Notification) -> (Result<i64, Errno>, Option<String>) {
        if arrival(h) != Arrival::Notification {
            return (Err(Errno::ENOSYS), None); // the filter never sends these here
        }
        let result = match h {
            Some(Hypercall::VkInfo) => {
                return match self.vk_info(n) {
                    Ok((info, len)) => (Ok(0), Some(format_vk_info(n.args, &info, len))),
                    Err(e) => (Err(e), None),
                };
            }
            Some(Hypercall::Mcontrol) => self.vpt.mcontrol(Pid::from_raw(n.tid), n.args),
            Some(Hypercall::VmspaceMcontrol) => self.vmspaces.mcontrol(n.args),
            Some(Hypercall::VmspacePread) => self.vmspaces.prw(Pid::from_raw(n.tid), n.args, false),
            Some(Hypercall::VmspacePwrite) => self.vmspaces.prw(Pid::from_raw(n.tid), n.args, true),
            _ => Err(Errno::ENOSYS),
        };
        (result, None)
    }

    /// `vk_info(out, size)`: copy `min(size, 48)` bytes of [`VkInfo`];
    /// returns the struct and how many bytes of it were written.
    fn vk_info(&self, n: &Notification) -> Result<(VkInfo, usize), Errno> {
        let tid = Pid::from_raw(n.tid);
        let out = RemoteAddr(n.args[0]);
        let size = n.args[1];
        let info = VkInfo {
            abi_version: vkabi::VK_ABI_VERSION,
            page_size: vkabi::PAGE_SIZE as u32,
            ram_fd: self.ram_fd_in(tid, n.id)?,
            vpte_levels: vkabi::VPTE_LEVELS,
            ram_size: self.ram.size(),
            user_max: vkabi::USER_MAX,
            reserved: [0; 2],
        };
        let bytes = info.to_bytes();
        let len = usize::try_from(size).unwrap_or(usize::MAX).min(bytes.len());
        // The caller may have died and its tid been reused since the
        // notification arrived: only write while the call is still pending.
        if !self.notify.id_valid(n.id) {
            return Err(Errno::ESRCH);
        }
        remote::write_bytes(tid, out, &bytes[..len])?;
        Ok((info, len))
    }

    /// The number of the RAM memfd in the caller's descriptor table. If the
    /// caller no longer has it (closed it, or a `close_fds` parent dropped
    /// it), a new descriptor is installed: the guest is entitled to its RAM.
    fn ram_fd_in(&self, tid: Pid, id: u64) -> Result<i32, Errno> {
        let ours = self.ram.as_fd();
        let guess = self.ram_fd_guess.load(Ordering::Relaxed);
        if guess >= 0 && kcmp::same_file(ours, tid, guess) == Ok(true) {
            return Ok(guess);
        }
        let found = proc::fds(tid)
            .into_iter()
            .find(|&fd| kcmp::same_file(ours, tid, fd) == Ok(true));
        let fd = match found {
            Some(fd) => fd,
            None => {
                let fd = self.notify.add_fd(id, ours, false)?;
                tracing::debug!(%tid, fd, "installed the RAM memfd in a guest that had none");
                fd
            }
        };
        self.ram_fd_guess.store(fd, Ordering::Relaxed);
        Ok(fd)
    }
}
