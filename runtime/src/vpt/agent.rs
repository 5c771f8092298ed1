//! The agent: vkrun's threads inside an address space with windows (machine
//! code from [`crate::sys::agent_code`]), and the supervisor's side of its
//! shared region. The installer runs batches of system calls in the
//! process's mm on request; the resolver (guest processes only) serves the
//! fast path of faults in the process itself.
//!
//! Everything in the region is writable by code in that process (a hostile
//! guest; in a stub, only the control and code pages are protected from
//! the user code): what is read back is bounded by a timeout and checked.

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vkabi::{PAGE_SIZE, USER_MAX};

use super::{Space, Vpt};
use crate::error::{CallError, errno_or};
use crate::sys::agent_code::{
    self, CTL_COUNT, CTL_DONE, CTL_OPS, CTL_REQ, CTL_RET, CTL_SIGSET, OP_SIZE, RES_BUDGET,
    RES_ENABLED, RES_LOCK, RES_RAM_BASE, RES_RAM_FD, RES_RAM_SIZE, RES_SIGSET, RES_UFFD,
};
use crate::sys::region::SharedRegion;
use crate::sys::uffd::{UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_SIZE, Userfault};
use crate::sys::{futex, lock, proc};
use crate::tracee::inject::{Injector, clone_args};
use crate::tracee::remote::{self, RemoteAddr};

const PAGE: u64 = PAGE_SIZE;
/// Pages of the agent region: control, code, scratch, two of stack for the
/// installer, the resolver page, two of stack for the resolver.
const AGENT_PAGES: u64 = 8;
const AGENT_INSTALLER_STACK_TOP: u64 = 5 * PAGE;
pub const AGENT_RESOLVER: u64 = 5 * PAGE;
const AGENT_RESOLVER_STACK_TOP: u64 = 8 * PAGE;
/// Stack of one resolver thread (it uses 64 bytes and one call's return
/// address): the two stack pages hold [`MAX_RESOLVERS`].
const RESOLVER_STACK: u64 = 1024;
/// Resolver threads in one process at most.
const MAX_RESOLVERS: usize = (2 * PAGE / RESOLVER_STACK) as usize;
pub const AGENT_CODE: u64 = PAGE;
const AGENT_SCRATCH: u64 = 2 * PAGE;
/// In the scratch page: the caller's saved signal mask (agent start-up).
const SCRATCH_SIGMASK: u64 = 0;
/// In the scratch page: the RAM memfd's `/proc` path.
const SCRATCH_PATH: u64 = 256;
/// In the scratch page: `struct uffdio_register` slots for the agent.
const SCRATCH_REGISTER: u64 = 512;
/// Register slots in the scratch page.
pub const REGISTER_SLOTS: usize = (PAGE - SCRATCH_REGISTER) as usize / UFFDIO_REGISTER_SIZE;
/// Lowest descriptor number the agent's own descriptors are moved to.
const AGENT_FD_FLOOR: u64 = 768;
/// Where vkrun asks to put the agent: the 2 MiB above `USER_MAX`, which the
/// ABI keeps out of the guest's reach.
const AGENT_HINT: u64 = USER_MAX + 0x10_0000;
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
/// How long the supervisor waits for the agent before checking it is alive.
const AGENT_POLL: Duration = Duration::from_millis(50);
/// How long a batch may take before vkrun gives up on the agent (a guest
/// that overwrote it, or stopped it for good) and kills the guest process:
/// a broken agent must not hang the supervisor.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The supervisor's side of an agent: its shared region.
#[derive(Debug)]
pub struct Agent {
    pub region: SharedRegion,
    /// The region's address in the guest.
    pub guest_base: u64,
    pub tid: Pid,
    /// The RAM memfd's number in the guest (opened for the agent).
    pub ram_fd: AtomicU32,
    /// The guest's descriptor of its userfaultfd (the agent registers with it).
    pub uffd_fd: AtomicU32,
    /// The first resolver thread (0 before it starts).
    pub resolver_tid: AtomicI32,
    /// The CPUs the installer may run on (as the process it serves may),
    /// if known.
    allowed: Option<CpuSet>,
    /// The CPU the installer is kept on for now (-1: none yet).
    cpu: AtomicI64,
}

/// A run of RAM to map at a guest address: `mmap(va, len, prot, flags,
/// ram, pa)`.
#[derive(Clone, Copy, Debug)]
pub struct RamRun {
    pub va: u64,
    pub len: u64,
    pub prot: u64,
    pub flags: u64,
    pub pa: u64,
}

impl Agent {
    fn word(&self, offset: usize) -> &AtomicU32 {
        self.region.word(offset)
    }

    fn qword(&self, offset: usize) -> &AtomicU64 {
        self.region.qword(offset)
    }

    /// A 32-bit word of the resolver page.
    pub fn res_word(&self, offset: usize) -> &AtomicU32 {
        self.word(AGENT_RESOLVER as usize + offset)
    }

    /// A 64-bit word of the resolver page.
    pub fn res_qword(&self, offset: usize) -> &AtomicU64 {
        self.qword(AGENT_RESOLVER as usize + offset)
    }

    /// Run a batch of system calls in the guest's mm; returns their raw
    /// results. Callers serialise batches (they hold the process's `mm`).
    pub fn run(&self, tgid: Pid, ops: &[(i64, [u64; 6])]) -> Result<Vec<i64>, Errno> {
        assert!(
            ops.len() <= agent_code::MAX_OPS,
            "agent batch fits the control page"
        );
        for (i, (nr, args)) in ops.iter().enumerate() {
            let base = CTL_OPS + i * OP_SIZE;
            self.qword(base).store(*nr as u64, Ordering::Relaxed);
            for (k, a) in args.iter().enumerate() {
                self.qword(base + 8 + 8 * k).store(*a, Ordering::Relaxed);
            }
        }
        self.word(CTL_COUNT)
            .store(ops.len() as u32, Ordering::Relaxed);
        self.follow_caller();
        let req = self.word(CTL_REQ).load(Ordering::Relaxed).wrapping_add(1);
        self.word(CTL_REQ).store(req, Ordering::Release);
        futex::wake(self.word(CTL_REQ))?;
        let started = Instant::now();
        loop {
            let done = self.word(CTL_DONE).load(Ordering::Acquire);
            if done == req {
                break;
            }
            futex::wait(self.word(CTL_DONE), done, AGENT_POLL)?;
            if self.word(CTL_DONE).load(Ordering::Acquire) == req {
                break;
            }
            // The word is in memory the guest (or a stub's user code) can
            // write, so it is not trusted alone: the agent waiting for the
            // request after ours (`futex(&req, FUTEX_WAIT, req)`, which the
            // kernel shows) has done ours, whatever the word says.
            if self.waits_after(tgid, req) {
                break;
            }
            // A dead agent (its process killed) must not hang the supervisor.
            if !proc::task_alive(tgid, self.tid) {
                return Err(Errno::ESRCH);
            }
            // Wake it again: a wake-up is cheap, a lost one would be fatal.
            futex::wake(self.word(CTL_REQ))?;
            if started.elapsed() > AGENT_TIMEOUT && !proc::task_stopped(tgid, self.tid) {
                tracing::error!(%tgid, "the agent does not answer; killing the guest process");
                let _ = kill(tgid, Signal::SIGKILL);
                return Err(Errno::ETIMEDOUT);
            }
        }
        Ok((0..ops.len())
            .map(|i| self.qword(CTL_RET + 8 * i).load(Ordering::Relaxed) as i64)
            .collect())
    }

    /// Whether the agent sleeps waiting for the request after `req` (its
    /// loop's `futex(&req, FUTEX_WAIT, last)` with `last == req`): then it
    /// has run batch `req`.
    fn waits_after(&self, tgid: Pid, req: u32) -> bool {
        let wait = (
            libc::SYS_futex,
            self.guest_base + CTL_REQ as u64,
            libc::FUTEX_WAIT as u64,
            u64::from(req),
        );
        proc::task_syscall(tgid, self.tid).is_some_and(|(nr, a)| (nr, a[0], a[1], a[2]) == wait)
    }

    /// Keep the installer on the CPU of the thread that asks for a batch
    /// (if the process may run there): a wake-up across CPUs costs more
    /// than the batch itself on a VM whose idle CPUs halt (25-30 µs), and
    /// the caller sleeps until the batch is done, so its CPU is free for
    /// the installer. Moves it only when the caller's CPU changed.
    fn follow_caller(&self) {
        let (Some(allowed), Ok(cpu)) = (self.allowed.as_ref(), nix::sched::sched_getcpu()) else {
            return;
        };
        if self.cpu.load(Ordering::Relaxed) == cpu as i64 || !allowed.is_set(cpu).unwrap_or(false) {
            return;
        }
        let mut set = CpuSet::new();
        if set.set(cpu).is_ok() && sched_setaffinity(self.tid, &set).is_ok() {
            self.cpu.store(cpu as i64, Ordering::Relaxed);
        }
    }

    /// Take the lock shared with the resolver (futex mutex in shared
    /// memory). A resolver that dies holding it must not hang vkrun: while
    /// waiting, the resolver's process is checked.
    pub fn lock_shared(&self, tgid: Pid) -> Result<(), Errno> {
        let word = self.res_word(RES_LOCK);
        if word
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            if word.swap(2, Ordering::Acquire) == 0 {
                return Ok(());
            }
            futex::wait(word, 2, AGENT_POLL)?;
            if kill(tgid, None).is_err() {
                return Err(Errno::ESRCH);
            }
            let resolver = Pid::from_raw(self.resolver_tid.load(Ordering::Relaxed));
            if started.elapsed() > AGENT_TIMEOUT && !proc::task_stopped(tgid, resolver) {
                tracing::error!(%tgid, "the resolver holds its lock; killing the guest process");
                let _ = kill(tgid, Signal::SIGKILL);
                return Err(Errno::ETIMEDOUT);
            }
        }
    }

    /// Release the shared lock, waking a waiting resolver.
    pub fn unlock_shared(&self) {
        let word = self.res_word(RES_LOCK);
        if word.swap(0, Ordering::Release) == 2 {
            let _ = futex::wake(word);
        }
    }

    /// Fill register slot `i` (missing-page mode for `[va, va+len)`) and
    /// return its address in the guest.
    pub fn register_slot(&self, i: usize, va: u64, len: u64) -> u64 {
        let off = (AGENT_SCRATCH + SCRATCH_REGISTER) as usize + UFFDIO_REGISTER_SIZE * i;
        let mut bytes = [0u8; UFFDIO_REGISTER_SIZE];
        bytes[0..8].copy_from_slice(&va.to_ne_bytes());
        bytes[8..16].copy_from_slice(&len.to_ne_bytes());
        bytes[16..24].copy_from_slice(&UFFDIO_REGISTER_MODE_MISSING.to_ne_bytes());
        self.region.write(off, &bytes);
        self.guest_base + off as u64
    }

    /// One system call in the guest's mm made by the agent (its raw
    /// result), as a [`Call`].
    fn by_agent(&self, tgid: Pid) -> impl FnMut(i64, [u64; 6]) -> Result<i64, CallError> + '_ {
        move |nr, a| Ok(self.run(tgid, &[(nr, a)])?[0])
    }

    /// Open the supervisor's RAM memfd for the agent, via `/proc`.
    fn open_ram(&self, ram_fd: i32, tgid: Pid) -> Result<(), Errno> {
        self.open_ram_with(ram_fd, &mut self.by_agent(tgid))
            .map_err(|e| match e {
                CallError::Guest(errno) => errno,
                // The agent's calls fail only with an errno.
                CallError::Tracee(_) => Errno::ESRCH,
            })
    }

    /// [`Agent::open_ram`] with `call` making the system calls.
    fn open_ram_with(&self, ram_fd: i32, call: &mut Call<'_>) -> Result<(), CallError> {
        let path = format!("/proc/{}/fd/{ram_fd}\0", std::process::id());
        self.region
            .write((AGENT_SCRATCH + SCRATCH_PATH) as usize, path.as_bytes());
        let ptr = self.guest_base + AGENT_SCRATCH + SCRATCH_PATH;
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let r = call(libc::SYS_open, [ptr, flags, 0, 0, 0, 0])?;
        let fd = raise_fd(errno_or(r)?, call)?;
        self.ram_fd.store(fd as u32, Ordering::Relaxed);
        self.res_qword(RES_RAM_FD).store(fd, Ordering::Relaxed);
        Ok(())
    }

    /// `mmap` a run of RAM at `va` in the guest (reopening the agent's RAM
    /// descriptor once if the guest closed it or put another file there:
    /// a pipe there fails with `EPERM` or `EACCES`, nothing with `EBADF`).
    pub fn mmap_ram(&self, tgid: Pid, ram_fd: i32, run: RamRun) -> Result<(), Errno> {
        let RamRun {
            va,
            len,
            prot,
            flags,
            pa,
        } = run;
        for attempt in 0..2 {
            let fd = u64::from(self.ram_fd.load(Ordering::Relaxed));
            let r = self.run(tgid, &[(libc::SYS_mmap, [va, len, prot, flags, fd, pa])])?;
            match errno_or(r[0]) {
                Ok(_) => return Ok(()),
                Err(Errno::EBADF | Errno::EACCES | Errno::ENODEV | Errno::EPERM)
                    if attempt == 0 =>
                {
                    self.open_ram(ram_fd, tgid)?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Errno::EBADF)
    }

    /// The address of the `syscall; int3` gadget in the guest.
    pub fn syscall_gadget(&self) -> u64 {
        self.guest_base + AGENT_CODE + agent_code::syscall_gadget() as u64
    }
}

impl Vpt {
    /// Create the agent in the process of `inj`'s thread (ABI-invisible:
    /// its region lies above `USER_MAX`).
    pub(super) fn start_agent(&self, inj: &mut Injector, space: Space) -> Result<Agent, CallError> {
        let (memfd, region) = SharedRegion::create(c"vkrun-agent", AGENT_PAGES * PAGE)?;
        // A scratch page in the guest for the path of our memfd.
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let scratch = inj.syscall(libc::SYS_mmap, [0, PAGE, rw, anon, u64::MAX, 0])?;
        let scratch = errno_or(scratch).map_err(|_| Errno::ENOMEM)? as u64;
        let path = format!(
            "/proc/{}/fd/{}\0",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&memfd)
        );
        if let Err(e) = remote::write_bytes(inj.tid(), RemoteAddr(scratch), path.as_bytes()) {
            inj.syscall(libc::SYS_munmap, [scratch, PAGE, 0, 0, 0, 0])?;
            return Err(e.into());
        }
        let o_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
        let fd = inj.syscall(libc::SYS_open, [scratch, o_flags, 0, 0, 0, 0])?;
        inj.syscall(libc::SYS_munmap, [scratch, PAGE, 0, 0, 0, 0])?;
        let fd = errno_or(fd)? as u64;
        let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let len = AGENT_PAGES * PAGE;
        let shared = libc::MAP_SHARED as u64;
        let noreplace = libc::MAP_FIXED_NOREPLACE as u64;
        let mut base = inj.syscall(
            libc::SYS_mmap,
            [AGENT_HINT, len, rwx, shared | noreplace, fd, 0],
        )?;
        if base < 0 {
            base = inj.syscall(libc::SYS_mmap, [0, len, rwx, shared, fd, 0])?;
        }
        inj.syscall(libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        let base = errno_or(base)? as u64;
        // Code and control page, through our own mapping of the region.
        region.write(AGENT_CODE as usize, agent_code::code());
        region.write(CTL_SIGSET, &u64::MAX.to_ne_bytes());
        // Start the thread with every signal blocked (it inherits the mask),
        // then give the caller its mask back.
        let tid = with_signals_blocked(inj, base, |inj| {
            let stack = base + AGENT_INSTALLER_STACK_TOP;
            inj.clone_at(
                base + AGENT_CODE,
                clone_args(THREAD_CLONE_FLAGS, stack, base),
            )
        })?;
        let agent = Agent {
            region,
            guest_base: base,
            tid,
            ram_fd: AtomicU32::new(u32::MAX),
            uffd_fd: AtomicU32::new(u32::MAX),
            resolver_tid: AtomicI32::new(0),
            allowed: sched_getaffinity(tid).ok(),
            cpu: AtomicI64::new(-1),
        };
        // The agent's own descriptor for RAM: opened by the stopped thread
        // in a guest process (see `set_up_agent`), by the agent in a stub.
        match space {
            Space::Guest => agent.open_ram_with(self.ram.raw_fd(), &mut by_injection(inj))?,
            Space::Vmspace => {
                let tgid = proc::tgid_of(inj.tid()).unwrap_or(inj.tid());
                agent.open_ram(self.ram.raw_fd(), tgid)?;
            }
        }
        lock(&self.agents).insert(tid);
        tracing::debug!(tid = %inj.tid(), agent = %tid, base = format_args!("{base:#x}"), "agent started");
        Ok(agent)
    }

    /// The uffd of process `tgid`: created in the guest by `call` (so bound
    /// to its mm), moved to a high descriptor there (the agent registers
    /// with it) and copied to vkrun, which reads it.
    pub(super) fn make_uffd(
        &self,
        agent: &Agent,
        tgid: Pid,
        call: &mut Call<'_>,
    ) -> Result<Userfault, CallError> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let r = call(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        let guest_fd = raise_fd(errno_or(r)?, call)? as i32;
        let stolen = crate::sys::uffd::steal_fd(tgid.as_raw(), guest_fd);
        agent.uffd_fd.store(guest_fd as u32, Ordering::Relaxed);
        Ok(stolen.and_then(Userfault::new)?)
    }

    /// In a vmspace stub the agent's region is within reach of the user
    /// code: make its code read-only (through `inj`, the stub's main
    /// thread) and confine the installer to mm and uffd calls
    /// ([`agent_code::vmspace_agent_filter`]; it installs the filter on
    /// itself). A vmspace has no resolver thread.
    pub(super) fn confine_agent(
        &self,
        inj: &mut Injector,
        agent: &Agent,
        tgid: Pid,
    ) -> Result<(), CallError> {
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        let code = agent.guest_base + AGENT_CODE;
        errno_or(inj.syscall(libc::SYS_mprotect, [code, PAGE, rx, 0, 0, 0])?)?;
        // Requests come from the control page: read-only in the stub (vkrun
        // writes it through its own mapping; the agent answers in the
        // response page).
        let ctl = agent.guest_base;
        let ro = libc::PROT_READ as u64;
        errno_or(inj.syscall(libc::SYS_mprotect, [ctl, PAGE, ro, 0, 0, 0])?)?;
        let filter = agent_code::vmspace_agent_filter();
        let at = AGENT_SCRATCH + SCRATCH_REGISTER;
        let mut bytes = Vec::with_capacity(16 + 8 * filter.len());
        bytes.extend_from_slice(&(filter.len() as u64).to_ne_bytes());
        bytes.extend_from_slice(&(agent.guest_base + at + 16).to_ne_bytes());
        for insn in &filter {
            bytes.extend_from_slice(&insn.code.to_ne_bytes());
            bytes.extend_from_slice(&[insn.jt, insn.jf]);
            bytes.extend_from_slice(&insn.k.to_ne_bytes());
        }
        agent.region.write(at as usize, &bytes);
        let prog = agent.guest_base + at;
        let no_new_privs = libc::PR_SET_NO_NEW_PRIVS as u64;
        let set_filter = libc::SECCOMP_SET_MODE_FILTER as u64;
        let r = agent.run(
            tgid,
            &[
                (libc::SYS_prctl, [no_new_privs, 1, 0, 0, 0, 0]),
                (libc::SYS_seccomp, [set_filter, 0, prog, 0, 0, 0]),
            ],
        )?;
        for v in r {
            errno_or(v)?;
        }
        Ok(())
    }

    /// Start the resolver threads (the in-guest fast path of faults): map
    /// RAM for them, fill their page, make the uffd blocking (the resolvers
    /// are its only readers now) and clone them from `inj`'s thread, signals
    /// blocked, one kept on each CPU that thread may use.
    pub(super) fn start_resolver(
        &self,
        inj: &mut Injector,
        agent: &Agent,
        tgid: Pid,
        uffd: &Userfault,
        enabled: bool,
    ) -> Result<(), CallError> {
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let shared = (libc::MAP_SHARED | libc::MAP_NORESERVE) as u64;
        let ram_fd = u64::from(agent.ram_fd.load(Ordering::Relaxed));
        let size = self.ram.size();
        // The fast path walks RAM through its own mapping; without it the
        // resolver only forwards faults and needs none.
        let ram_base = if enabled {
            let r = by_injection(inj)(libc::SYS_mmap, [0, size, rw, shared, ram_fd, 0])?;
            errno_or(r)? as u64
        } else {
            0
        };
        let page = |off, v| agent.res_qword(off).store(v, Ordering::Relaxed);
        page(RES_RAM_BASE, ram_base);
        page(RES_RAM_SIZE, size);
        page(RES_RAM_FD, ram_fd);
        page(RES_UFFD, u64::from(agent.uffd_fd.load(Ordering::Relaxed)));
        page(RES_SIGSET, u64::MAX);
        agent.res_word(RES_BUDGET).store(
            self.max_runs.min(u64::from(u32::MAX)) as u32,
            Ordering::Relaxed,
        );
        agent
            .res_word(RES_ENABLED)
            .store(u32::from(enabled), Ordering::Release);
        uffd.set_blocking()?;
        let base = agent.guest_base;
        let gadget = base + AGENT_CODE + agent_code::resolver_gadget() as u64;
        // One resolver per CPU the process may run on, each kept there: a
        // fault wakes every reader of the uffd, and the one on the faulting
        // thread's CPU takes it first (the others find nothing and sleep
        // again), so the fault is resolved and its thread woken without a
        // wake-up across CPUs. A resolver that only forwards needs no twin.
        let cpus = if enabled {
            resolver_cpus(inj.tid())
        } else {
            vec![None]
        };
        let tids = with_signals_blocked(inj, base, |inj| {
            let mut tids = Vec::with_capacity(cpus.len());
            for i in 0..cpus.len() as u64 {
                let stack = base + AGENT_RESOLVER_STACK_TOP - i * RESOLVER_STACK;
                tids.push(inj.clone_at(
                    gadget,
                    clone_args(THREAD_CLONE_FLAGS, stack, base + AGENT_RESOLVER),
                )?);
            }
            Ok(tids)
        })?;
        for (&tid, cpu) in tids.iter().zip(&cpus) {
            if let Some(cpu) = cpu {
                pin_to(tid, *cpu);
            }
            lock(&self.agents).insert(tid);
            lock(&self.resolvers).insert(tid, tgid);
            tracing::debug!(%tgid, resolver = %tid, ?cpu, fast = enabled, "resolver started");
        }
        agent
            .resolver_tid
            .store(tids[0].as_raw(), Ordering::Relaxed);
        Ok(())
    }

    /// The agent of a new process: its threads, its uffd, and (guest
    /// processes) its resolver, or (stubs) its confinement.
    pub(super) fn set_up_agent(
        &self,
        inj: &mut Injector,
        tgid: Pid,
        space: Space,
    ) -> Result<(Agent, Userfault), CallError> {
        let agent = self.start_agent(inj, space)?;
        // A guest process's own threads run on meanwhile and could stall
        // the new agent (stop it, unmap its pages): its set-up calls are
        // injected through the stopped thread, which runs only them. A
        // stub's main thread only runs vkrun's gadget calls that its filter
        // allows, so there the agent makes them (user code cannot reach it).
        let uffd = match space {
            Space::Guest => self.make_uffd(&agent, tgid, &mut by_injection(inj))?,
            Space::Vmspace => self.make_uffd(&agent, tgid, &mut agent.by_agent(tgid))?,
        };
        match space {
            // In a vmspace, all of [0, USER_MAX) is the vkernel's: the
            // resolver could not map RAM there to walk it, only forward
            // faults; the fault thread reads the uffd itself (one hand-off
            // less per fault).
            Space::Vmspace => self.confine_agent(inj, &agent, tgid)?,
            Space::Guest => {
                let fast = !lock(&self.trace).set().faults;
                self.start_resolver(inj, &agent, tgid, &uffd, fast)?;
            }
        }
        Ok((agent, uffd))
    }
}

/// A system call in the mm of the process being set up, returning its raw
/// result: an injection through the stopped thread that asked (while a
/// guest process's agent is made, so the tracer waits on nothing the guest
/// can stall), or the agent ([`Agent::by_agent`]).
pub(super) type Call<'a> = dyn FnMut(i64, [u64; 6]) -> Result<i64, CallError> + 'a;

/// The injector's thread as a [`Call`].
pub(super) fn by_injection(
    inj: &mut Injector,
) -> impl FnMut(i64, [u64; 6]) -> Result<i64, CallError> + '_ {
    move |nr, a| Ok(inj.syscall(nr, a)?)
}

/// Move a descriptor of vkrun's to a high number, out of the way of the
/// guest's own (programs reuse low numbers); keep it where it is if that
/// fails.
fn raise_fd(fd: i64, call: &mut Call<'_>) -> Result<u64, CallError> {
    let dupfd = libc::F_DUPFD_CLOEXEC as u64;
    let r = call(libc::SYS_fcntl, [fd as u64, dupfd, AGENT_FD_FLOOR, 0, 0, 0])?;
    match errno_or(r) {
        Ok(high) => {
            call(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
            Ok(high as u64)
        }
        Err(_) => Ok(fd as u64),
    }
}

/// The CPUs to keep one resolver each on: those thread `tid` may run on,
/// if there are at most [`MAX_RESOLVERS`]; else that many resolvers that
/// the scheduler places (`None`).
fn resolver_cpus(tid: Pid) -> Vec<Option<usize>> {
    let Ok(set) = sched_getaffinity(tid) else {
        return vec![None];
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    match cpus.len() {
        0 => vec![None],
        n if n <= MAX_RESOLVERS => cpus.into_iter().map(Some).collect(),
        _ => vec![None; MAX_RESOLVERS],
    }
}

/// Keep resolver `tid` on `cpu` (best effort: unpinned it still works).
fn pin_to(tid: Pid, cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok()
        && let Err(errno) = sched_setaffinity(tid, &set)
    {
        tracing::debug!(%tid, cpu, %errno, "cannot keep a resolver on its CPU");
    }
}

/// Run `f` (which clones a thread from `inj`'s) with every signal blocked in
/// `inj`'s thread, so the new thread starts with them blocked; then give
/// the thread its mask back (also when `f` failed). `base` is the agent
/// region, whose control page holds the all-ones mask and whose scratch
/// page keeps the old one.
fn with_signals_blocked<T>(
    inj: &mut Injector,
    base: u64,
    f: impl FnOnce(&mut Injector) -> Result<T, crate::error::TraceeError>,
) -> Result<T, crate::error::TraceeError> {
    let old_mask = base + AGENT_SCRATCH + SCRATCH_SIGMASK;
    let setmask = libc::SIG_SETMASK as u64;
    inj.syscall(
        libc::SYS_rt_sigprocmask,
        [setmask, base + CTL_SIGSET as u64, old_mask, 8, 0, 0],
    )?;
    let out = f(inj);
    inj.syscall(libc::SYS_rt_sigprocmask, [setmask, old_mask, 0, 8, 0, 0])?;
    out
}
