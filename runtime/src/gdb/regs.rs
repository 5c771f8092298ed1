//! What the stub tells gdb about a guest thread, pure: the amd64 Linux
//! register set (`amd64-linux.xml`, the `g` packet) built from ptrace's
//! `user_regs_struct` and `user_fpregs_struct` (FXSAVE), and the
//! translation between Linux signal numbers and gdb's own (gdb numbers
//! signals as its `gdb/signals.def`, not as any host does).

use std::num::NonZeroUsize;

use gdbstub::arch::{Arch, RegId, Registers};
use nix::sys::signal::Signal;

/// The architecture the stub serves: amd64 with the x87/SSE state,
/// `orig_rax` and the FS/GS bases (gdb's `i386.core`, `i386.sse`,
/// `i386.linux` and `i386.segments` features).
#[derive(Debug)]
pub enum Amd64Linux {}

impl Arch for Amd64Linux {
    type Usize = u64;
    type Registers = ThreadRegs;
    type RegId = NoSingleRegister;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(include_str!("amd64-linux.xml"))
    }
}

/// Single-register access (`p`/`P`) is not offered: gdb reads and writes
/// the whole set with `g`/`G`.
#[derive(Debug, Clone, Copy)]
pub enum NoSingleRegister {}

impl RegId for NoSingleRegister {
    fn from_raw_id(_id: usize) -> Option<(Self, Option<NonZeroUsize>)> {
        None
    }
}

/// A guest thread's registers as ptrace returns them.
#[derive(Debug, Clone, Copy)]
pub struct ThreadRegs {
    pub gpr: libc::user_regs_struct,
    pub fpu: libc::user_fpregs_struct,
}

impl Default for ThreadRegs {
    fn default() -> Self {
        ThreadRegs {
            gpr: zeroed_gpr(),
            fpu: zeroed_fpu(),
        }
    }
}

impl PartialEq for ThreadRegs {
    fn eq(&self, other: &Self) -> bool {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        self.gdb_serialize(|x| a.push(x));
        other.gdb_serialize(|x| b.push(x));
        a == b
    }
}

/// Size of the `g` packet's payload in bytes.
pub const G_SIZE: usize = 17 * 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 3 * 8;

fn zeroed_gpr() -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        rbp: 0,
        rbx: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        orig_rax: 0,
        rip: 0,
        cs: 0,
        eflags: 0,
        rsp: 0,
        ss: 0,
        fs_base: 0,
        gs_base: 0,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    }
}

fn zeroed_fpu() -> libc::user_fpregs_struct {
    crate::sys::ptrace::zeroed_fpregs()
}

impl Registers for ThreadRegs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.gpr.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        let mut put = |bytes: &[u8]| bytes.iter().for_each(|b| write_byte(Some(*b)));
        let g = &self.gpr;
        for r in [
            g.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.rbp, g.rsp, g.r8, g.r9, g.r10, g.r11,
            g.r12, g.r13, g.r14, g.r15, g.rip,
        ] {
            put(&r.to_le_bytes());
        }
        put(&(g.eflags as u32).to_le_bytes());
        for s in [g.cs, g.ss, g.ds, g.es, g.fs, g.gs] {
            put(&(s as u32).to_le_bytes());
        }
        let f = &self.fpu;
        for i in 0..8 {
            put(&st_bytes(&f.st_space, i));
        }
        for v in [
            u32::from(f.cwd),
            u32::from(f.swd),
            full_tag_word(f.ftw),
            (f.rip >> 32) as u32,
            f.rip as u32,
            (f.rdp >> 32) as u32,
            f.rdp as u32,
            u32::from(f.fop),
        ] {
            put(&v.to_le_bytes());
        }
        for w in &f.xmm_space {
            put(&w.to_le_bytes());
        }
        put(&f.mxcsr.to_le_bytes());
        for r in [g.orig_rax, g.fs_base, g.gs_base] {
            put(&r.to_le_bytes());
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() < G_SIZE {
            return Err(());
        }
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = &bytes[at..at + n];
            at += n;
            s
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
        let g = &mut self.gpr;
        for r in [
            &mut g.rax, &mut g.rbx, &mut g.rcx, &mut g.rdx, &mut g.rsi, &mut g.rdi, &mut g.rbp,
            &mut g.rsp, &mut g.r8, &mut g.r9, &mut g.r10, &mut g.r11, &mut g.r12, &mut g.r13,
            &mut g.r14, &mut g.r15, &mut g.rip,
        ] {
            *r = u64_of(take(8));
        }
        g.eflags = u64::from(u32_of(take(4)));
        for s in [
            &mut g.cs, &mut g.ss, &mut g.ds, &mut g.es, &mut g.fs, &mut g.gs,
        ] {
            *s = u64::from(u32_of(take(4)));
        }
        let f = &mut self.fpu;
        for i in 0..8 {
            set_st(&mut f.st_space, i, take(10));
        }
        f.cwd = u32_of(take(4)) as u16;
        f.swd = u32_of(take(4)) as u16;
        f.ftw = abridged_tag_word(u32_of(take(4)));
        let fiseg = u64::from(u32_of(take(4)));
        let fioff = u64::from(u32_of(take(4)));
        let foseg = u64::from(u32_of(take(4)));
        let fooff = u64::from(u32_of(take(4)));
        f.rip = fiseg << 32 | fioff;
        f.rdp = foseg << 32 | fooff;
        f.fop = u32_of(take(4)) as u16;
        for w in f.xmm_space.iter_mut() {
            *w = u32_of(take(4));
        }
        f.mxcsr = u32_of(take(4));
        g.orig_rax = u64_of(take(8));
        g.fs_base = u64_of(take(8));
        g.gs_base = u64_of(take(8));
        Ok(())
    }
}

/// The 10 bytes of `st(i)`: FXSAVE keeps each in a 16-byte slot.
fn st_bytes(space: &[u32; 32], i: usize) -> [u8; 10] {
    let mut slot = [0u8; 16];
    for (k, w) in space[i * 4..i * 4 + 4].iter().enumerate() {
        slot[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    slot[..10].try_into().expect("10 bytes")
}

fn set_st(space: &mut [u32; 32], i: usize, value: &[u8]) {
    let mut slot = [0u8; 16];
    for (k, w) in space[i * 4..i * 4 + 4].iter().enumerate() {
        slot[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    slot[..10].copy_from_slice(value);
    for (k, w) in space[i * 4..i * 4 + 4].iter_mut().enumerate() {
        *w = u32::from_le_bytes(slot[k * 4..k * 4 + 4].try_into().expect("4 bytes"));
    }
}

/// FXSAVE's abridged tag (one bit per register: in use) as the x87 tag
/// word gdb shows (two bits per register: 0 valid, 3 empty).
fn full_tag_word(abridged: u16) -> u32 {
    (0..8).fold(0, |tag, i| {
        let empty = abridged & (1 << i) == 0;
        tag | if empty { 3 << (2 * i) } else { 0 }
    })
}

/// The x87 tag word back to FXSAVE's abridged form.
fn abridged_tag_word(full: u32) -> u16 {
    (0..8).fold(0, |tag, i| {
        let empty = (full >> (2 * i)) & 3 == 3;
        tag | if empty { 0 } else { 1 << i }
    })
}

/// gdb's number for a Linux signal (gdb's `signals.def`); `None` for one
/// gdb has no name for.
pub fn to_gdb(sig: Signal) -> gdbstub::common::Signal {
    let n = sig as i32;
    let gdb = LINUX_TO_GDB
        .iter()
        .find(|(linux, _)| *linux == n)
        .map_or(143, |(_, g)| *g); // GDB_SIGNAL_UNKNOWN
    gdbstub::common::Signal(gdb)
}

/// The Linux signal for gdb's number, if Linux has it.
pub fn from_gdb(sig: gdbstub::common::Signal) -> Option<Signal> {
    LINUX_TO_GDB
        .iter()
        .find(|(_, g)| *g == sig.0)
        .and_then(|(linux, _)| Signal::try_from(*linux).ok())
}

/// Linux x86-64 numbers against gdb's (`gdb/signals.def`): they agree only
/// for the oldest signals.
const LINUX_TO_GDB: [(i32, u8); 30] = [
    (libc::SIGHUP, 1),
    (libc::SIGINT, 2),
    (libc::SIGQUIT, 3),
    (libc::SIGILL, 4),
    (libc::SIGTRAP, 5),
    (libc::SIGABRT, 6),
    (libc::SIGFPE, 8),
    (libc::SIGKILL, 9),
    (libc::SIGBUS, 10),
    (libc::SIGSEGV, 11),
    (libc::SIGSYS, 12),
    (libc::SIGPIPE, 13),
    (libc::SIGALRM, 14),
    (libc::SIGTERM, 15),
    (libc::SIGURG, 16),
    (libc::SIGSTOP, 17),
    (libc::SIGTSTP, 18),
    (libc::SIGCONT, 19),
    (libc::SIGCHLD, 20),
    (libc::SIGTTIN, 21),
    (libc::SIGTTOU, 22),
    (libc::SIGIO, 23),
    (libc::SIGXCPU, 24),
    (libc::SIGXFSZ, 25),
    (libc::SIGVTALRM, 26),
    (libc::SIGPROF, 27),
    (libc::SIGWINCH, 28),
    (libc::SIGUSR1, 30),
    (libc::SIGUSR2, 31),
    (libc::SIGPWR, 32),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ThreadRegs {
        let mut r = ThreadRegs::default();
        r.gpr.rax = 0x1111;
        r.gpr.r15 = 0xf0f0;
        r.gpr.rip = 0x401000;
        r.gpr.eflags = 0x246;
        r.gpr.cs = 0x33;
        r.gpr.fs_base = 0x7fff_0000_1000;
        r.gpr.gs_base = 0x42;
        r.gpr.orig_rax = u64::MAX;
        r.fpu.cwd = 0x37f;
        r.fpu.ftw = 0b0000_0011;
        r.fpu.rip = 0x1234_5678_9abc;
        r.fpu.mxcsr = 0x1f80;
        r.fpu.st_space[4] = 0xdead_beef;
        r.fpu.st_space[6] = 0xffff_4001; // only the low 16 bits are st1's
        r.fpu.xmm_space[63] = 0xcafe;
        r
    }

    #[test]
    fn g_packet_has_the_size_of_the_target_description() {
        let mut n = 0;
        sample().gdb_serialize(|_| n += 1);
        assert_eq!(n, G_SIZE);
        assert_eq!(G_SIZE, 560);
        let xml = Amd64Linux::target_description_xml().expect("xml");
        assert_eq!(xml.matches("<reg ").count(), 60);
    }

    #[test]
    fn registers_round_trip_through_the_g_packet() {
        let before = sample();
        let mut bytes = Vec::new();
        before.gdb_serialize(|b| bytes.push(b.expect("every register is available")));
        let mut after = ThreadRegs::default();
        after.gdb_deserialize(&bytes).expect("deserialize");
        assert_eq!(after.gpr.fs_base, 0x7fff_0000_1000);
        assert_eq!(after.gpr.gs_base, 0x42);
        assert_eq!(after.gpr.orig_rax, u64::MAX);
        assert_eq!(after.fpu.rip, 0x1234_5678_9abc);
        assert_eq!(after.fpu.ftw, 0b0000_0011);
        assert_eq!(after.fpu.st_space[4], 0xdead_beef);
        assert_eq!(after.fpu.st_space[6] & 0xffff, 0x4001);
        assert_eq!(after.fpu.xmm_space[63], 0xcafe);
        assert!(before == after);
        assert!(after.gdb_deserialize(&bytes[..G_SIZE - 1]).is_err());
    }

    #[test]
    fn rip_and_fs_base_sit_where_gdb_looks() {
        let mut bytes = Vec::new();
        sample().gdb_serialize(|b| bytes.push(b.expect("available")));
        assert_eq!(&bytes[16 * 8..17 * 8], &0x401000u64.to_le_bytes());
        assert_eq!(
            &bytes[G_SIZE - 16..G_SIZE - 8],
            &0x7fff_0000_1000u64.to_le_bytes()
        );
    }

    #[test]
    fn tag_words_convert_both_ways() {
        assert_eq!(full_tag_word(0), 0xffff);
        assert_eq!(full_tag_word(0b1000_0001), 0x3ffc);
        for t in 0..=255u16 {
            assert_eq!(abridged_tag_word(full_tag_word(t)), t);
        }
    }

    #[test]
    fn signals_use_gdb_numbers() {
        assert_eq!(to_gdb(Signal::SIGSEGV).0, 11);
        assert_eq!(to_gdb(Signal::SIGUSR1).0, 30);
        assert_eq!(to_gdb(Signal::SIGCHLD).0, 20);
        assert_eq!(to_gdb(Signal::SIGSTKFLT).0, 143);
        for (linux, _) in LINUX_TO_GDB {
            let sig = Signal::try_from(linux).expect("a Linux signal");
            assert_eq!(from_gdb(to_gdb(sig)), Some(sig));
        }
        assert_eq!(from_gdb(gdbstub::common::Signal(7)), None); // SIGEMT
    }
}
