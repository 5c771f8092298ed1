//! The vkernel proper: one user process in one vmspace, run the way
//! DragonFly's vkernel runs its user processes (ABI section 7).
//!
//! [`Kernel::boot`] maps guest RAM as the direct map (DMAP), starts a
//! 4-level page table in it (frames from 1 MiB up, never reused), creates a
//! vmspace, maps one `MAP_VPAGETABLE` window over the whole user range and
//! points it at the table with `MADV_SETMAP`. [`Kernel::load`] copies a
//! program's code into RAM frames and maps it; [`Kernel::run`] then loops on
//! `vmspace_ctl(RUN)` and serves what comes back:
//!
//! - `T_PAGEFLT` in the heap or the stack on a page the tables do not map:
//!   a fresh frame, its leaf filled with `V|RW|U|NX`, RUN again (the access
//!   is retried; filling an invalid entry is an upgrade, so no `MADV_INVAL`);
//! - `T_FAST_SYSCALL`: `write(1|2, buf, n)` (the bytes read with
//!   `vmspace_pread`), `getpid()` (answers [`USER_PID`]), `exit(code)`; any
//!   other number answers `-ENOSYS`; the result goes in `tf_rax` and RUN
//!   continues after the `syscall` instruction;
//! - `T_SIGNAL` (a signal for this thread; its handler has run): RUN again;
//! - anything else kills the user process with the signal a BSD kernel
//!   would send, or, for traps user code cannot raise, fails the vkernel.
//!
//! The user address space (page index = `va >> 12`, because the window's
//! file offset equals its start; so the tables have the shape of x86-64
//! hardware tables):
//!
//! ```text
//! [USER_BASE, user_max)               the window (MAP_SHARED|MAP_VPAGETABLE|MAP_FIXED)
//!   CODE_BASE = USER_BASE             the program's code, mapped before it runs: V|U
//!   [HEAP_BASE, HEAP_BASE+HEAP_SIZE)  demand-zero heap: V|RW|U|NX on first touch
//!   [user_max-STACK_SIZE, user_max)   demand-zero stack; rsp starts at user_max
//! ```
//!
//! A fresh frame is not cleared: guest RAM is a new memfd, zero until
//! written, and frames are never handed out twice.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use vkabi::hypercall::Errno;
use vkabi::{
    PAGE_SHIFT, PAGE_SIZE, PGEX_I, PGEX_W, RFLAGS_USER_SET, T_ALIGNFLT, T_ARITHTRAP, T_BOUND,
    T_BPTFLT, T_DIVIDE, T_FAST_SYSCALL, T_FPOPFLT, T_OFLOW, T_PAGEFLT, T_PRIVINFLT, T_PROTFLT,
    T_SEGNPFLT, T_SIGNAL, T_STKFLT, T_SYSCALL80, T_TRCTRAP, T_TSSFLT, T_XMMFLT, TrapFrame, VPTE_A,
    VPTE_M, VPTE_NX, VPTE_RW, VPTE_U, VextFrame, VkInfo,
};
use vkguest::{HypercallError, Vmspace};
use vpte::{BuildError, FrameAllocator, GuestPhysAddr, PageIndex, PageTableBuilder, PhysMem, Vpte};

use crate::user::{Program, SYS_EXIT, SYS_EXIT_GROUP, SYS_GETPID, SYS_WRITE};

/// The window's first address and file offset (so page index = `va >> 12`):
/// the traditional ELF load address, clear of page 0 and of the host's
/// `vm.mmap_min_addr`.
pub const USER_BASE: u64 = 0x40_0000;
/// Where a program's code is mapped; its entry point.
pub const CODE_BASE: u64 = USER_BASE;
/// The demand-zero heap: its first address ...
pub const HEAP_BASE: u64 = 0x1000_0000;
/// ... and its size (4 GiB: room for a million touched pages).
pub const HEAP_SIZE: u64 = 1 << 32;
/// The demand-zero stack below `user_max`.
pub const STACK_SIZE: u64 = 8 << 20;
/// Frames below this stay unused (frame 0 above all).
pub const FIRST_FRAME: u64 = 1 << 20;
/// Leaf bits of a code page: read and execute.
pub const CODE_BITS: u64 = VPTE_U;
/// Leaf bits of a heap or stack page: read and write, no execute.
pub const DATA_BITS: u64 = VPTE_RW | VPTE_U | VPTE_NX;
/// What `getpid()` answers in the user process.
pub const USER_PID: u64 = 1;
/// The most one `write` copies (a longer one is a short write).
const MAX_IO: u64 = 1 << 16;

// The layout fits below the ABI's user_max, page aligned, with 1 MiB of
// room for code below the heap.
const _: () = {
    assert!(HEAP_BASE >= CODE_BASE + (1 << 20));
    assert!(HEAP_BASE + HEAP_SIZE <= vkabi::USER_MAX - STACK_SIZE);
    assert!(USER_BASE.is_multiple_of(PAGE_SIZE) && HEAP_BASE.is_multiple_of(PAGE_SIZE));
};

/// Page tables in guest RAM, built through the DMAP.
type Tables = PageTableBuilder<&'static [AtomicU64]>;

/// Why the vkernel itself failed (as opposed to its user process).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A hypercall failed.
    #[error(transparent)]
    Hypercall(#[from] HypercallError),
    /// Guest RAM could not be mapped.
    #[error("mmap of ram_fd {fd} ({size} bytes): {source}")]
    MapRam {
        /// `vk_info.ram_fd`.
        fd: i32,
        /// `vk_info.ram_size`.
        size: u64,
        /// What mmap(2) said.
        source: io::Error,
    },
    /// No frame left.
    #[error("out of guest RAM: no frame left for {what} (ram_size {ram_size:#x}; try a larger -m)")]
    OutOfFrames {
        /// What the frame was for.
        what: &'static str,
        /// `vk_info.ram_size`.
        ram_size: u64,
    },
    /// The table builder refused.
    #[error("page tables: {0}")]
    Tables(#[from] BuildError),
    /// `vk_info` described a user range too small for the layout.
    #[error("user_max {user_max:#x} leaves no room for the heap and the stack")]
    UserMax {
        /// `vk_info.user_max`.
        user_max: u64,
    },
    /// `vmspace_mmap` with `MAP_FIXED` put the window elsewhere.
    #[error("vmspace_mmap(MAP_FIXED) put the window at {got:#x}, not at {want:#x}")]
    WindowMoved {
        /// The address asked for.
        want: u64,
        /// The address returned.
        got: u64,
    },
    /// RUN reported a fault the host should have resolved by its walk.
    #[error(
        "T_PAGEFLT at {addr:#x} (err {err:#x}, rip {rip:#x}), but the tables map it with {leaf}: \
         the host did not resolve a valid entry"
    )]
    Unresolved {
        /// `tf_addr`.
        addr: u64,
        /// `tf_err`.
        err: u64,
        /// `tf_rip`.
        rip: u64,
        /// The leaf the tables hold for the page.
        leaf: Vpte,
    },
    /// RUN returned a trap that user code cannot raise.
    #[error("RUN returned trap {trapno} ({}) at rip {rip:#x}: not a user trap", trap_name(*.trapno))]
    UnexpectedTrap {
        /// `tf_trapno`.
        trapno: u64,
        /// `tf_rip`.
        rip: u64,
    },
    /// A check of what the user process left in RAM failed.
    #[error("{0}")]
    Check(String),
}

/// How the user process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserExit {
    /// It called `exit(code)`.
    Exited(i32),
    /// A trap killed it, with the signal a BSD kernel would send.
    Killed {
        /// The signal.
        signal: i32,
        /// The trap and where, for the message.
        why: String,
    },
}

/// What the vkernel served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// `vmspace_ctl(RUN)` calls.
    pub runs: u64,
    /// `T_PAGEFLT` exits served by filling a leaf.
    pub page_faults: u64,
    /// `T_FAST_SYSCALL` exits (including the final `exit`).
    pub syscalls: u64,
    /// `T_SIGNAL` exits.
    pub signals: u64,
    /// When RUN first came back with a system call: the user programs'
    /// clock-start marker.
    marker: Option<Instant>,
    /// RUN calls after the marker, up to and including the one that exited.
    timed_runs: u64,
    /// When RUN came back with `exit`.
    end: Option<Instant>,
}

impl Stats {
    /// The time from the marker to `exit` and the RUN calls in it, if the
    /// program made a system call before exiting.
    pub fn timed(&self) -> Option<(Duration, u64)> {
        Some((self.end?.duration_since(self.marker?), self.timed_runs))
    }
}

/// The vkernel: guest RAM, the user process's tables and its vmspace.
pub struct Kernel {
    info: VkInfo,
    ram: &'static [AtomicU64],
    pt: Tables,
    vm: Vmspace,
    /// What has been served so far.
    pub stats: Stats,
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("vm", &self.vm)
            .field("master", &self.pt.master())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Map RAM, start the tables, create the vmspace and map its window.
    pub fn boot(info: VkInfo) -> Result<Kernel, KernelError> {
        let (fd, size) = (info.ram_fd, info.ram_size);
        let ram = vkguest::map_ram(fd, size).map_err(|source| KernelError::MapRam {
            fd,
            size,
            source,
        })?;
        let alloc = FrameAllocator::new(GuestPhysAddr(FIRST_FRAME)..GuestPhysAddr(size));
        let pt = Tables::new(ram, alloc).map_err(|e| match e {
            BuildError::OutOfFrames => KernelError::OutOfFrames {
                what: "the L4 table",
                ram_size: size,
            },
            e => e.into(),
        })?;
        let user_max = info.user_max;
        if user_max < HEAP_BASE + HEAP_SIZE + STACK_SIZE {
            return Err(KernelError::UserMax { user_max });
        }
        let vm = Vmspace::create()?;
        let len = user_max - USER_BASE;
        let got = vm.map_vpagetable(USER_BASE, len, USER_BASE, fd)?;
        if got != USER_BASE {
            return Err(KernelError::WindowMoved {
                want: USER_BASE,
                got,
            });
        }
        vm.setmap(USER_BASE, len, pt.master().raw())?;
        Ok(Kernel {
            info,
            ram,
            pt,
            vm,
            stats: Stats::default(),
        })
    }

    /// The top of the user stack (`user_max`).
    pub fn stack_top(&self) -> u64 {
        self.info.user_max
    }

    /// Copy `program`'s code into fresh frames and map it at [`CODE_BASE`]
    /// (read and execute); returns the entry point.
    pub fn load(&mut self, program: Program) -> Result<u64, KernelError> {
        let first = CODE_BASE >> PAGE_SHIFT;
        for (page, chunk) in (first..).zip(program.code().chunks(PAGE_SIZE as usize)) {
            let frame = self.frame("code")?;
            self.copy_to_frame(frame, chunk);
            self.pt.map_page(PageIndex(page), frame, CODE_BITS)?;
        }
        Ok(CODE_BASE)
    }

    /// Map `pages` pages from `base` to fresh frames before the program
    /// runs, so that the host resolves their faults without RUN returning.
    pub fn prefill(&mut self, base: u64, pages: u64) -> Result<(), KernelError> {
        let first = base >> PAGE_SHIFT;
        for page in first..first + pages {
            let frame = self.frame("a prefilled page")?;
            self.pt.map_page(PageIndex(page), frame, DATA_BITS)?;
        }
        Ok(())
    }

    /// The frame a program starts with: `rip = entry`, `rsp` at the top of
    /// the stack, `rdi` and `rsi` its arguments.
    pub fn start_frame(&self, entry: u64, args: [u64; 2]) -> TrapFrame {
        TrapFrame {
            tf_rip: entry,
            tf_rsp: self.stack_top(),
            tf_rdi: args[0],
            tf_rsi: args[1],
            tf_rflags: RFLAGS_USER_SET,
            ..TrapFrame::default()
        }
    }

    /// Run the user context from `tf` until it exits or is killed, serving
    /// its page faults and system calls.
    pub fn run(&mut self, tf: &mut TrapFrame) -> Result<UserExit, KernelError> {
        let mut vf = VextFrame::default();
        loop {
            self.vm.run(tf, &mut vf)?;
            self.stats.runs += 1;
            if self.stats.marker.is_some() {
                self.stats.timed_runs += 1;
            }
            match tf.tf_trapno {
                T_FAST_SYSCALL => {
                    self.stats.syscalls += 1;
                    if self.stats.marker.is_none() {
                        self.stats.marker = Some(Instant::now());
                    }
                    if let Some(code) = self.syscall(tf)? {
                        self.stats.end = Some(Instant::now());
                        return Ok(UserExit::Exited(code));
                    }
                }
                T_PAGEFLT => {
                    if let Some(killed) = self.page_fault(tf)? {
                        return Ok(killed);
                    }
                }
                T_SIGNAL => self.stats.signals += 1,
                trapno => {
                    let Some(signal) = trap_signal(trapno) else {
                        return Err(KernelError::UnexpectedTrap {
                            trapno,
                            rip: tf.tf_rip,
                        });
                    };
                    return Ok(UserExit::Killed {
                        signal,
                        why: format!("{} at rip {:#x}", trap_name(trapno), tf.tf_rip),
                    });
                }
            }
        }
    }

    /// Serve the system call in `tf`; `Some(code)` for `exit(code)`.
    fn syscall(&mut self, tf: &mut TrapFrame) -> Result<Option<i32>, KernelError> {
        let ret = match tf.tf_rax {
            SYS_WRITE => self.sys_write(tf.tf_rdi, tf.tf_rsi, tf.tf_rdx)?,
            SYS_GETPID => USER_PID as i64,
            SYS_EXIT | SYS_EXIT_GROUP => return Ok(Some(tf.tf_rdi as i32)),
            _ => -i64::from(libc::ENOSYS),
        };
        tf.tf_rax = ret as u64;
        Ok(None)
    }

    /// `write(fd, buf, n)` for fds 1 and 2: copy the bytes out of the
    /// vmspace with `vmspace_pread` and write them to this process's stdout
    /// or stderr. Returns the count or `-errno`, as Linux would.
    fn sys_write(&mut self, fd: u64, buf: u64, n: u64) -> Result<i64, KernelError> {
        let mut out: Box<dyn Write> = match fd {
            1 => Box::new(io::stdout().lock()),
            2 => Box::new(io::stderr().lock()),
            _ => return Ok(-i64::from(libc::EBADF)),
        };
        if n == 0 {
            return Ok(0);
        }
        let mut bytes = vec![0u8; n.min(MAX_IO) as usize];
        let got = match self.vm.pread(&mut bytes, buf) {
            Ok(got) => got,
            Err(e) if e.errno == Errno::EFAULT => 0,
            Err(e) => return Err(e.into()),
        };
        if got == 0 {
            return Ok(-i64::from(libc::EFAULT));
        }
        match out.write_all(&bytes[..got]).and_then(|()| out.flush()) {
            Ok(()) => Ok(got as i64),
            Err(e) => Ok(-i64::from(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    /// Serve a `T_PAGEFLT`: map a fresh frame if the page is an unmapped
    /// heap or stack page; kill the user process (SIGSEGV) if the address is
    /// outside both or the access is one the leaf forbids; fail if the leaf
    /// allows the access (the host should have resolved it).
    fn page_fault(&mut self, tf: &TrapFrame) -> Result<Option<UserExit>, KernelError> {
        let (addr, err) = (tf.tf_addr, tf.tf_err);
        let segv = |what: &str| {
            Some(UserExit::Killed {
                signal: libc::SIGSEGV,
                why: format!(
                    "{what} at {addr:#x} (T_PAGEFLT, err {err:#x}, rip {:#x})",
                    tf.tf_rip
                ),
            })
        };
        if !(USER_BASE..self.info.user_max).contains(&addr) {
            return Ok(segv("no mapping"));
        }
        let pindex = PageIndex(addr >> PAGE_SHIFT);
        if let Some(found) = self.pt.lookup(pindex)? {
            let leaf = found.entry;
            let denied = (err & PGEX_W != 0 && !leaf.is_writable())
                || (err & PGEX_I != 0 && leaf.is_no_exec());
            if denied {
                return Ok(segv("protection violation"));
            }
            return Err(KernelError::Unresolved {
                addr,
                err,
                rip: tf.tf_rip,
                leaf,
            });
        }
        if self.demand_region(addr).is_none() {
            return Ok(segv("no mapping"));
        }
        let frame = self.frame("a faulted page")?;
        self.pt.map_page(pindex, frame, DATA_BITS)?;
        self.stats.page_faults += 1;
        Ok(None)
    }

    /// The demand-zero region `addr` lies in, if any.
    fn demand_region(&self, addr: u64) -> Option<&'static str> {
        let stack = self.stack_top() - STACK_SIZE..self.stack_top();
        if (HEAP_BASE..HEAP_BASE + HEAP_SIZE).contains(&addr) {
            Some("heap")
        } else if stack.contains(&addr) {
            Some("stack")
        } else {
            None
        }
    }

    /// Check, through the DMAP, what [`Program::Touch`] left: page `i` of
    /// `base` for `i` in `0..pages` is mapped, holds `i` in its first word,
    /// and its leaf has A and M (set by the host's walk, ABI section 3).
    pub fn check_touched(&self, base: u64, pages: u64) -> Result<(), KernelError> {
        let first = base >> PAGE_SHIFT;
        for i in 0..pages {
            let pindex = PageIndex(first + i);
            let Some(found) = self.pt.lookup(pindex)? else {
                return Err(KernelError::Check(format!("page {i} is not mapped")));
            };
            let word = self.load_word(found.entry.frame());
            if word != i {
                return Err(KernelError::Check(format!(
                    "page {i} holds {word:#x} through the DMAP, not {i:#x} ({})",
                    found.entry
                )));
            }
            if !found.entry.has(VPTE_A | VPTE_M) {
                return Err(KernelError::Check(format!(
                    "page {i}: the host did not set A and M on its leaf ({})",
                    found.entry
                )));
            }
        }
        Ok(())
    }

    /// A frame nobody has used, for `what`.
    fn frame(&mut self, what: &'static str) -> Result<GuestPhysAddr, KernelError> {
        self.pt.allocator().alloc().ok_or(KernelError::OutOfFrames {
            what,
            ram_size: self.info.ram_size,
        })
    }

    /// The word at `pa`, through the DMAP.
    fn load_word(&self, pa: GuestPhysAddr) -> u64 {
        self.ram
            .load(pa)
            .expect("frames come from inside RAM and are 8-aligned")
    }

    /// Copy `bytes` (at most a page) to the start of `frame`, through the
    /// DMAP, zero-padding the last word.
    fn copy_to_frame(&self, frame: GuestPhysAddr, bytes: &[u8]) {
        for (at, chunk) in (frame.0..).step_by(8).zip(bytes.chunks(8)) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.ram
                .store(GuestPhysAddr(at), u64::from_le_bytes(word))
                .expect("frames come from inside RAM and are 8-aligned");
        }
    }
}

/// The signal a BSD kernel sends for user trap `trapno` (FreeBSD and
/// DragonFly `trap()`), or `None` for a trap user code cannot raise.
fn trap_signal(trapno: u64) -> Option<i32> {
    Some(match trapno {
        T_PRIVINFLT | T_FPOPFLT => libc::SIGILL,
        T_BPTFLT | T_TRCTRAP => libc::SIGTRAP,
        T_ARITHTRAP | T_DIVIDE | T_OFLOW | T_BOUND | T_XMMFLT => libc::SIGFPE,
        T_PROTFLT | T_SEGNPFLT | T_STKFLT | T_TSSFLT | T_ALIGNFLT => libc::SIGBUS,
        // `int $0x80` is not a system call in this user ABI.
        T_SYSCALL80 => libc::SIGSEGV,
        _ => return None,
    })
}

/// `T_NAME (meaning)` for messages.
pub fn trap_name(trapno: u64) -> &'static str {
    match trapno {
        0 => "T_SIGNAL (a signal arrived)",
        1 => "T_PRIVINFLT (privileged or invalid instruction)",
        3 => "T_BPTFLT (breakpoint)",
        6 => "T_ARITHTRAP (arithmetic trap)",
        7 => "T_ASTFLT (asynchronous system trap)",
        9 => "T_PROTFLT (general protection)",
        10 => "T_TRCTRAP (debug exception)",
        12 => "T_PAGEFLT (page fault)",
        14 => "T_ALIGNFLT (alignment check)",
        18 => "T_DIVIDE (divide error)",
        19 => "T_NMI (non-maskable interrupt)",
        20 => "T_OFLOW (overflow)",
        21 => "T_BOUND (bound range exceeded)",
        22 => "T_DNA (device not available)",
        23 => "T_DOUBLEFLT (double fault)",
        24 => "T_FPOPFLT (FPU operand fetch fault)",
        25 => "T_TSSFLT (invalid TSS)",
        26 => "T_SEGNPFLT (segment not present)",
        27 => "T_STKFLT (stack fault)",
        28 => "T_MCHK (machine check)",
        29 => "T_XMMFLT (SIMD floating-point exception)",
        30 => "T_RESERVED (reserved)",
        0x80 => "T_SYSCALL80 (int $0x80)",
        0x81 => "T_FAST_SYSCALL (syscall)",
        _ => "unknown trap",
    }
}

/// The signal's name, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGFPE => "SIGFPE",
        libc::SIGBUS => "SIGBUS",
        libc::SIGSEGV => "SIGSEGV",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_trap_has_a_signal_and_a_name() {
        for t in [
            T_PRIVINFLT,
            T_BPTFLT,
            T_DIVIDE,
            T_PROTFLT,
            T_ALIGNFLT,
            T_SYSCALL80,
        ] {
            let s = trap_signal(t).expect("a user trap");
            assert_ne!(signal_name(s), "a signal");
            assert_ne!(trap_name(t), "unknown trap");
        }
        assert_eq!(trap_signal(vkabi::T_DOUBLEFLT), None);
        assert_eq!(
            trap_signal(T_PAGEFLT),
            None,
            "served, not mapped to a signal"
        );
    }
}
