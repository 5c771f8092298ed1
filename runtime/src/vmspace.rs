//! vmspaces (ABI section 7): the registry of a guest's vmspaces, their stub
//! processes, what is mapped in them, and their execution contexts.
//!
//! One host process per vmspace: a stub (see [`crate::sys::stub`]) forked
//! and seized by the tracer thread, its main thread stopped on `int3` with
//! nothing mapped below `USER_MAX` until the vkernel fills it. The registry
//! is one per vkrun run, so every process of the guest (a forked guest
//! included) shares it. All stubs are killed when the guest's last process
//! is gone, and `PTRACE_O_EXITKILL` and the stubs' parent-death signal kill
//! them if vkrun dies.
//!
//! Who does what:
//! - the tracer thread (which alone may ptrace the stubs) creates and
//!   destroys vmspaces, maps and unmaps in them (`SECCOMP_RET_TRACE` stops;
//!   system calls injected in the stub's main thread), and creates
//!   execution contexts on request of the hypercall thread ([`Vmspaces::
//!   run_jobs`]);
//! - the hypercall thread serves RUN ([`crate::run`]), `vmspace_mcontrol`
//!   (through the stub's agent) and `vmspace_pread`/`vmspace_pwrite`
//!   (through RAM, the page tables, or the stub's memory).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use vkabi::{MAP_VPAGETABLE, PAGE_SIZE, USER_MAX};

use crate::inject::{InjectError, Injector, errno_or};
use crate::lock;
use crate::ram::GuestRam;
use crate::remote::{self, RemoteAddr};
use crate::run::{self, Context, RunEnv, Started};
use crate::stats::Stats;
use crate::sys::seccomp::Notification;
use crate::sys::stub::{
    self, CONTEXTS, CTX_SIZE, CX_ADDR, CX_ALTSTACK, CX_ENTRY_STACK, CX_SEQ, CX_SIG, CX_SIGSTACK,
    CX_STATE, DATA, DATA_PATH, DATA_PATH_LEN, MAX_CONTEXTS, STATE_WAIT, STUB_BASE, STUB_LEN,
};
use crate::sys::{futex, kcmp};
use crate::vpt::{Space, Vpt};

const PAGE: u64 = PAGE_SIZE;
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

/// What a range of a vmspace maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A MAP_VPAGETABLE window (the stub's [`Vpt`] state knows the rest).
    Window,
    /// RAM, linearly, from this RAM offset.
    Linear { off: u64 },
    /// Private anonymous memory of the stub.
    Anon,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    len: u64,
    kind: Kind,
    /// `PROT_*` of the mapping (pread and pwrite honour it).
    prot: i32,
}

/// One vmspace: its stub, its region, its mappings and contexts.
#[derive(Debug)]
pub struct Vmspace {
    pub id: u64,
    /// The stub process (its main thread).
    pub stub: Pid,
    /// vkrun's mapping of the stub's region (code, data, context blocks).
    region: MmapRaw,
    stats: Arc<Stats>,
    maps: Mutex<BTreeMap<u64, Mapping>>,
    /// Execution contexts, by guest thread.
    contexts: Mutex<HashMap<Pid, Arc<Context>>>,
    /// Context thread of each block (to reuse a block only once its thread
    /// is gone).
    slots: Mutex<Vec<Option<Pid>>>,
    dead: AtomicBool,
    /// True once destroyed. Calls served off the tracer thread (RUN's
    /// start, mcontrol, pread, pwrite) hold it for reading while they use
    /// the vmspace; destroy takes it for writing, so a call either sees the
    /// vmspace destroyed (`ENOENT`, as if it had never been found) or holds
    /// destroy off (a RUN it started makes destroy `EBUSY`).
    gone: RwLock<bool>,
    /// The stub's descriptor of RAM, once opened.
    ram_fd: Mutex<Option<u64>>,
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

impl Vmspace {
    fn block(&self, slot: usize) -> usize {
        (CONTEXTS + slot as u64 * CTX_SIZE) as usize
    }

    /// A 32-bit word of context block `slot`.
    pub fn block_word(&self, slot: usize, off: usize) -> &AtomicU32 {
        let at = self.block(slot) + off;
        assert!(off.is_multiple_of(4) && at + 4 <= STUB_LEN as usize);
        // SAFETY: in bounds and aligned (asserted); the region is a shared
        // mapping that lives as long as `self`; all access is atomic.
        unsafe { &*self.region.as_ptr().add(at).cast::<AtomicU32>() }
    }

    /// A 64-bit word of context block `slot`.
    pub fn block_qword(&self, slot: usize, off: usize) -> &AtomicU64 {
        let at = self.block(slot) + off;
        assert!(off.is_multiple_of(8) && at + 8 <= STUB_LEN as usize);
        // SAFETY: as in `block_word`.
        unsafe { &*self.region.as_ptr().add(at).cast::<AtomicU64>() }
    }

    /// Whether the stub is gone (killed, crashed, destroyed).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Declare the stub broken: kill it and wake every waiter.
    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = kill(self.stub, Signal::SIGKILL);
        for ctx in lock(&self.contexts).values() {
            let _ = futex::wake(self.block_word(ctx.slot, CX_SEQ));
        }
    }

    /// Interrupt context thread `tid` (its user code).
    pub fn kick(&self, tid: Pid) -> Result<(), Errno> {
        // SAFETY: tgkill on integers.
        let r = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                self.stub.as_raw(),
                tid.as_raw(),
                stub::KICK_SIGNAL,
            )
        };
        Errno::result(r).map(drop)
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn write_region(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= STUB_LEN as usize);
        // SAFETY: in bounds (asserted) of our own shared mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.region.as_mut_ptr().add(off as usize),
                bytes.len(),
            );
        }
    }

    /// Whether `[s, e)` is entirely mapped.
    fn covered(&self, s: u64, e: u64) -> bool {
        let maps = lock(&self.maps);
        let mut at = s;
        if let Some((&k, m)) = maps.range(..=s).next_back()
            && k + m.len > s
        {
            at = k + m.len;
        }
        for (&k, m) in maps.range(s..e) {
            if k > at {
                return false;
            }
            at = at.max(k + m.len);
        }
        at >= e
    }

    /// Forget what `[s, e)` maps (cutting mappings that straddle it).
    fn cut(&self, s: u64, e: u64) {
        let mut maps = lock(&self.maps);
        let overlapping: Vec<(u64, Mapping)> = maps
            .range(..e)
            .filter(|&(&k, m)| k + m.len > s)
            .map(|(&k, &m)| (k, m))
            .collect();
        for (k, m) in overlapping {
            maps.remove(&k);
            if k < s {
                maps.insert(k, Mapping { len: s - k, ..m });
            }
            let end = k + m.len;
            if end > e {
                let kind = match m.kind {
                    Kind::Linear { off } => Kind::Linear { off: off + (e - k) },
                    other => other,
                };
                maps.insert(
                    e,
                    Mapping {
                        len: end - e,
                        kind,
                        prot: m.prot,
                    },
                );
            }
        }
    }

    /// The mapping holding `va`: its start and what it is.
    fn mapping_at(&self, va: u64) -> Option<(u64, Mapping)> {
        let maps = lock(&self.maps);
        let (&k, &m) = maps.range(..=va).next_back()?;
        (va < k + m.len).then_some((k, m))
    }
}

/// Work the hypercall thread hands to the tracer thread.
struct Job(Box<dyn FnOnce() + Send>);

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

    /// Run the jobs the hypercall thread queued (on the tracer thread).
    pub fn run_jobs(&self) {
        let _ = self.jobs_fd.read();
        let jobs = std::mem::take(&mut *lock(&self.jobs));
        for Job(job) in jobs {
            job();
        }
    }

    /// Run `f` on the tracer thread and wait for its result.
    fn on_tracer<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Errno> {
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.jobs).push(Job(Box::new(move || {
            let _ = tx.send(f());
        })));
        self.jobs_fd.write(1)?;
        rx.recv_timeout(JOB_TIMEOUT).map_err(|_| Errno::EAGAIN)
    }

    fn get(&self, id: u64) -> Result<Arc<Vmspace>, Errno> {
        if id == 0 {
            return Err(Errno::EINVAL);
        }
        lock(&self.by_id).get(&id).cloned().ok_or(Errno::ENOENT)
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
        if !stub::fsgsbase_available() {
            tracing::warn!("vmspaces need FSGSBASE (Linux 5.9+ on a CPU that has it)");
            return Err(Errno::EOPNOTSUPP);
        }
        let (stub, region) = spawn()?;
        let vm = Arc::new(Vmspace {
            id,
            stub,
            region,
            stats: Arc::clone(&self.stats),
            maps: Mutex::new(BTreeMap::new()),
            contexts: Mutex::new(HashMap::new()),
            slots: Mutex::new(vec![None; MAX_CONTEXTS]),
            dead: AtomicBool::new(false),
            gone: RwLock::new(false),
            ram_fd: Mutex::new(None),
        });
        lock(&self.stub_tids).insert(stub, stub);
        lock(&self.by_id).insert(id, vm);
        self.stats.vmspaces_created.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    }

    /// `vmspace_destroy(id)`: kill the stub and forget the vmspace; `EBUSY`
    /// while a guest thread is inside RUN in it.
    /// Precondition: called on the tracer thread.
    pub fn destroy(&self, id: u64) -> Result<i64, Errno> {
        let vm = self.get(id)?;
        {
            let mut gone = vm.gone.write().unwrap_or_else(PoisonError::into_inner);
            if lock(&vm.contexts).values().any(|c| c.busy()) {
                return Err(Errno::EBUSY);
            }
            *gone = true;
        }
        lock(&self.by_id).remove(&id);
        self.teardown(&vm);
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
    pub fn destroy_all(&self) {
        let all: Vec<Arc<Vmspace>> = lock(&self.by_id).drain().map(|(_, v)| v).collect();
        for vm in all {
            self.teardown(&vm);
        }
    }

    fn teardown(&self, vm: &Vmspace) {
        *vm.gone.write().unwrap_or_else(PoisonError::into_inner) = true;
        vm.dead.store(true, Ordering::Release);
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
    pub fn on_stub_status(&self, pid: Pid, status: WaitStatus) {
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

    /// A walk failed for context thread `ctid` at `addr`: end its RUN with
    /// `T_PAGEFLT`. False if `ctid` is no context.
    pub fn context_fault(&self, ctid: Pid, addr: u64, pgex: u64) -> bool {
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        for vm in vms {
            let ctx = lock(&vm.contexts).values().find(|c| c.tid == ctid).cloned();
            if let Some(ctx) = ctx {
                ctx.fault(addr, pgex);
                return true;
            }
        }
        false
    }

    /// The guest thread whose context runs in stub thread `ctid`.
    pub fn guest_of_context(&self, ctid: Pid) -> Option<Pid> {
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        vms.iter().find_map(|vm| {
            lock(&vm.contexts)
                .values()
                .find(|c| c.tid == ctid)
                .map(|c| c.guest)
        })
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
    /// if that interrupted a RUN, the value RUN must return instead.
    pub fn on_guest_signal(&self, tid: Pid, ret: i64) -> Option<i64> {
        if self.is_empty() {
            return None;
        }
        let vms: Vec<Arc<Vmspace>> = lock(&self.by_id).values().cloned().collect();
        for vm in vms {
            let ctx = lock(&vm.contexts).get(&tid).cloned();
            if let Some(ctx) = ctx
                && ctx.busy()
            {
                let env = self.env.get()?;
                return run::interrupt(&ctx, ret, &env.trace);
            }
        }
        None
    }

    // ----- RUN (hypercall thread) -----

    /// `vmspace_ctl(id, cmd, tf, vf)`: the answer, or the run to wait for.
    pub fn ctl(self: &Arc<Self>, n: &Notification) -> Started {
        let vm = match self.get(n.args[0]) {
            Ok(v) => v,
            Err(e) => return Started::Done(Err(e)),
        };
        if n.args[1] as i32 != vkabi::VMSPACE_CTL_RUN {
            return Started::Done(Err(Errno::EOPNOTSUPP));
        }
        let Some(env) = self.env.get() else {
            return Started::Done(Err(Errno::EAGAIN));
        };
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
                    .on_tracer(move || me.new_context(&vm2, guest))
                    .and_then(|r| r)
                {
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
        run::start(&ctx, n, env)
    }

    /// Make the context of guest thread `guest` in `vm`: a thread cloned in
    /// the stub, and its waiter. On the tracer thread.
    fn new_context(&self, vm: &Arc<Vmspace>, guest: Pid) -> Result<Arc<Context>, Errno> {
        if let Some(c) = lock(&vm.contexts).get(&guest) {
            return Ok(Arc::clone(c));
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
                Some(tid) => !task_alive(vm.stub, *tid),
            });
            let slot = free.ok_or(Errno::EAGAIN)?;
            slots[slot] = None;
            slot
        };
        // A fresh block: zeroed control words, the signal stack.
        let base = CONTEXTS + slot as u64 * CTX_SIZE;
        vm.write_region(base, &[0u8; 0x300]);
        let ss_sp = STUB_BASE + base + CX_SIGSTACK;
        let mut ss = [0u8; 24];
        ss[..8].copy_from_slice(&ss_sp.to_ne_bytes());
        ss[16..].copy_from_slice(&(CTX_SIZE - CX_SIGSTACK).to_ne_bytes());
        vm.write_region(base + CX_ALTSTACK as u64, &ss);
        vm.block_word(slot, CX_STATE)
            .store(STATE_WAIT, Ordering::Release);
        let mut inj = Injector::at_trap_stop(vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(vm, &e))?;
        let block = STUB_BASE + base;
        let tid = inj
            .clone_untraced_at(stub::clone_gadget(), |r| {
                r.rdi = CONTEXT_CLONE_FLAGS;
                r.rsi = block + CX_ENTRY_STACK;
                r.rdx = 0;
                r.r10 = 0;
                r.r8 = 0;
                r.r15 = block;
            })
            .map_err(|e| self.inject_failed(vm, &e))??;
        let _ = inj.finish(0);
        lock(&vm.slots)[slot] = Some(tid);
        // Its first report says it is ready (or why it is not).
        let deadline = Instant::now() + CONTEXT_START;
        let seq = vm.block_word(slot, CX_SEQ);
        while seq.load(Ordering::Acquire) == 0 {
            if Instant::now() > deadline || vm.is_dead() {
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
        let ctx = Arc::new(Context::new(
            Arc::clone(vm),
            slot,
            tid,
            guest,
            seq.load(Ordering::Acquire),
        ));
        lock(&vm.contexts).insert(guest, Arc::clone(&ctx));
        tracing::debug!(vmspace = format_args!("{:#x}", vm.id), %guest, context = %tid, slot, "execution context ready");
        Ok(ctx)
    }

    fn inject_failed(&self, vm: &Vmspace, e: &InjectError) -> Errno {
        tracing::warn!(
            vmspace = format_args!("{:#x}", vm.id),
            "driving the stub failed: {e}"
        );
        if let InjectError::Gone { .. } = e {
            vm.mark_dead();
        }
        Errno::EIO
    }

    // ----- mappings (tracer thread) -----

    /// `vmspace_mmap(id, addr, len, prot | flags << 32, fd, off)` from guest
    /// thread `caller` (ABI section 4).
    pub fn mmap(&self, caller: Pid, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let (addr, len) = (a[1], a[2]);
        let (prot, flags) = (a[3] as u32 as i32, (a[3] >> 32) as u32 as i32);
        let (fd, off) = (a[4] as i32, a[5]);
        let len = match len.checked_add(PAGE - 1) {
            Some(l) if len > 0 => page_down(l),
            _ => return Err(Errno::EINVAL),
        };
        let fixed = flags & libc::MAP_FIXED != 0;
        if len > USER_MAX || (fixed && (addr % PAGE != 0 || addr > USER_MAX - len)) {
            return Err(Errno::EINVAL);
        }
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        let is_ram = || kcmp::same_file(self.ram.as_fd(), caller, fd) == Ok(true);
        let mut inj = Injector::at_trap_stop(vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let kind = flags & libc::MAP_TYPE;
        let (start, what) = if flags & MAP_VPAGETABLE != 0 {
            if fd < 0 || !is_ram() {
                return Err(Errno::EINVAL);
            }
            let r = self.vpt.map_window(
                &mut inj,
                vm.stub,
                addr,
                len,
                prot,
                flags,
                off,
                Space::Vmspace,
            );
            lock(&self.stub_tids).extend(inj.new_threads.drain(..).map(|t| (t, vm.stub)));
            let start = r.map_err(|e| self.inject_failed(&vm, &e))??;
            (start, Kind::Window)
        } else {
            // A plain mapping: private anonymous memory, or RAM, linearly.
            let (what, own, stub_fd, stub_off) =
                if kind == libc::MAP_PRIVATE && flags & libc::MAP_ANONYMOUS != 0 {
                    let own = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
                    (Kind::Anon, own, u64::MAX, 0)
                } else if kind == libc::MAP_SHARED && fd >= 0 && is_ram() {
                    if !off.is_multiple_of(PAGE) {
                        return Err(Errno::EINVAL);
                    }
                    let ram_fd = self.stub_ram_fd(&vm, &mut inj)?;
                    (Kind::Linear { off }, libc::MAP_SHARED, ram_fd, off)
                } else {
                    return Err(Errno::EINVAL);
                };
            let allowed = own | libc::MAP_FIXED | libc::MAP_POPULATE | libc::MAP_FIXED_NOREPLACE;
            let flags = (flags & allowed) as u64;
            let args = [addr, len, prot as u64, flags, stub_fd, stub_off];
            (self.map_in_stub(&vm, &mut inj, args)?, what)
        };
        let _ = inj.finish(0);
        vm.cut(start, start + len);
        if what != Kind::Window {
            // A plain mapping replaced whatever window part was there.
            self.vpt.unmap(vm.stub, start, start + len);
        }
        lock(&vm.maps).insert(
            start,
            Mapping {
                len,
                kind: what,
                prot,
            },
        );
        Ok(start as i64)
    }

    /// `mmap` in the stub, kept below `USER_MAX`.
    fn map_in_stub(&self, vm: &Vmspace, inj: &mut Injector, args: [u64; 6]) -> Result<u64, Errno> {
        let ret = inj
            .syscall(libc::SYS_mmap, args)
            .map_err(|e| self.inject_failed(vm, &e))?;
        let start = errno_or(ret)? as u64;
        if start.checked_add(args[1]).is_none_or(|end| end > USER_MAX) {
            let _ = inj.syscall(libc::SYS_munmap, [start, args[1], 0, 0, 0, 0]);
            return Err(Errno::ENOMEM);
        }
        Ok(start)
    }

    /// The stub's descriptor of RAM, opened on first use (through
    /// `/proc/<vkrun>/fd/N`, the path written to the stub's data page).
    fn stub_ram_fd(&self, vm: &Vmspace, inj: &mut Injector) -> Result<u64, Errno> {
        let mut fd = lock(&vm.ram_fd);
        if let Some(fd) = *fd {
            return Ok(fd);
        }
        let path = format!("/proc/{}/fd/{}\0", std::process::id(), self.ram.raw_fd());
        assert!(path.len() as u64 <= DATA_PATH_LEN);
        vm.write_region(DATA_PATH, path.as_bytes());
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let ret = inj
            .syscall(libc::SYS_open, [STUB_BASE + DATA_PATH, flags, 0, 0, 0, 0])
            .map_err(|e| self.inject_failed(vm, &e))?;
        let n = errno_or(ret)? as u64;
        *fd = Some(n);
        Ok(n)
    }

    /// `vmspace_munmap(id, addr, len)`.
    pub fn munmap(&self, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let (addr, len) = (a[1], a[2]);
        if len == 0 {
            return Ok(0);
        }
        let start = page_down(addr);
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE - 1))
            .map(page_down)
            .ok_or(Errno::EINVAL)?;
        if end > USER_MAX || !vm.covered(start, end) {
            return Err(Errno::EINVAL);
        }
        if vm.is_dead() {
            return Err(Errno::EIO);
        }
        let mut inj = Injector::at_trap_stop(vm.stub, stub::syscall_gadget())
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let ret = inj
            .syscall(libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])
            .map_err(|e| self.inject_failed(&vm, &e))?;
        let _ = inj.finish(0);
        errno_or(ret)?;
        vm.cut(start, end);
        self.vpt.unmap(vm.stub, start, end);
        Ok(0)
    }

    // ----- mcontrol, pread, pwrite (hypercall thread) -----

    /// `vmspace_mcontrol(id, addr, len, behav, value)` (ABI section 5).
    pub fn mcontrol(&self, a: [u64; 6]) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        let args = [a[1], a[2], a[3], a[4], 0, 0];
        self.with_live(&vm, || {
            self.vpt.mcontrol_in(vm.stub, args, |s, e, _windows| {
                let maps = lock(&vm.maps);
                maps.range(..e)
                    .any(|(&k, m)| k + m.len > s && m.kind != Kind::Window)
            })
        })
    }

    /// `vmspace_pread(id, buf, n, flags, vaddr)` (`write` false) and
    /// `vmspace_pwrite` (`write` true) for guest thread `caller`: copy
    /// through the vmspace's mappings, a page at a time, stopping at the
    /// first byte that is not accessible.
    pub fn prw(&self, caller: Pid, a: [u64; 6], write: bool) -> Result<i64, Errno> {
        let vm = self.get(a[0])?;
        self.with_live(&vm, || self.prw_in(&vm, caller, a, write))
    }

    fn prw_in(&self, vm: &Vmspace, caller: Pid, a: [u64; 6], write: bool) -> Result<i64, Errno> {
        let (buf, n, flags, vaddr) = (a[1], a[2], a[3], a[4]);
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        let mut done = 0u64;
        let mut chunk = vec![0u8; PAGE as usize];
        while done < n {
            let va = vaddr.wrapping_add(done);
            if va >= USER_MAX {
                break;
            }
            let len = (PAGE - va % PAGE).min(n - done) as usize;
            let here = &mut chunk[..len];
            let user = RemoteAddr(buf.wrapping_add(done));
            if write {
                if remote::read_bytes(caller, user, here).is_err() {
                    return if done == 0 { Err(Errno::EFAULT) } else { break };
                }
                if !self.vm_write(vm, va, here) {
                    break;
                }
            } else {
                if !self.vm_read(vm, va, here) {
                    break;
                }
                if remote::write_bytes(caller, user, here).is_err() {
                    return if done == 0 { Err(Errno::EFAULT) } else { break };
                }
            }
            done += len as u64;
        }
        Ok(done as i64)
    }

    /// Where `va` (one page at most) lives in RAM, for a user access.
    fn ram_offset(&self, vm: &Vmspace, va: u64, write: bool) -> Option<Result<u64, ()>> {
        let (start, m) = vm.mapping_at(va)?;
        let wanted = if write {
            libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        Some(match m.kind {
            Kind::Linear { .. } if m.prot & wanted == 0 => Err(()),
            Kind::Linear { off } => Ok(off + (va - start)),
            Kind::Window => self.vpt.translate(vm.stub, va, write).ok_or(()),
            Kind::Anon => return None,
        })
    }

    fn vm_read(&self, vm: &Vmspace, va: u64, out: &mut [u8]) -> bool {
        match self.ram_offset(vm, va, false) {
            Some(Ok(pa)) => self.ram.read(pa, out).is_ok(),
            Some(Err(())) => false,
            None => {
                vm.mapping_at(va).is_some()
                    && remote::read_bytes(vm.stub, RemoteAddr(va), out).is_ok()
            }
        }
    }

    fn vm_write(&self, vm: &Vmspace, va: u64, data: &[u8]) -> bool {
        match self.ram_offset(vm, va, true) {
            Some(Ok(pa)) => self.ram.write(pa, data).is_ok(),
            Some(Err(())) => false,
            None => {
                vm.mapping_at(va).is_some()
                    && remote::write_bytes(vm.stub, RemoteAddr(va), data).is_ok()
            }
        }
    }
}

/// Whether thread `tid` of process `tgid` still exists.
pub(crate) fn task_alive(tgid: Pid, tid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// Make a stub: its region (code and data), the fork, the seize, and the
/// wait for its `int3`.
fn spawn() -> Result<(Pid, MmapRaw), Errno> {
    let memfd = File::from(memfd_create(c"vkrun-stub", MFdFlags::MFD_CLOEXEC)?);
    memfd.set_len(STUB_LEN).map_err(|_| Errno::ENOMEM)?;
    let region = MmapOptions::new()
        .len(STUB_LEN as usize)
        .map_raw(&memfd)
        .map_err(|_| Errno::ENOMEM)?;
    let code = stub::code();
    let data = stub::data_page();
    // SAFETY: our fresh mapping of STUB_LEN bytes; code and data fit.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), region.as_mut_ptr(), code.len());
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            region.as_mut_ptr().add(DATA as usize),
            data.len(),
        );
    }
    let (go_read, go_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pid = stub::fork_stub(memfd.as_fd(), go_read.as_fd())?;
    drop(go_read);
    // TRACECLONE: the agent's threads (MAP_VPAGETABLE) are traced like the
    // guest's; execution contexts are cloned CLONE_UNTRACED.
    let options = Options::PTRACE_O_EXITKILL | Options::PTRACE_O_TRACECLONE;
    if let Err(errno) = ptrace::seize(pid, options) {
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
    Ok((pid, region))
}

/// Kill a stub (or a thread of one) and collect it.
fn reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

// The region's layout is fixed at build time.
const _: () = {
    assert!(CONTEXTS + MAX_CONTEXTS as u64 * CTX_SIZE <= STUB_LEN);
    assert!(MAX_CONTEXTS >= 32);
    // Below the agent's region.
    assert!(STUB_BASE + STUB_LEN <= USER_MAX + 0x10_0000);
    // Blocks are aligned to their size (the handler finds its block from
    // its stack pointer).
    assert!((STUB_BASE + CONTEXTS).is_multiple_of(CTX_SIZE));
};
