//! vmspaces (ABI section 7): the registry of a guest's vmspaces and their
//! stub processes.
//!
//! One host process per vmspace: a stub (see [`crate::sys::stub`]) forked
//! and seized by the tracer thread, stopped on `int3` with nothing mapped
//! below `USER_MAX` until the vkernel fills it. The registry is one per vkrun
//! run, so every process of the guest (a forked guest included) shares it.
//! All stubs are killed when the guest's last process is gone, and
//! `PTRACE_O_EXITKILL` and the stubs' parent-death signal kill them if vkrun
//! dies.
//!
//! `vmspace_create` and `vmspace_destroy` arrive as `SECCOMP_RET_TRACE`
//! stops, served on the tracer thread (which alone may trace the stubs).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::stats::Stats;
use crate::sys::stub::{self, STUB_LEN};

/// One vmspace: its stub and the region the stub runs from.
#[derive(Debug)]
struct Vmspace {
    stub: Pid,
    /// vkrun's mapping of the stub's region (code, stack).
    _region: MmapRaw,
}

/// The guest's vmspaces, by id.
#[derive(Debug)]
pub struct Vmspaces {
    stats: Arc<Stats>,
    by_id: Mutex<HashMap<u64, Vmspace>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Vmspaces {
    /// No vmspace yet.
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// `vmspace_create(id, type, data)`: a new, empty vmspace named `id`.
    /// Precondition: called on the tracer thread.
    pub fn create(&self, id: u64) -> Result<i64, Errno> {
        if id == 0 {
            return Err(Errno::EINVAL);
        }
        if lock(&self.by_id).contains_key(&id) {
            return Err(Errno::EEXIST);
        }
        let vmspace = spawn()?;
        lock(&self.by_id).insert(id, vmspace);
        self.stats.vmspaces_created.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    /// `vmspace_destroy(id)`: kill the stub and forget the vmspace.
    /// Precondition: called on the tracer thread.
    pub fn destroy(&self, id: u64) -> Result<i64, Errno> {
        if id == 0 {
            return Err(Errno::EINVAL);
        }
        let vmspace = lock(&self.by_id).remove(&id).ok_or(Errno::ENOENT)?;
        reap(vmspace.stub);
        self.stats
            .vmspaces_destroyed
            .fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    /// Destroy every vmspace (the guest's last process is gone).
    pub fn destroy_all(&self) {
        let all: Vec<(u64, Vmspace)> = lock(&self.by_id).drain().collect();
        for (_, vmspace) in all {
            reap(vmspace.stub);
            self.stats
                .vmspaces_destroyed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `pid` is a stub (its wait statuses are not the guest's).
    pub fn is_stub(&self, pid: Pid) -> bool {
        lock(&self.by_id).values().any(|v| v.stub == pid)
    }

    /// Whether any vmspace exists.
    pub fn is_empty(&self) -> bool {
        lock(&self.by_id).is_empty()
    }

    /// A stub changed state outside a RUN: it only ever dies that way (its
    /// signals are blocked). Forget it; the vmspace stays, broken, until
    /// destroyed.
    pub fn on_stub_status(&self, pid: Pid, status: WaitStatus) {
        match status {
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                tracing::warn!(%pid, ?status, "a vmspace stub died");
            }
            // Keep it stopped where it is.
            _ => {}
        }
    }
}

/// Make a stub: its region (the stub code), the fork, the seize, and the
/// wait for its `int3`.
fn spawn() -> Result<Vmspace, Errno> {
    let memfd = File::from(memfd_create(c"vkrun-stub", MFdFlags::MFD_CLOEXEC)?);
    memfd.set_len(STUB_LEN).map_err(|_| Errno::ENOMEM)?;
    let region = MmapOptions::new()
        .len(STUB_LEN as usize)
        .map_raw(&memfd)
        .map_err(|_| Errno::ENOMEM)?;
    let code = stub::code();
    // SAFETY: our fresh mapping of STUB_LEN bytes; the code is shorter.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), region.as_mut_ptr(), code.len()) };
    let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pid = stub::fork_stub(memfd.as_fd(), go_read.as_fd())?;
    drop(go_read);
    if let Err(errno) = ptrace::seize(pid, Options::PTRACE_O_EXITKILL) {
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
    Ok(Vmspace {
        stub: pid,
        _region: region,
    })
}

/// Kill a stub and collect it.
fn reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}
