//! EXECUTION CONTEXTS and the vmspace registry (ABI section 7): a guest's
//! vmspaces, their stub processes ([`space`]), what is mapped in them
//! ([`mappings`]), their execution contexts ([`context`]), RUN ([`run`])
//! and why control comes back from user code ([`exit`]).
//!
//! One host process per vmspace: a stub (see [`crate::sys::stub`]) forked
//! and seized by the tracer thread, its main thread stopped on `int3` with
//! nothing mapped below `USER_MAX` until the vkernel fills it. The registry
//! is one per vkrun run, so every process of the guest (a forked guest
//! included) shares it. All stubs are killed when the guest's last process
//! is gone, and `PTRACE_O_EXITKILL` and the stubs' parent-death signal kill
//! them if vkrun dies. The address space of a stub is a `vpt` address
//! space like a guest process's; the execution side answers its faults
//! through [`ContextFaults`].
//!
//! Who does what:
//! - the tracer thread (which alone may ptrace the stubs: the functions
//!   take a [`Tracer`]) creates and destroys vmspaces, maps and unmaps in
//!   them (system calls injected in the stub's main thread), and creates
//!   execution contexts on request of a hypercall thread
//!   ([`Vmspaces::run_jobs`]);
//! - hypercall threads serve RUN, `vmspace_mcontrol` (through the stub's
//!   agent) and `vmspace_pread`/`vmspace_pwrite` (through RAM, the page
//!   tables, or the stub's memory).
//!
//! Lock order: `by_id`, `stub_tids` and `jobs` are each held alone (never
//! across a call into a vmspace); then a vmspace's locks (see
//! [`Vmspace`]), then a context's, then `vpt`'s.

mod context;
mod exit;
mod mappings;
mod run;
mod space;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::ptrace;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::error::TraceeError;
use crate::ram::GuestRam;
use crate::stats::Stats;
use crate::sys::seccomp::{self, Notification, NotifyFd};
use crate::sys::stub::{
    self, CONTEXTS, CTX_SIZE, CX_ADDR, CX_ALTSTACK, CX_CTX_TID, CX_ENTRY_STACK, CX_LISTENER,
    CX_NOTIF, CX_NOTIF_ID, CX_SEQ, CX_SIG, CX_SIGSTACK, CX_STATE, CX_STUB_PID, STATE_WAIT,
    STUB_BASE,
};
use crate::sys::{futex, lock, proc};
use crate::tracee::Tracer;
use crate::tracee::inject::{Injector, clone_args};
use crate::vpt::{ContextFaults, Vpt};

use context::{Context, OnInterrupted};
pub use run::{Interrupted, RunEnv, Started};
use space::{Vmspace, reap};

/// What the tracer did to make a context.
enum NewContext {
    /// Another RUN made it meanwhile.
    Existing(Arc<Context>),
    /// Its thread is cloned in block `slot`; it has yet to report ready.
    Started { slot: usize, tid: Pid },
}

/// How long a new context may take to report ready.
const CONTEXT_START: Duration = Duration::from_secs(5);
/// How long the hypercall thread waits for the tracer to make a context.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);
/// Flags of a context thread: a thread of the stub, not traced (its
/// signals go to its handler, not to vkrun).
const CONTEXT_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_UNTRACED) as u64;

/// Work the hypercall thread hands to the tracer thread.
struct Job(Box<dyn FnOnce(&Tracer) + Send>);

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// The guest's vmspaces, by id.
#[derive(Debug)]
pub struct Vmspaces {
    stats: Arc<Stats>,
    vpt: Arc<Vpt>,
    ram: Arc<GuestRam>,
    by_id: Mutex<HashMap<u64, Arc<Vmspace>>>,
    /// Every traced thread of a stub (main and agent threads), to its stub.
    stub_tids: Mutex<HashMap<Pid, Pid>>,
    /// How RUN answers (set when the guest starts).
    env: OnceLock<Arc<RunEnv>>,
    jobs: Mutex<Vec<Job>>,
    jobs_fd: EventFd,
}

impl Vmspaces {
    /// No vmspace yet.
    pub fn new(stats: Arc<Stats>, vpt: Arc<Vpt>, ram: Arc<GuestRam>) -> Result<Self, Errno> {
        Ok(Self {
            stats,
            vpt,
            ram,
            by_id: Mutex::new(HashMap::new()),
            stub_tids: Mutex::new(HashMap::new()),
            env: OnceLock::new(),
            jobs: Mutex::new(Vec::new()),
            jobs_fd: EventFd::from_value_and_flags(
                0,
                EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
            )?,
        })
    }

    /// Where RUN answers go (the guest's listener, once it has started).
    pub fn set_env(&self, env: Arc<RunEnv>) {
        let _ = self.env.set(env);
    }

    /// The descriptor the tracer polls for jobs.
    pub fn jobs_fd(&self) -> BorrowedFd<'_> {
        self.jobs_fd.as_fd()
    }

    /// Run the jobs the hypercall thread queued.
    pub fn run_jobs(&self, tracer: &Tracer) {
        let _ = self.jobs_fd.read();
        let jobs = std::mem::take(&mut *lock(&self.jobs));
        for Job(job) in jobs {
            job(tracer);
        }
    }

    /// Run `f` on the tracer thread and wait for its result.
    fn on_tracer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tracer) -> T + Send + 'static,
    ) -> Result<T, Errno> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.queue(Job(Box::new(move |tracer| {
            let _ = tx.send(f(tracer));
        })));
        rx.recv_timeout(JOB_TIMEOUT).map_err(|_| Errno::EAGAIN)
    }

    fn get(&self, id: u64) -> Result<Arc<Vmspace>, Errno> {
        if id == 0 {
            return Err(Errno::EINVAL);
        }
        lock(&self.by_id).get(&id).cloned().ok_or(Errno::ENOENT)
    }

    /// `vmspace_create(id, type, data)`: a new, empty vmspace named `id`.
    pub fn create(&self, tracer: &Tracer, id: u64) -> Result<i64, Errno> {
        if id == 0 {
            return Err(Errno::EINVAL);
        }
        if lock(&self.by_id).contains_key(&id) {
            return Err(Errno::EEXIST);
        }
        if !stub::fsgsbase_available() {
            tracing::warn!("vmspaces need FSGSBASE (Linux 5.9+ on a CPU that has it)");
            return Err(Errno::EOPNOTSUPP);
        }
        let (stub, region) = space::spawn(tracer)?;
        let vm = Arc::new(Vmspace::new(id, stub, region, Arc::clone(&self.stats)));
        lock(&self.stub_tids).insert(stub, stub);
        lock(&self.by_id).insert(id, vm);
        self.stats.vmspaces_created.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    /// `vmspace_destroy(id)`: kill the stub and forget the vmspace; `EBUSY`
    /// while a guest thread is inside RUN in it.
    pub fn destroy(&self, tracer: &Tracer, id: u64) -> Result<i64, Errno> {
        let vm = self.get(id)?;
        {
            let mut gone = vm.gone.write().unwrap_or_else(PoisonError::into_inner);
            let contexts = lock(&vm.contexts);
            // The fast path first closes, then the busy words are read: a
            // fast RUN's wrapper says busy before it looks whether the
            // block is open, so either it sees it closed (and takes the
            // hypercall, which finds the vmspace gone) or destroy sees it
            // busy.
            let offered: Vec<&Arc<Context>> =
                contexts.values().filter(|c| c.close_fast()).collect();
            if contexts.values().any(|c| c.busy() || c.fast_busy()) {
                offered.iter().for_each(|c| c.open_fast());
                return Err(Errno::EBUSY);
            }
            *gone = true;
        }
        lock(&self.by_id).remove(&id);
        self.teardown(tracer, &vm);
        Ok(0)
    }

    /// Run `f` on vmspace `id` while it cannot be destroyed; `ENOENT` if it
    /// does not exist (any more).
    fn with_live<T>(&self, vm: &Vmspace, f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
        let gone = vm.gone.read().unwrap_or_else(PoisonError::into_inner);
        if *gone {
            return Err(Errno::ENOENT);
        }
        let result = f();
        drop(gone);
        result
    }

    /// Destroy every vmspace (the guest's last process is gone).
    pub fn destroy_all(&self, tracer: &Tracer) {
        let all: Vec<Arc<Vmspace>> = lock(&self.by_id).drain().map(|(_, v)| v).collect();
        for vm in all {
            self.teardown(tracer, &vm);
        }
    }

    fn teardown(&self, _: &Tracer, vm: &Vmspace) {
        *vm.gone.write().unwrap_or_else(PoisonError::into_inner) = true;
        vm.set_dead();
        for ctx in lock(&vm.contexts).drain().map(|(_, c)| c) {
            ctx.close();
        }
        // Collect its traced threads (agent threads) before the leader: a
        // traced thread group's leader is reported only after them.
        let threads: Vec<Pid> = {
            let mut tids = lock(&self.stub_tids);
            let mine: Vec<Pid> = tids
                .iter()
                .filter(|&(t, s)| *s == vm.stub && *t != vm.stub)
                .map(|(t, _)| *t)
                .collect();
            tids.retain(|_, s| *s != vm.stub);
            mine
        };
        let _ = kill(vm.stub, Signal::SIGKILL);
        for tid in threads {
            reap(tid);
            self.vpt.take_agent(tid);
        }
        reap(vm.stub);
        self.vpt.forget(vm.stub);
        self.stats
            .vmspaces_destroyed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Every vmspace: its id, its stub process and how many guest threads
    /// have an execution context in it (for `monitor vmspaces`).
    pub fn list(&self) -> Vec<(u64, Pid, usize)> {
        let mut all: Vec<(u64, Pid, usize)> = lock(&self.by_id)
            .values()
            .map(|vm| (vm.id, vm.stub, lock(&vm.contexts).len()))
            .collect();
        all.sort_unstable();
        all
    }

    /// Whether `pid` is a traced thread of a stub (its wait statuses are not
    /// the guest's).
    pub fn is_stub(&self, pid: Pid) -> bool {
        lock(&self.stub_tids).contains_key(&pid)
    }

    /// Whether any vmspace exists.
    pub fn is_empty(&self) -> bool {
        lock(&self.by_id).is_empty()
    }

    /// A stub thread changed state outside an injection. Stubs only ever
    /// die that way (their signals are blocked); agent threads exit with
    /// their stub. A dead stub makes its vmspace fail every RUN (`EIO`)
    /// until destroyed.
    pub fn on_stub_status(&self, _: &Tracer, pid: Pid, status: WaitStatus) {
        match status {
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                let stub = lock(&self.stub_tids).remove(&pid);
                self.vpt.take_agent(pid);
                if stub == Some(pid) {
                    let vm = lock(&self.by_id).values().find(|v| v.stub == pid).cloned();
                    if let Some(vm) = vm
                        && !vm.is_dead()
                    {
                        tracing::warn!(%pid, ?status, vmspace = format_args!("{:#x}", vm.id), "a vmspace stub died");
                        vm.mark_dead();
                    }
                }
            }
            WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..) if pid != self.stub_of(pid) => {
                // An agent thread (signals blocked): let it go on.
                let _ = ptrace::cont(pid, None);
            }
            // The main thread stays stopped where it is.
            _ => {}
        }
    }

    fn stub_of(&self, tid: Pid) -> Pid {
        lock(&self.stub_tids).get(&tid).copied().unwrap_or(tid)
    }

    /// Guest thread `tid` exited: end its contexts.
    pub fn forget_thread(&self, tid: Pid) {
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        for vm in vms {
            if let Some(ctx) = lock(&vm.contexts).remove(&tid) {
                ctx.close();
            }
        }
    }

    /// Guest thread `tid` is in a signal-delivery-stop with `rax` = `ret`:
    /// whether that interrupted a RUN, and what RUN returns instead. For
    /// [`Interrupted::Later`], `resume` runs on the tracer thread with the
    /// value once the context has reported; the thread stays stopped until
    /// then.
    pub fn on_guest_signal(
        self: &Arc<Self>,
        tid: Pid,
        ret: i64,
        resume: impl FnOnce(&Tracer, i64) + Send + 'static,
    ) -> Interrupted {
        if self.is_empty() {
            return Interrupted::NotConcerned;
        }
        let Some(env) = self.env.get() else {
            return Interrupted::NotConcerned;
        };
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        for vm in vms {
            let ctx = lock(&vm.contexts).get(&tid).cloned();
            if let Some(ctx) = ctx
                && ctx.busy()
            {
                let me = Arc::downgrade(self);
                let then = OnInterrupted(Box::new(move |value| {
                    if let Some(me) = me.upgrade() {
                        me.queue(Job(Box::new(move |tracer| resume(tracer, value))));
                    }
                }));
                return run::interrupt(&ctx, ret, &env.trace, then);
            }
        }
        Interrupted::NotConcerned
    }

    /// Guest thread `tid` is in a signal-delivery-stop for a signal it
    /// handles: if it is inside a fast RUN, kick the run's user code out
    /// and hold the signal until RUN has returned (the thread's signals
    /// are blocked; its wrapper restores the mask once `tf` is written,
    /// and the kernel delivers what waited, in order). The caller then
    /// resumes the thread with the signal, which the kernel queues again
    /// as it is blocked. Whether it was.
    pub fn hold_for_fast_run(&self, tracer: &Tracer, tid: Pid) -> bool {
        if self.is_empty() {
            return false;
        }
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        for vm in vms {
            let ctx = lock(&vm.contexts).get(&tid).cloned();
            if let Some(ctx) = ctx
                && ctx.fast_busy()
            {
                return run::hold(tracer, &ctx);
            }
        }
        false
    }

    /// Queue `job` for the tracer thread (never waits).
    fn queue(&self, job: Job) {
        lock(&self.jobs).push(job);
        let _ = self.jobs_fd.write(1);
    }

    // ----- RUN (hypercall thread) -----

    /// `vmspace_ctl(id, cmd, tf, vf)`: the answer, or the run to wait for.
    pub fn ctl(self: &Arc<Self>, n: &Notification) -> Started {
        let vm = match self.get(n.args[0]) {
            Ok(v) => v,
            Err(e) => return Started::Done(Err(e)),
        };
        let cmd = n.args[1] as i32;
        if cmd != vkabi::VMSPACE_CTL_RUN && cmd != vkabi::fastrun::VMSPACE_CTL_FASTINFO {
            return Started::Done(Err(Errno::EOPNOTSUPP));
        }
        let Some(env) = self.env.get() else {
            return Started::Done(Err(Errno::EAGAIN));
        };
        if cmd == vkabi::fastrun::VMSPACE_CTL_FASTINFO && !env.fast {
            return Started::Done(Err(Errno::EOPNOTSUPP));
        }
        let guest = Pid::from_raw(n.tid);
        let existing = {
            let mut contexts = lock(&vm.contexts);
            // A broken context is replaced by a fresh one.
            if contexts.get(&guest).is_some_and(|c| c.is_closed()) {
                contexts.remove(&guest);
            }
            contexts.get(&guest).cloned()
        };
        let ctx = match existing {
            Some(c) => c,
            None => {
                let me = Arc::clone(self);
                let vm2 = Arc::clone(&vm);
                match self
                    .on_tracer(move |tracer| me.new_context(tracer, &vm2, guest))
                    .and_then(|r| r)
                    .and_then(|made| match made {
                        NewContext::Existing(c) => Ok(c),
                        NewContext::Started { slot, tid } => {
                            self.context_ready(&vm, slot, tid, guest)
                        }
                    }) {
                    Ok(c) => c,
                    Err(e) => return Started::Done(Err(e)),
                }
            }
        };
        // Not before: making the context waits for the tracer, which may
        // be waiting in destroy for this lock.
        let gone = vm.gone.read().unwrap_or_else(PoisonError::into_inner);
        if *gone {
            return Started::Done(Err(Errno::ENOENT));
        }
        if cmd == vkabi::fastrun::VMSPACE_CTL_FASTINFO {
            return Started::Done(self.fast_info(&vm, &ctx, n, env));
        }
        run::start(&ctx, n, env)
    }

    /// `vmspace_ctl(id, VMSPACE_CTL_FASTINFO)`: hand the calling thread its
    /// context's block for the fast RUN: a close-on-exec descriptor of the
    /// blocks' memfd (installed in the caller) and the block's page in it.
    fn fast_info(
        &self,
        vm: &Vmspace,
        ctx: &Context,
        n: &Notification,
        env: &RunEnv,
    ) -> Result<i64, Errno> {
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        if !proc::task_alive(vm.stub, ctx.tid) {
            // Broken: the hypercall replaces it.
            ctx.close();
            return Err(Errno::EIO);
        }
        if n.args[2] == vkabi::fastrun::FASTINFO_LISTENER {
            // The context's listener, for the library to wait and go by
            // notification as vkrun does (SYNC_WAKE_UP is the filter's).
            let l = ctx.listener.as_ref().ok_or(Errno::EOPNOTSUPP)?;
            return env.notify.add_fd(n.id, l.as_fd(), true).map(i64::from);
        }
        vm.block_word(ctx.slot, CX_STUB_PID)
            .store(vm.stub.as_raw() as u32, Ordering::Relaxed);
        vm.block_word(ctx.slot, CX_CTX_TID)
            .store(ctx.tid.as_raw() as u32, Ordering::Relaxed);
        let fd = env.notify.add_fd(n.id, vm.blocks_file.as_fd(), true)?;
        ctx.open_fast();
        let page = (Vmspace::block(ctx.slot) / 4096) as i64;
        Ok(i64::from(fd) | page << 32)
    }

    /// Make the context of guest thread `guest` in `vm`: a thread cloned in
    /// the stub.
    fn new_context(
        &self,
        tracer: &Tracer,
        vm: &Arc<Vmspace>,
        guest: Pid,
    ) -> Result<NewContext, Errno> {
        if let Some(c) = lock(&vm.contexts).get(&guest) {
            return Ok(NewContext::Existing(Arc::clone(c)));
        }
        // Destroyed since the caller found it (destroy runs on this thread).
        if *vm.gone.read().unwrap_or_else(PoisonError::into_inner) {
            return Err(Errno::ENOENT);
        }
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        let slot = {
            let mut slots = lock(&vm.slots);
            let free = slots.iter().position(|s| match s {
                None => true,
                Some(tid) => !proc::task_alive(vm.stub, *tid),
            });
            let slot = free.ok_or(Errno::EAGAIN)?;
            slots[slot] = None;
            slot
        };
        // A fresh block: zeroed control words, the signal stack.
        let base = Vmspace::block(slot);
        vm.blocks.write(base, &[0u8; 0x300]);
        let ss_sp = STUB_BASE + CONTEXTS + base as u64 + CX_SIGSTACK;
        let mut ss = [0u8; 24];
        ss[..8].copy_from_slice(&ss_sp.to_ne_bytes());
        ss[16..].copy_from_slice(&(CTX_SIZE - CX_SIGSTACK).to_ne_bytes());
        vm.blocks.write(base + CX_ALTSTACK, &ss);
        vm.block_word(slot, CX_STATE)
            .store(STATE_WAIT, Ordering::Release);
        let mut inj = Injector::at_trap_stop(tracer, vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(vm, &e))?;
        let block = STUB_BASE + CONTEXTS + base as u64;
        let tid = inj
            .clone_untraced_at(
                stub::clone_gadget(),
                clone_args(CONTEXT_CLONE_FLAGS, block + CX_ENTRY_STACK, block),
            )
            .map_err(|e| self.inject_failed(vm, &e))??;
        let _ = inj.finish(0);
        lock(&vm.slots)[slot] = Some(tid);
        Ok(NewContext::Started { slot, tid })
    }

    /// Wait (on the hypercall thread, not the tracer) for the first report
    /// of context thread `tid` in block `slot`, which says it is ready or
    /// why it is not, and make its context.
    fn context_ready(
        &self,
        vm: &Arc<Vmspace>,
        slot: usize,
        tid: Pid,
        guest: Pid,
    ) -> Result<Arc<Context>, Errno> {
        let deadline = Instant::now() + CONTEXT_START;
        let seq = vm.block_word(slot, CX_SEQ);
        while seq.load(Ordering::Acquire) == 0 {
            // Destroyed, or its stub died, meanwhile (the tracer goes on
            // while this thread waits): said where it happened.
            if *vm.gone.read().unwrap_or_else(PoisonError::into_inner) {
                return Err(Errno::ENOENT);
            }
            if vm.is_dead() {
                return Err(Errno::EIO);
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    vmspace = format_args!("{:#x}", vm.id),
                    "a vmspace context did not start"
                );
                return Err(Errno::EIO);
            }
            let _ = futex::wait(seq, 0, Duration::from_millis(50));
        }
        if vm.block_word(slot, CX_SIG).load(Ordering::Acquire) == u32::MAX {
            let err = vm.block_qword(slot, CX_ADDR).load(Ordering::Relaxed) as i64;
            tracing::warn!(
                vmspace = format_args!("{:#x}", vm.id),
                err,
                "a vmspace context failed to set up"
            );
            return Err(Errno::from_raw((-err) as i32));
        }
        let listener = if vm.block_word(slot, CX_NOTIF).load(Ordering::Acquire) == 1 {
            Some(self.context_listener(vm, slot, deadline)?)
        } else {
            None
        };
        let ctx = Arc::new(Context::new(
            Arc::clone(vm),
            slot,
            tid,
            guest,
            seq.load(Ordering::Acquire),
            listener,
        ));
        lock(&vm.contexts).insert(guest, Arc::clone(&ctx));
        tracing::debug!(vmspace = format_args!("{:#x}", vm.id), %guest, context = %tid, slot, "execution context ready");
        Ok(ctx)
    }

    /// The listener of the context in block `slot`, which reports by user
    /// notification: a duplicate of its descriptor in the stub, woken on
    /// the current CPU (`SYNC_WAKE_UP`: both hand-offs stay on the CPU that
    /// makes them, whatever the placement), and its first report received.
    fn context_listener(
        &self,
        vm: &Vmspace,
        slot: usize,
        deadline: Instant,
    ) -> Result<NotifyFd, Errno> {
        let fd = vm.block_word(slot, CX_LISTENER).load(Ordering::Acquire) as i32;
        let listener = seccomp::listener_of(vm.stub, fd).map_err(|errno| {
            // Destroyed, or its stub died, meanwhile: said where it happened.
            if *vm.gone.read().unwrap_or_else(PoisonError::into_inner) {
                return Errno::ENOENT;
            }
            if !vm.is_dead() && proc::task_alive(vm.stub, vm.stub) {
                tracing::warn!(%errno, "taking an execution context's listener failed");
            }
            Errno::EIO
        })?;
        let _ = listener.set_sync_wake_up();
        loop {
            if let Some(n) = listener.recv_within(Duration::from_millis(50))? {
                vm.block_qword(slot, CX_NOTIF_ID)
                    .store(n.id, Ordering::Release);
                return Ok(listener);
            }
            if vm.is_dead() || Instant::now() > deadline {
                return Err(Errno::EIO);
            }
        }
    }

    fn inject_failed(&self, vm: &Vmspace, e: &TraceeError) -> Errno {
        tracing::warn!(
            vmspace = format_args!("{:#x}", vm.id),
            "driving the stub failed: {e}"
        );
        if let TraceeError::Gone(_) = e {
            vm.mark_dead();
        }
        Errno::EIO
    }
}

impl ContextFaults for Vmspaces {
    /// A walk failed for context thread `ctid` at `addr`: end its RUN with
    /// `T_PAGEFLT`. False if `ctid` is no context.
    /// The guest thread whose context runs in stub thread `ctid`.
    fn guest_of(&self, ctid: Pid) -> Option<Pid> {
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        vms.iter().find_map(|vm| {
            lock(&vm.contexts)
                .values()
                .find(|c| c.tid == ctid)
                .map(|c| c.guest)
        })
    }
}
