//! Hardware watchpoints: the four x86 debug address registers (DR0-DR3)
//! and their controls in DR7, set in each guest thread of the main process
//! with `PTRACE_POKEUSER` (ptrace(2); the kernel checks every value and
//! refuses one that could trap in the kernel). A hit is a `SIGTRAP` with
//! `TRAP_HWBKPT`, DR6 naming the slot.

use gdbstub::target::ext::breakpoints::WatchKind;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

/// One watched range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    pub addr: u64,
    pub len: u64,
    pub kind: WatchKind,
}

/// The four slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watchpoints {
    pub slots: [Option<Watch>; 4],
}

impl Watchpoints {
    /// Take a free slot for `w`; false if none is free or x86 cannot watch
    /// it (a length other than 1, 2, 4, 8, or a range not aligned to it).
    pub fn insert(&mut self, w: Watch) -> bool {
        if !matches!(w.len, 1 | 2 | 4 | 8) || !w.addr.is_multiple_of(w.len) {
            return false;
        }
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(w);
                true
            }
            None => false,
        }
    }

    /// Free the slot holding `w`; false if none does.
    pub fn remove(&mut self, w: Watch) -> bool {
        match self.slots.iter_mut().find(|s| **s == Some(w)) {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }

    /// DR7: a local-enable bit per used slot, with its access type (write,
    /// or read/write: x86 has no read-only watch) and length.
    pub fn dr7(&self) -> u64 {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|w| (i, w)))
            .fold(0, |dr7, (i, w)| {
                let rw: u64 = match w.kind {
                    WatchKind::Write => 0b01,
                    WatchKind::Read | WatchKind::ReadWrite => 0b11,
                };
                let len: u64 = match w.len {
                    1 => 0b00,
                    2 => 0b01,
                    8 => 0b10,
                    _ => 0b11,
                };
                dr7 | 1 << (2 * i) | rw << (16 + 4 * i) | len << (18 + 4 * i)
            })
    }

    /// Set the debug registers of stopped thread `t` to these slots.
    pub fn apply(&self, t: Pid) -> Result<(), Errno> {
        // DR7 first to 0, so that no half-set slot is ever enabled.
        poke_dr(t, 7, 0)?;
        for (i, s) in self.slots.iter().enumerate() {
            poke_dr(t, i, s.map_or(0, |w| w.addr))?;
        }
        poke_dr(t, 7, self.dr7())
    }

    /// The slot whose hit stopped `t` (DR6's low bits), clearing DR6.
    pub fn hit(&self, t: Pid) -> Option<Watch> {
        let dr6 = peek_dr(t, 6).ok()?;
        let _ = poke_dr(t, 6, 0);
        (0..4)
            .find(|i| dr6 & (1 << i) != 0)
            .and_then(|i| self.slots[i])
    }
}

fn dr_offset(i: usize) -> usize {
    std::mem::offset_of!(libc::user, u_debugreg) + i * 8
}

fn poke_dr(t: Pid, i: usize, value: u64) -> Result<(), Errno> {
    ptrace::write_user(t, dr_offset(i) as ptrace::AddressType, value as i64)
}

fn peek_dr(t: Pid, i: usize) -> Result<u64, Errno> {
    ptrace::read_user(t, dr_offset(i) as ptrace::AddressType).map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(addr: u64, len: u64, kind: WatchKind) -> Watch {
        Watch { addr, len, kind }
    }

    #[test]
    fn dr7_encodes_each_slot() {
        let mut wp = Watchpoints::default();
        assert_eq!(wp.dr7(), 0);
        assert!(wp.insert(w(0x1000, 4, WatchKind::Write)));
        // L0, R/W0 = 01 (write), LEN0 = 11 (4 bytes).
        assert_eq!(wp.dr7(), 1 | 0b01 << 16 | 0b11 << 18);
        assert!(wp.insert(w(0x2000, 8, WatchKind::ReadWrite)));
        assert_eq!(wp.dr7() >> 2 & 3, 1, "L1");
        assert_eq!(
            wp.dr7() >> 20 & 0xf,
            0b10 << 2 | 0b11,
            "LEN1 = 8, R/W1 = rw"
        );
        assert!(wp.remove(w(0x1000, 4, WatchKind::Write)));
        assert_eq!(wp.dr7() & 0xf_0003, 0, "slot 0 is off again");
        assert!(!wp.remove(w(0x1000, 4, WatchKind::Write)));
    }

    #[test]
    fn only_what_x86_can_watch_is_taken() {
        let mut wp = Watchpoints::default();
        assert!(!wp.insert(w(0x1001, 4, WatchKind::Write)), "misaligned");
        assert!(!wp.insert(w(0x1000, 3, WatchKind::Write)), "length 3");
        assert!(!wp.insert(w(0x1000, 16, WatchKind::Write)), "length 16");
        for i in 0..4 {
            assert!(wp.insert(w(0x1000 + 8 * i, 8, WatchKind::Write)));
        }
        assert!(
            !wp.insert(w(0x2000, 8, WatchKind::Write)),
            "four slots only"
        );
        assert!(wp.slots.iter().all(Option::is_some));
    }

    #[test]
    fn debug_registers_sit_in_struct_user() {
        // x86-64 Linux: u_debugreg follows u_comm[32] at offset 848.
        assert_eq!(dr_offset(0), 848);
        assert_eq!(dr_offset(7), 848 + 56);
    }
}
