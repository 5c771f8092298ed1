//! `vmspace-check fuzz SEED CALLS`: a hostile guest. Two threads each make CALLS
//! hypercalls chosen at random (seeded: a failure can be replayed) with
//! arguments drawn from the values that break things: null, small and huge
//! numbers, misaligned and kernel addresses, an address just before an
//! unmapped page, unknown vmspace ids and descriptors, every flag bit, and
//! frames full of random registers that RUN user code wherever they point.
//! Meanwhile a third thread sends the two SIGUSR1 (handled, no
//! `SA_RESTART`) at random moments, and now and then a thread forks a child
//! that makes a few calls of its own (it shares the vmspaces) and exits.
//!
//! The guest only ever hands vkrun pointers to its own scratch buffers or to
//! addresses where nothing of it lives, and never `MAP_FIXED` in its own
//! space, so whatever vkrun does with the calls cannot hurt the guest
//! itself. What is checked is vkrun: every call returns (a watchdog thread
//! ends a RUN that spins longer than [`WATCHDOG`] with a signal), with 0, a
//! value, or one of the ABI's error numbers; a RUN that returns 0 with its
//! frame in the scratch buffer says why in a way the ABI allows (section 7:
//! a known trap number; `T_FAST_SYSCALL` with `tf_err` 2; `T_PAGEFLT` with
//! user-mode PGEX bits only; `T_SIGNAL` only when a signal handler ran
//! during the call). The last line is `fuzz: N calls, K ok, then the errors
//! by name` and the RUN exits by trap; the test around it checks that vkrun
//! exits with the guest's status and leaves no process behind.

use std::collections::BTreeMap;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vkabi::hypercall::{self, Errno};
use vkabi::{
    Hypercall, MADV_INVAL, MADV_SETMAP, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED,
    MAP_STACK, MAP_VPAGETABLE, PAGE_SIZE, PGEX_I, PGEX_P, PGEX_U, PGEX_W, PROT_EXEC, PROT_READ,
    PROT_WRITE, T_FAST_SYSCALL, T_PAGEFLT, T_SIGNAL, USER_MAX, VMSPACE_CTL_RUN,
};

use crate::report::errno_text;
use crate::sys::{self, Hole};

/// A RUN still in user code after this long is ended with SIGUSR1.
const WATCHDOG: Duration = Duration::from_secs(2);
/// Bytes of the scratch buffer that calls may read and write.
const SCRATCH: usize = 64 * 1024;
/// `MAP_FIXED_NOREPLACE`: as dangerous as `MAP_FIXED` in the guest's space.
const MAP_FIXED_NOREPLACE: i32 = 0x10_0000;
/// The error numbers these calls may answer: the ABI's, and mmap(2)'s for
/// the mapping calls. Not `EIO`: that is a vmspace whose host process died.
const EXPECTED_ERRORS: [i32; 14] = [
    libc::EINVAL,
    libc::EFAULT,
    libc::ENOENT,
    libc::EEXIST,
    libc::EBUSY,
    libc::EOPNOTSUPP,
    libc::EINTR,
    libc::ENOMEM,
    libc::EBADF,
    libc::EACCES,
    libc::ENODEV,
    libc::EOVERFLOW,
    libc::EPERM,
    libc::ENXIO,
];

/// xorshift64*: small, seeded, good enough to pick arguments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The guest's own memory the calls may use, and where nothing lives.
struct Targets {
    /// Read and written by calls; its address is stable.
    scratch: Vec<u8>,
    /// Mapped pages followed by an unmapped one.
    hole: Hole,
    ram_fd: i32,
    ram_size: u64,
}

impl Targets {
    /// A pointer argument: into the scratch buffer (with room for a frame),
    /// just before the hole, or somewhere nothing of the guest lives.
    fn pointer(&mut self, rng: &mut Rng) -> u64 {
        let scratch = self.scratch.as_mut_ptr() as u64;
        match rng.below(10) {
            0..=4 => scratch + rng.below((SCRATCH - 512) as u64),
            5 => self.hole.before_hole(rng.below(64)),
            6 => self.hole.unmapped() + rng.below(PAGE_SIZE),
            // Below mmap_min_addr, beyond user space, kernel space.
            _ => rng.pick(&[
                0,
                1,
                0xfff,
                PAGE_SIZE,
                1 << 47,
                0xffff_8000_0000_0000,
                u64::MAX - PAGE_SIZE + 1,
                u64::MAX,
            ]),
        }
    }

    /// Write `words` at `addr` if it lies in the scratch buffer.
    fn put(&mut self, addr: u64, words: &[u64]) {
        let base = self.scratch.as_ptr() as u64;
        let Some(at) = addr.checked_sub(base).map(|a| a as usize) else {
            return;
        };
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        if let Some(dst) = self.scratch.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(&bytes);
        }
    }

    /// The trap frame at `addr`, if it lies wholly in the scratch buffer.
    fn frame(&self, addr: u64) -> Option<vkabi::TrapFrame> {
        let at = addr.checked_sub(self.scratch.as_ptr() as u64)? as usize;
        let bytes = self.scratch.get(at..at + 25 * 8)?;
        let mut words = [0u64; 25];
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        }
        Some(vkabi::TrapFrame::from_words(words))
    }

    fn length(&self, rng: &mut Rng) -> u64 {
        match rng.below(6) {
            0 => rng.pick(&[0, 1, 7, 48, 200, PAGE_SIZE, 2 * PAGE_SIZE]),
            1 => rng.below(SCRATCH as u64),
            2 => rng.below(1 << 30),
            3 => self.ram_size,
            4 => rng.pick(&[u64::MAX, 1 << 63, USER_MAX, u64::MAX - PAGE_SIZE + 1]),
            _ => rng.below(64) * PAGE_SIZE,
        }
    }

    /// A user address in a vmspace (anything goes there).
    fn user_address(rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 => rng.below(64) * PAGE_SIZE,
            1 => rng.below(USER_MAX / PAGE_SIZE) * PAGE_SIZE,
            2 => rng.next(),
            _ => rng.pick(&[0, USER_MAX - PAGE_SIZE, USER_MAX, 1 << 47, u64::MAX]),
        }
    }

    fn fd(&self, rng: &mut Rng) -> u64 {
        rng.pick(&[self.ram_fd, self.ram_fd, -1, 0, 1, 999, i32::MAX]) as u64
    }

    fn offset(&self, rng: &mut Rng) -> u64 {
        match rng.below(4) {
            0 => 0,
            1 => rng.below(self.ram_size / PAGE_SIZE) * PAGE_SIZE,
            2 => self.ram_size,
            _ => rng.next(),
        }
    }
}

fn vmspace_id(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => rng.next(),
        _ => 0x5eed_0000 + rng.below(4),
    }
}

fn prot(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.next() & 0xffff_ffff,
        _ => rng.pick(&[
            PROT_READ,
            PROT_READ | PROT_WRITE,
            PROT_READ | PROT_EXEC,
            0,
            7,
        ]) as u64,
    }
}

fn flags(rng: &mut Rng) -> i32 {
    match rng.below(4) {
        0 => rng.next() as i32,
        _ => {
            let bits = [
                MAP_SHARED,
                MAP_PRIVATE,
                MAP_ANONYMOUS,
                MAP_VPAGETABLE,
                MAP_FIXED,
                MAP_STACK,
            ];
            bits.iter()
                .filter(|_| rng.below(2) == 0)
                .fold(0, |f, b| f | b)
        }
    }
}

fn behav(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.next(),
        1 => rng.below(16),
        _ => rng.pick(&[MADV_INVAL, MADV_SETMAP]) as u64,
    }
}

/// One random call: which, and its six arguments.
fn call(rng: &mut Rng, t: &mut Targets) -> (Hypercall, [u64; 6]) {
    // Every hypercall, RUN more often (it has the most paths).
    let h = if rng.below(4) == 0 {
        Hypercall::VmspaceCtl
    } else {
        rng.pick(&Hypercall::ALL)
    };
    let args = match h {
        Hypercall::VkInfo => [t.pointer(rng), t.length(rng), 0, 0, 0, 0],
        Hypercall::VkMmap => {
            // Never FIXED in the guest's own space: that would be the guest
            // unmapping itself, not vkrun failing.
            let flags = flags(rng) & !(MAP_FIXED | MAP_FIXED_NOREPLACE);
            let anywhere = rng.below(USER_MAX / PAGE_SIZE) * PAGE_SIZE;
            let addr = rng.pick(&[0, 1 << 40, anywhere]);
            [
                addr,
                t.length(rng),
                prot(rng),
                flags as u64,
                t.fd(rng),
                t.offset(rng),
            ]
        }
        Hypercall::Mcontrol => [t.pointer(rng), t.length(rng), behav(rng), rng.next(), 0, 0],
        Hypercall::VmspaceCreate => [vmspace_id(rng), rng.below(3), t.pointer(rng), 0, 0, 0],
        Hypercall::VmspaceDestroy => [vmspace_id(rng), 0, 0, 0, 0, 0],
        Hypercall::VmspaceCtl => {
            let tf = t.pointer(rng);
            let vf = t.pointer(rng);
            // Mostly frames that can run: random registers, rip where the
            // fuzz maps things, canonical FS/GS bases.
            if rng.below(4) != 0 {
                let mut regs = [0u64; 25];
                regs.iter_mut().for_each(|r| *r = rng.next());
                regs[20] = rng.below(64) * PAGE_SIZE + rng.below(PAGE_SIZE); // tf_rip
                t.put(tf, &regs);
            }
            if rng.below(4) != 0 {
                let tls = [
                    rng.next() & 0x7fff_ffff_ffff,
                    0,
                    rng.next() & 0x7fff_ffff_ffff,
                    0,
                ];
                t.put(vf, &tls);
            }
            let other = rng.next();
            let cmd = rng.pick(&[VMSPACE_CTL_RUN as u64, VMSPACE_CTL_RUN as u64, 0, other]);
            [vmspace_id(rng), cmd, tf, vf, 0, 0]
        }
        Hypercall::VmspaceMmap => {
            let packed = prot(rng) & 0xffff_ffff | u64::from(flags(rng) as u32) << 32;
            [
                vmspace_id(rng),
                Targets::user_address(rng),
                t.length(rng),
                packed,
                t.fd(rng),
                t.offset(rng),
            ]
        }
        Hypercall::VmspaceMunmap => [
            vmspace_id(rng),
            Targets::user_address(rng),
            t.length(rng),
            0,
            0,
            0,
        ],
        Hypercall::VmspaceMcontrol => [
            vmspace_id(rng),
            Targets::user_address(rng),
            t.length(rng),
            behav(rng),
            rng.next(),
            0,
        ],
        Hypercall::VmspacePread | Hypercall::VmspacePwrite => {
            // The buffer: in the scratch with room for the length, or the
            // unmapped page (then any length).
            let len = t.length(rng);
            let (buf, len) = if rng.below(3) == 0 {
                (t.hole.unmapped(), len)
            } else {
                let len = len.min(SCRATCH as u64 / 2);
                let at = rng.below(SCRATCH as u64 - len + 1);
                (t.scratch.as_mut_ptr() as u64 + at, len)
            };
            let other = rng.next();
            [
                vmspace_id(rng),
                buf,
                len,
                rng.pick(&[0, 0, 0, 1, other]),
                Targets::user_address(rng),
                0,
            ]
        }
    };
    (h, args)
}

/// Threads that fuzz at once (the same vmspace ids: creation, destruction
/// and RUN race).
const THREADS: u64 = 2;

/// One call in [`FORK_ODDS`] is a fork instead: the child (sharing the
/// vmspace registry) makes [`CHILD_CALLS`] calls and exits.
const FORK_ODDS: u64 = 400;
const CHILD_CALLS: usize = 40;
const CHILD_LIFE: Duration = Duration::from_millis(200);

/// What one fuzzing thread saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<i32, u64>,
    unexpected: Vec<String>,
    kicks: u64,
    forks: u64,
    /// RUNs that returned 0, by `tf_trapno`.
    traps: BTreeMap<u64, u64>,
}

/// The trap numbers RUN may report (ABI section 7: DragonFly's `T_*`).
fn known_trap(trapno: u64) -> bool {
    matches!(trapno, 0..=30 | vkabi::T_SYSCALL80 | T_FAST_SYSCALL)
}

/// Why a RUN that returned 0 with `frame` breaks the ABI, if it does;
/// `signalled` says whether a signal handler ran during the call.
fn bad_exit(frame: &vkabi::TrapFrame, signalled: bool) -> Option<String> {
    let (trapno, err) = (frame.tf_trapno, frame.tf_err);
    let user_pgex = PGEX_P | PGEX_W | PGEX_U | PGEX_I;
    match trapno {
        T_SIGNAL if !signalled => Some("T_SIGNAL but no signal arrived".to_owned()),
        T_FAST_SYSCALL if err != 2 => Some(format!("T_FAST_SYSCALL with tf_err {err:#x}")),
        T_PAGEFLT if err & !user_pgex != 0 || err & PGEX_U == 0 => {
            Some(format!("T_PAGEFLT with tf_err {err:#x}"))
        }
        t if !known_trap(t) => Some(format!("unknown tf_trapno {t:#x}")),
        _ => None,
    }
}

/// Fork a child that makes `calls` (made up beforehand: the child of a
/// multi-threaded process may not allocate) and exits, and wait for it;
/// a timer (SIGALRM, fatal) ends a child whose RUN spins for [`CHILD_LIFE`].
/// Returns whether it ran.
fn fork_child(calls: &[(Hypercall, [u64; 6])]) -> bool {
    // SAFETY: the child runs only raw system calls (`setitimer`, the
    // hypercalls, `_exit`), which are async-signal-safe, on memory it
    // inherited; no lock another thread held at the fork is touched.
    match unsafe { libc::fork() } {
        -1 => false,
        0 => {
            // SAFETY: as above; the arguments are as in the parent's calls.
            unsafe {
                let timer = libc::itimerval {
                    it_interval: libc::timeval {
                        tv_sec: 0,
                        tv_usec: 0,
                    },
                    it_value: libc::timeval {
                        tv_sec: 0,
                        tv_usec: CHILD_LIFE.as_micros() as libc::suseconds_t,
                    },
                };
                libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut());
                for (h, args) in calls {
                    hypercall::hypercall(*h, *args);
                }
            }
            sys::exit_now(0)
        }
        pid => sys::waitpid(pid).is_ok(),
    }
}

/// Run the fuzzer: [`THREADS`] threads of `calls` calls each; returns the
/// process's exit code.
pub fn run(seed: u64, calls: u64, ram_fd: i32, ram_size: u64) -> u8 {
    if let Err(e) = sys::install_counter(libc::SIGUSR1, false) {
        println!("FAIL fuzz: sigaction: {e}");
        return 1;
    }
    let threads: Vec<_> = (0..THREADS)
        .map(|k| std::thread::spawn(move || fuzz(seed * THREADS + k, calls, ram_fd, ram_size)))
        .collect();
    // Signals at random moments (SIGUSR1, handled, no SA_RESTART): a RUN
    // then ends early or fails with EINTR, as may any call they interrupt.
    let storm_done = Arc::new(AtomicBool::new(false));
    let storm = {
        let done = Arc::clone(&storm_done);
        let targets: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(50 + rng.below(500)));
                // The fuzzing threads stay joinable until `done` is set.
                let _ = sys::pthread_kill(rng.pick(&targets), libc::SIGUSR1);
                sent += 1;
            }
            sent
        })
    };
    let mut all = Tally::default();
    for t in threads {
        match t.join() {
            Ok(Ok(tally)) => {
                all.ok += tally.ok;
                all.kicks += tally.kicks;
                all.forks += tally.forks;
                for (t, n) in tally.traps {
                    *all.traps.entry(t).or_default() += n;
                }
                for (e, n) in tally.errors {
                    *all.errors.entry(e).or_default() += n;
                }
                all.unexpected.extend(tally.unexpected);
            }
            Ok(Err(e)) => all.unexpected.push(e),
            Err(_) => all.unexpected.push("a fuzzing thread panicked".to_owned()),
        }
    }
    storm_done.store(true, Ordering::Release);
    let signals = storm.join().unwrap_or(0);
    for id in 0..4 {
        let _ = hypercall::vmspace_destroy(0x5eed_0000 + id);
    }
    let errs: Vec<String> = all
        .errors
        .iter()
        .map(|(e, n)| format!("{} x{n}", errno_text(Errno(*e))))
        .collect();
    let traps: Vec<String> = all
        .traps
        .iter()
        .map(|(t, n)| format!("{t:#x} x{n}"))
        .collect();
    println!(
        "fuzz: {} calls, {} ok, {} (signals: {signals}, from the watchdog: {}; children: {})",
        calls * THREADS,
        all.ok,
        errs.join(", "),
        all.kicks,
        all.forks
    );
    println!("fuzz: RUN exits by tf_trapno: {}", traps.join(", "));
    if all.unexpected.is_empty() {
        0
    } else {
        println!("FAIL fuzz: unexpected: {}", all.unexpected.join("; "));
        1
    }
}

/// One fuzzing thread.
fn fuzz(seed: u64, calls: u64, ram_fd: i32, ram_size: u64) -> Result<Tally, String> {
    let hole = Hole::new(2).map_err(|e| format!("mmap: {e}"))?;
    // splitmix64 of the seed: distinct seeds, distinct non-zero states.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut rng = Rng((z ^ (z >> 31)) | 1);
    let mut scratch = vec![0u8; SCRATCH];
    // Random registers for RUN (rip, rsp and the rest anywhere), and
    // int3/ud2/hlt for vmspace_pwrite to leave as code.
    for (i, b) in scratch.iter_mut().enumerate() {
        *b = if i < SCRATCH / 2 {
            rng.next() as u8
        } else {
            rng.pick(&[0xcc, 0x0f, 0x0b, 0xf4])
        };
    }
    let mut t = Targets {
        scratch,
        hole,
        ram_fd,
        ram_size,
    };

    // The watchdog: a call in progress for longer than WATCHDOG gets a
    // signal (a RUN then returns with tf_trapno 0).
    let started_ms = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let watchdog = {
        let (started_ms, done) = (Arc::clone(&started_ms), Arc::clone(&done));
        let epoch = Instant::now();
        let limit = WATCHDOG.as_millis() as u64;
        std::thread::spawn(move || {
            let mut kicks = 0u64;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                let since = started_ms.load(Ordering::Acquire);
                let now = epoch.elapsed().as_millis() as u64 + 1;
                if since != 0 && now - since > limit {
                    // `me` is this fuzzing thread, alive until `done`.
                    let _ = sys::pthread_kill(me, libc::SIGUSR1);
                    kicks += 1;
                }
            }
            kicks
        })
    };
    let epoch = Instant::now();

    let mut tally = Tally::default();
    for i in 0..calls {
        if rng.below(FORK_ODDS) == 0 {
            let calls: Vec<_> = (0..CHILD_CALLS).map(|_| call(&mut rng, &mut t)).collect();
            tally.forks += u64::from(fork_child(&calls));
            continue;
        }
        let (h, args) = call(&mut rng, &mut t);
        let (signals_before, _) = sys::handled(libc::SIGUSR1);
        started_ms.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
        // SAFETY: every pointer argument is into `t.scratch` with room for
        // what the call reads or writes, into the hole's spare mapped pages
        // (which nothing uses) and the unmapped page after them, or an
        // address where the guest has nothing; vk_mmap never replaces a
        // mapping (no FIXED). Without vkrun these numbers are not system
        // calls.
        let ret = unsafe { hypercall::hypercall(h, args) };
        started_ms.store(0, Ordering::Release);
        let (signals_after, _) = sys::handled(libc::SIGUSR1);
        match hypercall::result(ret) {
            Ok(_) => {
                tally.ok += 1;
                let run = h == Hypercall::VmspaceCtl && args[1] == VMSPACE_CTL_RUN as u64;
                if let Some(frame) = t.frame(args[2]).filter(|_| run) {
                    *tally.traps.entry(frame.tf_trapno).or_default() += 1;
                    let signalled = signals_after != signals_before;
                    if let Some(why) = bad_exit(&frame, signalled)
                        && tally.unexpected.len() < 5
                    {
                        tally
                            .unexpected
                            .push(format!("seed {seed} call {i}: RUN: {why}"));
                    }
                }
            }
            Err(Errno(e)) => {
                *tally.errors.entry(e).or_default() += 1;
                if !EXPECTED_ERRORS.contains(&e) && tally.unexpected.len() < 5 {
                    tally.unexpected.push(format!(
                        "seed {seed} call {i}: {h:?}{args:x?} = {}",
                        errno_text(Errno(e))
                    ));
                }
            }
        }
    }
    done.store(true, Ordering::Release);
    tally.kicks = watchdog.join().unwrap_or(0);
    Ok(tally)
}
