//! Serving hypercalls: the server thread, the handlers, and the rendering of
//! each call for the trace.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::unistd::Pid;
use vkabi::{Hypercall, VkInfo};

use crate::lock;
use crate::ram::GuestRam;
use crate::remote::{self, RemoteAddr};
use crate::run::Started;
use crate::stats::Stats;
use crate::sys::kcmp;
use crate::sys::seccomp::{Notification, NotifyFd};
use crate::sys::signal::WAKE_SIGNAL;
use crate::trace::{self, TraceWriter, format_flags};

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
            let h = Hypercall::from_nr(n.nr);
            let traced = set.hypercall(h);
            let when = traced.then(SystemTime::now);
            let started = (traced && durations).then(Instant::now);
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
                _ => self.call(h, &n),
            };
            self.stats.count_hypercall(h, result.is_err());
            // Trace before answering, so the line precedes anything the
            // guest does next (its exit line in particular).
            if let Some(when) = when {
                let text = format!(
                    "{} {}",
                    format_call(h, &n),
                    trace::format_result(result, returns_address(h))
                );
                let took = started.map(|s| s.elapsed());
                let mut trace = lock(&self.trace);
                trace.line(n.tid, when, &text, took);
            }
            match self.notify.respond(n.id, result) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(errno) => {
                    tracing::warn!(%errno, tid = n.tid, "SECCOMP_IOCTL_NOTIF_SEND failed");
                }
            }
        }
    }

    /// Serve notification `n` (a number in the hypercall range) and return
    /// the guest-visible result. Hypercalls of later milestones answer
    /// `ENOSYS`, as do unknown numbers.
    fn call(&self, h: Option<Hypercall>, n: &Notification) -> Result<i64, Errno> {
        match h {
            Some(Hypercall::VkInfo) => self.vk_info(n),
            Some(Hypercall::Mcontrol) => self.vpt.mcontrol(Pid::from_raw(n.tid), n.args),
            Some(Hypercall::VmspaceMcontrol) => self.vmspaces.mcontrol(n.args),
            Some(Hypercall::VmspacePread) => self.vmspaces.prw(Pid::from_raw(n.tid), n.args, false),
            Some(Hypercall::VmspacePwrite) => self.vmspaces.prw(Pid::from_raw(n.tid), n.args, true),
            _ => Err(Errno::ENOSYS),
        }
    }

    /// `vk_info(out, size)`: copy `min(size, 48)` bytes of [`VkInfo`].
    fn vk_info(&self, n: &Notification) -> Result<i64, Errno> {
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
        Ok(0)
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
        let found = std::fs::read_dir(format!("/proc/{tid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&fd| kcmp::same_file(ours, tid, fd) == Ok(true));
        let fd = match found {
            Some(fd) => fd,
            None => {
                let fd = self.notify.add_fd(id, ours)?;
                tracing::debug!(%tid, fd, "installed the RAM memfd in a guest that had none");
                fd
            }
        };
        self.ram_fd_guess.store(fd, Ordering::Relaxed);
        Ok(fd)
    }
}

const PROT_NAMES: &[(u64, &str)] = &[(1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")];

const MAP_NAMES: &[(u64, &str)] = &[
    (0x01, "MAP_SHARED"),
    (0x02, "MAP_PRIVATE"),
    (0x10, "MAP_FIXED"),
    (0x20, "MAP_ANONYMOUS"),
    (vkabi::MAP_VPAGETABLE as u64, "MAP_VPAGETABLE"),
    (0x4000, "MAP_NORESERVE"),
    (0x8000, "MAP_POPULATE"),
    (vkabi::MAP_STACK as u64, "MAP_STACK"),
    (0x10_0000, "MAP_FIXED_NOREPLACE"),
];

/// DragonFly's `madvise`/`mcontrol` behaviours by value.
fn madv_name(behav: u64) -> String {
    const NAMES: [&str; 12] = [
        "MADV_NORMAL",
        "MADV_RANDOM",
        "MADV_SEQUENTIAL",
        "MADV_WILLNEED",
        "MADV_DONTNEED",
        "MADV_FREE",
        "MADV_NOSYNC",
        "MADV_AUTOSYNC",
        "MADV_NOCORE",
        "MADV_CORE",
        "MADV_INVAL",
        "MADV_SETMAP",
    ];
    match NAMES.get(behav as usize) {
        Some(name) => (*name).to_owned(),
        None => format!("{:#x}", behav as i32),
    }
}

fn ptr(v: u64) -> String {
    if v == 0 {
        "NULL".to_owned()
    } else {
        format!("{v:#x}")
    }
}

/// The call as strace would print it: `vk_info(0x7ffd..., 48)`.
pub fn format_call(h: Option<Hypercall>, n: &Notification) -> String {
    let a = n.args;
    let int = |v: u64| (v as i32).to_string();
    let prot = |v: u64| format_flags(v & 0xffff_ffff, PROT_NAMES, "PROT_NONE");
    let flags = |v: u64| format_flags(v & 0xffff_ffff, MAP_NAMES, "0");
    let value = |behav: u64, v: u64| {
        if behav == vkabi::MADV_SETMAP as u64 {
            vpte::Vpte(v).to_string()
        } else {
            format!("{v:#x}")
        }
    };
    let Some(h) = h else {
        let mut s = format!("syscall_{:#x}(", n.nr);
        for (i, v) in a.iter().enumerate() {
            let _ = write!(s, "{}{v:#x}", if i == 0 { "" } else { ", " });
        }
        s.push(')');
        return s;
    };
    let args = match h {
        Hypercall::VkInfo => format!("{}, {}", ptr(a[0]), a[1]),
        Hypercall::VkMmap => format!(
            "{}, {}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            a[1],
            prot(a[2]),
            flags(a[3]),
            int(a[4]),
            a[5]
        ),
        Hypercall::Mcontrol => format!(
            "{}, {}, {}, {}",
            ptr(a[0]),
            a[1],
            madv_name(a[2] & 0xffff_ffff),
            value(a[2], a[3])
        ),
        Hypercall::VmspaceCreate => format!("{}, {}, {}", ptr(a[0]), int(a[1]), ptr(a[2])),
        Hypercall::VmspaceDestroy => ptr(a[0]),
        Hypercall::VmspaceCtl => {
            let cmd = if a[1] as i32 == vkabi::VMSPACE_CTL_RUN {
                "VMSPACE_CTL_RUN".to_owned()
            } else {
                int(a[1])
            };
            format!("{}, {cmd}, {}, {}", ptr(a[0]), ptr(a[2]), ptr(a[3]))
        }
        Hypercall::VmspaceMmap => format!(
            "{}, {}, {}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            ptr(a[1]),
            a[2],
            prot(a[3] & 0xffff_ffff),
            flags(a[3] >> 32),
            int(a[4]),
            a[5]
        ),
        Hypercall::VmspaceMunmap => format!("{}, {}, {}", ptr(a[0]), ptr(a[1]), a[2]),
        Hypercall::VmspaceMcontrol => format!(
            "{}, {}, {}, {}, {}",
            ptr(a[0]),
            ptr(a[1]),
            a[2],
            madv_name(a[3] & 0xffff_ffff),
            value(a[3], a[4])
        ),
        Hypercall::VmspacePread | Hypercall::VmspacePwrite => format!(
            "{}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            ptr(a[1]),
            a[2],
            int(a[3]),
            a[4]
        ),
    };
    format!("{}({args})", h.name())
}

/// Trace a hypercall served at a seccomp stop (on the tracer thread), if
/// it is traced, and count it.
pub fn account_stop_call(
    trace: &Mutex<TraceWriter>,
    stats: &Stats,
    tid: i32,
    nr: u64,
    args: [u64; 6],
    result: Result<i64, Errno>,
    when: SystemTime,
) {
    let h = Hypercall::from_nr(nr);
    stats.count_hypercall(h, result.is_err());
    let mut trace = lock(trace);
    if trace.set().hypercall(h) {
        let n = Notification {
            id: 0,
            tid,
            nr,
            args,
        };
        let text = format!(
            "{} {}",
            format_call(h, &n),
            trace::format_result(result, returns_address(h))
        );
        trace.line(tid, when, &text, None);
    }
}

/// Whether `h` returns an address (printed in hex).
pub fn returns_address(h: Option<Hypercall>) -> bool {
    matches!(h, Some(Hypercall::VkMmap | Hypercall::VmspaceMmap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notif(nr: u64, args: [u64; 6]) -> Notification {
        Notification {
            id: 1,
            tid: 1,
            nr,
            args,
        }
    }

    #[test]
    fn calls_are_decoded_symbolically() {
        let n = notif(Hypercall::VkInfo.nr(), [0x7ffd_0000_1000, 48, 0, 0, 0, 0]);
        assert_eq!(
            format_call(Some(Hypercall::VkInfo), &n),
            "vk_info(0x7ffd00001000, 48)"
        );
        let n = notif(Hypercall::VkMmap.nr(), [0, 8192, 3, 0x2001, 3, 0]);
        assert_eq!(
            format_call(Some(Hypercall::VkMmap), &n),
            "vk_mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_VPAGETABLE, 3, 0x0)"
        );
        let n = notif(Hypercall::Mcontrol.nr(), [0x1000, 4096, 11, 0x5023, 0, 0]);
        assert_eq!(
            format_call(Some(Hypercall::Mcontrol), &n),
            "mcontrol(0x1000, 4096, MADV_SETMAP, V|RW|A frame=0x5000)"
        );
        let packed = vkabi::vmspace_mmap_prot_flags(1, 0x22);
        let n = notif(
            Hypercall::VmspaceMmap.nr(),
            [7, 0x400000, 4096, packed, -1i64 as u64, 0],
        );
        assert_eq!(
            format_call(Some(Hypercall::VmspaceMmap), &n),
            "vmspace_mmap(0x7, 0x400000, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0x0)"
        );
        let n = notif(vkabi::VK_SYS_BASE + 1, [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            format_call(None, &n),
            "syscall_0xdf00001(0x1, 0x2, 0x3, 0x4, 0x5, 0x6)"
        );
    }
}
