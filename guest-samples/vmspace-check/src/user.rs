//! The user code the checks run inside vmspaces: small x86-64 snippets
//! assembled into this binary (`global_asm!`, each between a start and an
//! end label in a section of its own) and copied into guest RAM frames that
//! a vmspace maps.
//!
//! Every snippet is position independent (relative jumps only; addresses
//! come in registers), starts at its first byte, and most end in a
//! `syscall` loop so that a RUN after the interesting instruction comes back
//! as `T_FAST_SYSCALL` again and again. Register conventions are in each
//! snippet's doc.

use crate::sys;

/// The room each snippet gets in the code page: snippet `i` starts at byte
/// `i * SLOT`.
pub const SLOT: u64 = 64;

macro_rules! snippets {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident ($start:ident, $end:ident) = [$($line:literal),+ $(,)?];
    )+) => {
        $(
            core::arch::global_asm!(
                ".pushsection .text.vmspace_check_user,\"ax\",@progbits",
                ".p2align 4",
                concat!(".globl ", stringify!($start)),
                concat!(".hidden ", stringify!($start)),
                concat!(".globl ", stringify!($end)),
                concat!(".hidden ", stringify!($end)),
                concat!(stringify!($start), ":"),
                $($line,)+
                concat!(stringify!($end), ":"),
                ".popsection",
            );
        )+

        #[allow(non_upper_case_globals)]
        unsafe extern "C" {
            $(
                static $start: u8;
                static $end: u8;
            )+
        }

        /// A user-code snippet.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Snippet {
            $( $(#[doc = $doc])* $name, )+
        }

        impl Snippet {
            /// Every snippet, in slot order.
            pub const ALL: &[Snippet] = &[$(Snippet::$name),+];

            /// The snippet's machine code.
            pub fn bytes(self) -> &'static [u8] {
                match self {
                    $( Snippet::$name => sys::text_bytes(&raw const $start, &raw const $end), )+
                }
            }
        }
    };
}

snippets! {
    /// `syscall` (2 bytes), then a jump back to it.
    Syscall(vmsc_syscall_start, vmsc_syscall_end) = ["2:", "syscall", "jmp 2b"];
    /// `int3` (1 byte), then the syscall loop.
    Int3(vmsc_int3_start, vmsc_int3_end) = ["int3", "2:", "syscall", "jmp 2b"];
    /// `ud2`: invalid opcode.
    Ud2(vmsc_ud2_start, vmsc_ud2_end) = ["ud2"];
    /// `hlt`: privileged, general protection at CPL 3.
    Hlt(vmsc_hlt_start, vmsc_hlt_end) = ["hlt"];
    /// `cli`: general protection at CPL 3 with IOPL 0.
    Cli(vmsc_cli_start, vmsc_cli_end) = ["cli"];
    /// `mov rax, cr0`: general protection at CPL 3.
    ReadCr0(vmsc_cr0_start, vmsc_cr0_end) = ["mov rax, cr0"];
    /// `div rcx`: a divide error when rcx is 0.
    Divide(vmsc_div_start, vmsc_div_end) = ["div rcx", "2:", "syscall", "jmp 2b"];
    /// `int 0x80` (2 bytes), then the syscall loop.
    Int80(vmsc_int80_start, vmsc_int80_end) = ["int 0x80", "2:", "syscall", "jmp 2b"];
    /// `rax = [rbx]`, then the syscall loop.
    Load(vmsc_load_start, vmsc_load_end) = [
        "mov rax, qword ptr [rbx]", "2:", "syscall", "jmp 2b",
    ];
    /// `[rbx] = rdx`, then the syscall loop.
    Store(vmsc_store_start, vmsc_store_end) = [
        "mov qword ptr [rbx], rdx", "2:", "syscall", "jmp 2b",
    ];
    /// `jmp rbx`.
    Jump(vmsc_jump_start, vmsc_jump_end) = ["jmp rbx"];
    /// `rax = fs:[0]`, `rdx = gs:[0]`, then the syscall loop.
    Tls(vmsc_tls_start, vmsc_tls_end) = [
        "mov rax, qword ptr fs:[0]",
        "mov rdx, qword ptr gs:[0]",
        "2:", "syscall", "jmp 2b",
    ];
    /// `xmm0 = rax` (low quadword), then the syscall loop.
    XmmSet(vmsc_xmmset_start, vmsc_xmmset_end) = ["movq xmm0, rax", "2:", "syscall", "jmp 2b"];
    /// `rax = xmm0` (low quadword), then the syscall loop.
    XmmGet(vmsc_xmmget_start, vmsc_xmmget_end) = ["movq rax, xmm0", "2:", "syscall", "jmp 2b"];
    /// Forever: `rax += 1; [rbx] = rax` (rbx: a progress word the guest
    /// watches through the direct map).
    Spin(vmsc_spin_start, vmsc_spin_end) = [
        "2:", "inc rax", "mov qword ptr [rbx], rax", "jmp 2b",
    ];
    /// Two contexts meet: `[rbx] = 1`, wait until `[rdx] != 0` (the other
    /// context's arrival), then `[rbx + 8] += 1` rcx times, then the syscall
    /// loop. Only returns if another context runs at the same time.
    Meet(vmsc_meet_start, vmsc_meet_end) = [
        "mov qword ptr [rbx], 1",
        "2:", "pause", "cmp qword ptr [rdx], 0", "je 2b",
        "3:", "inc qword ptr [rbx + 8]", "dec rcx", "jnz 3b",
        "4:", "syscall", "jmp 4b",
    ];
    /// Copy rcx bytes from rsi to rdi (`rep movsb`), then the syscall loop.
    Copy(vmsc_copy_start, vmsc_copy_end) = ["rep movsb", "2:", "syscall", "jmp 2b"];
    /// `rsp = rdi; jmp rsi`: with rsi at vkrun's `rt_sigreturn` gadget in
    /// the stub, the frame at rdi becomes the user code's registers and
    /// signal mask (a forged signal return).
    Sigreturn(vmsc_sigreturn_start, vmsc_sigreturn_end) = ["mov rsp, rdi", "jmp rsi"];
    /// Forever: store 0 in rcx dwords from rbx, r8 bytes apart (every
    /// context's kick word), then `[rdx] += 1` (progress).
    KickClear(vmsc_kickclear_start, vmsc_kickclear_end) = [
        "2:", "mov rdi, rbx", "mov rax, rcx",
        "3:", "mov dword ptr [rdi], 0", "add rdi, r8", "dec rax", "jnz 3b",
        "inc qword ptr [rdx]", "jmp 2b",
    ];
    /// For rcx pages from rbx: `rax += [page]; [page + 8] = rax`, then the
    /// syscall loop (rax starts as the frame's rax).
    SumPages(vmsc_sum_start, vmsc_sum_end) = [
        "2:", "add rax, qword ptr [rbx]", "mov qword ptr [rbx + 8], rax",
        "add rbx, 4096", "dec rcx", "jnz 2b",
        "3:", "syscall", "jmp 3b",
    ];
}

impl Snippet {
    /// Byte offset of the snippet in the code page.
    pub fn offset(self) -> u64 {
        let i = Snippet::ALL
            .iter()
            .position(|s| *s == self)
            .expect("every snippet is in ALL");
        i as u64 * SLOT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_fit_their_slots_and_the_page() {
        for s in Snippet::ALL {
            let n = s.bytes().len() as u64;
            assert!(n > 0 && n <= SLOT, "{s:?} is {n} bytes");
        }
        assert!(Snippet::ALL.len() as u64 * SLOT <= vkabi::PAGE_SIZE);
    }

    #[test]
    fn instruction_lengths_the_checks_rely_on() {
        assert_eq!(&Snippet::Syscall.bytes()[..2], &[0x0f, 0x05]);
        assert_eq!(&Snippet::Int3.bytes()[..3], &[0xcc, 0x0f, 0x05]);
        assert_eq!(&Snippet::Int80.bytes()[..4], &[0xcd, 0x80, 0x0f, 0x05]);
        assert_eq!(Snippet::Ud2.bytes(), &[0x0f, 0x0b]);
        assert_eq!(Snippet::Hlt.bytes(), &[0xf4]);
        assert_eq!(Snippet::Cli.bytes(), &[0xfa]);
        assert_eq!(Snippet::Jump.bytes(), &[0xff, 0xe3]);
    }
}
