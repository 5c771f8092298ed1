//! The vkrun guest ABI, defined once (`docs/ABI.md`, version 1).
//!
//! Everything a guest and the supervisor must agree on lives here: hypercall
//! numbers, flags, the `vk_info`, `trapframe` and `vextframe` layouts, VPTE
//! bits, page-fault error bits and DragonFly's trap numbers. The supervisor
//! (`vkrun-runtime`), the page-table crate (`vpte`) and every Rust guest use
//! these definitions; the C header `guest-samples/include/vkernel.h` mirrors
//! them and a test checks the two agree.
//!
//! The crate is `no_std` so that freestanding guests can use it. The raw
//! hypercall wrappers in [`hypercall`] are the only code with `unsafe`.
#![no_std]
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod fastrun;
pub mod hypercall;

use core::mem::{offset_of, size_of};

/// ABI version reported by `vk_info`.
pub const VK_ABI_VERSION: u32 = 1;
/// First hypercall number. Bit 30 (the x32 bit) is clear, so Linux answers
/// `-ENOSYS` when no supervisor is present.
pub const VK_SYS_BASE: u64 = 0x0DF0_0000;
/// Number of hypercall numbers reserved from [`VK_SYS_BASE`]; every number in
/// `[VK_SYS_BASE, VK_SYS_BASE + VK_SYS_COUNT)` reaches the supervisor, and the
/// ones it does not know answer `-ENOSYS`.
pub const VK_SYS_COUNT: u64 = 0x1000;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// `VM_MAX_USER_ADDRESS`: guest addresses lie in `[0, USER_MAX)`.
pub const USER_MAX: u64 = 0x0000_7FFF_FFE0_0000;
/// Levels of page tables below the master PDE.
pub const VPTE_LEVELS: u32 = 4;
/// Largest RAM size (`-m`): the VPTE frame field addresses 2^48 bytes.
pub const RAM_SIZE_MAX: u64 = 1 << 48;

/// A hypercall: the ABI section 1 table. The discriminant is the offset from
/// [`VK_SYS_BASE`] (DragonFly's syscall number where one exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Hypercall {
    /// `int vk_info(struct vk_info *out, size_t size)`
    VkInfo = 0,
    /// `void *vk_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)`
    VkMmap = 197,
    /// `int mcontrol(void *addr, size_t len, int behav, off_t value)`
    Mcontrol = 485,
    /// `int vmspace_create(void *id, int type, void *data)`
    VmspaceCreate = 486,
    /// `int vmspace_destroy(void *id)`
    VmspaceDestroy = 487,
    /// `int vmspace_ctl(void *id, int cmd, struct trapframe *tf, struct vextframe *vf)`
    VmspaceCtl = 488,
    /// `void *vmspace_mmap(void *id, void *addr, size_t len, int prot, int flags, int fd, off_t off)`
    VmspaceMmap = 489,
    /// `int vmspace_munmap(void *id, void *addr, size_t len)`
    VmspaceMunmap = 490,
    /// `int vmspace_mcontrol(void *id, void *addr, size_t len, int behav, off_t value)`
    VmspaceMcontrol = 491,
    /// `ssize_t vmspace_pread(void *id, void *buf, size_t n, int flags, off_t vaddr)`
    VmspacePread = 492,
    /// `ssize_t vmspace_pwrite(void *id, const void *buf, size_t n, int flags, off_t vaddr)`
    VmspacePwrite = 493,
}

impl Hypercall {
    /// Every hypercall, in number order.
    pub const ALL: [Hypercall; 11] = [
        Hypercall::VkInfo,
        Hypercall::VkMmap,
        Hypercall::Mcontrol,
        Hypercall::VmspaceCreate,
        Hypercall::VmspaceDestroy,
        Hypercall::VmspaceCtl,
        Hypercall::VmspaceMmap,
        Hypercall::VmspaceMunmap,
        Hypercall::VmspaceMcontrol,
        Hypercall::VmspacePread,
        Hypercall::VmspacePwrite,
    ];

    /// The syscall number a guest puts in `rax`.
    pub const fn nr(self) -> u64 {
        VK_SYS_BASE + self as u64
    }

    /// The hypercall with syscall number `nr`, if there is one.
    pub fn from_nr(nr: u64) -> Option<Self> {
        let offset = nr.checked_sub(VK_SYS_BASE)?;
        Self::ALL.into_iter().find(|h| *h as u64 == offset)
    }

    /// The name used in traces and in `-e trace=` (DragonFly's names).
    pub const fn name(self) -> &'static str {
        match self {
            Hypercall::VkInfo => "vk_info",
            Hypercall::VkMmap => "vk_mmap",
            Hypercall::Mcontrol => "mcontrol",
            Hypercall::VmspaceCreate => "vmspace_create",
            Hypercall::VmspaceDestroy => "vmspace_destroy",
            Hypercall::VmspaceCtl => "vmspace_ctl",
            Hypercall::VmspaceMmap => "vmspace_mmap",
            Hypercall::VmspaceMunmap => "vmspace_munmap",
            Hypercall::VmspaceMcontrol => "vmspace_mcontrol",
            Hypercall::VmspacePread => "vmspace_pread",
            Hypercall::VmspacePwrite => "vmspace_pwrite",
        }
    }

    /// The hypercall called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// `struct vk_info` (48 bytes), filled by the `vk_info` hypercall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VkInfo {
    /// [`VK_ABI_VERSION`].
    pub abi_version: u32,
    /// [`PAGE_SIZE`].
    pub page_size: u32,
    /// The guest RAM memfd, as numbered in the calling process.
    pub ram_fd: i32,
    /// [`VPTE_LEVELS`].
    pub vpte_levels: u32,
    /// RAM size in bytes (the `-m` value).
    pub ram_size: u64,
    /// [`USER_MAX`].
    pub user_max: u64,
    /// Zero.
    pub reserved: [u64; 2],
}

impl VkInfo {
    /// The struct as raw bytes, for copying into guest memory.
    pub fn to_bytes(&self) -> [u8; size_of::<VkInfo>()] {
        let mut out = [0u8; size_of::<VkInfo>()];
        out[0..4].copy_from_slice(&self.abi_version.to_ne_bytes());
        out[4..8].copy_from_slice(&self.page_size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.ram_fd.to_ne_bytes());
        out[12..16].copy_from_slice(&self.vpte_levels.to_ne_bytes());
        out[16..24].copy_from_slice(&self.ram_size.to_ne_bytes());
        out[24..32].copy_from_slice(&self.user_max.to_ne_bytes());
        out[32..40].copy_from_slice(&self.reserved[0].to_ne_bytes());
        out[40..48].copy_from_slice(&self.reserved[1].to_ne_bytes());
        out
    }
}

// `mmap` flags and protections the ABI adds or names (other bits are Linux's).

/// `MAP_VPAGETABLE`: meaningful only in `vk_mmap` and `vmspace_mmap`.
pub const MAP_VPAGETABLE: i32 = 0x2000;
/// Linux `PROT_READ`.
pub const PROT_READ: i32 = 0x1;
/// Linux `PROT_WRITE`.
pub const PROT_WRITE: i32 = 0x2;
/// Linux `PROT_EXEC`.
pub const PROT_EXEC: i32 = 0x4;
/// Linux `MAP_SHARED`.
pub const MAP_SHARED: i32 = 0x01;
/// Linux `MAP_PRIVATE`.
pub const MAP_PRIVATE: i32 = 0x02;
/// Linux `MAP_FIXED`.
pub const MAP_FIXED: i32 = 0x10;
/// Linux `MAP_ANONYMOUS`.
pub const MAP_ANONYMOUS: i32 = 0x20;
/// Linux `MAP_STACK`.
pub const MAP_STACK: i32 = 0x20000;

// mcontrol behaviours (ABI section 5).

/// Drop host translations in a range.
pub const MADV_INVAL: i32 = 10;
/// Set the master PDE of the VPAGETABLE mappings in a range.
pub const MADV_SETMAP: i32 = 11;

/// `vmspace_ctl` command: run guest user code.
pub const VMSPACE_CTL_RUN: i32 = 1;

/// Pack `vmspace_mmap`'s `prot` and `flags` into its fourth register.
pub const fn vmspace_mmap_prot_flags(prot: i32, flags: i32) -> u64 {
    ((flags as u32 as u64) << 32) | (prot as u32 as u64)
}

// Virtual page table entries (ABI section 3).

/// A virtual page table entry.
pub type VpteT = u64;
/// Valid; checked at every level.
pub const VPTE_V: u64 = 0x001;
/// Writable; checked at every level for writes.
pub const VPTE_RW: u64 = 0x002;
/// User; ignored by the host.
pub const VPTE_U: u64 = 0x004;
/// Accessed; set by the host on every visited entry.
pub const VPTE_A: u64 = 0x020;
/// Modified; set by the host on a write.
pub const VPTE_M: u64 = 0x040;
/// Page size: stop the walk here (superpage, linear map).
pub const VPTE_PS: u64 = 0x080;
/// Global; ignored by the host.
pub const VPTE_G: u64 = 0x100;
/// Wired; ignored by the host.
pub const VPTE_WIRED: u64 = 0x200;
/// Managed; ignored by the host.
pub const VPTE_MANAGED: u64 = 0x400;
/// No-execute; checked at every level for instruction fetches.
pub const VPTE_NX: u64 = 1 << 63;
/// The physical frame of an entry.
pub const VPTE_FRAME: u64 = 0x000F_FFFF_FFFF_F000;
/// Entries per table page.
pub const VPTE_ENTRIES: usize = 512;
/// Shift of the page index for the first table below the master PDE.
pub const VPTE_TOP_SHIFT: u32 = 36;

// Page-fault error bits (PGEX_*), ABI section 6.

/// Protection violation (as opposed to not present).
pub const PGEX_P: u64 = 0x01;
/// Write access.
pub const PGEX_W: u64 = 0x02;
/// User-mode access.
pub const PGEX_U: u64 = 0x04;
/// Instruction fetch.
pub const PGEX_I: u64 = 0x10;

// DragonFly trap numbers (`machine/trap.h`), reported in `tf_trapno`.

/// A signal arrived for the calling guest thread (vkrun's value).
pub const T_SIGNAL: u64 = 0;
/// Privileged or invalid instruction.
pub const T_PRIVINFLT: u64 = 1;
/// Breakpoint (`int3`).
pub const T_BPTFLT: u64 = 3;
/// Arithmetic (x87) trap.
pub const T_ARITHTRAP: u64 = 6;
/// Asynchronous system trap.
pub const T_ASTFLT: u64 = 7;
/// General protection.
pub const T_PROTFLT: u64 = 9;
/// Debug exception (single step).
pub const T_TRCTRAP: u64 = 10;
/// Page fault.
pub const T_PAGEFLT: u64 = 12;
/// Alignment check.
pub const T_ALIGNFLT: u64 = 14;
/// Divide error.
pub const T_DIVIDE: u64 = 18;
/// Non-maskable interrupt.
pub const T_NMI: u64 = 19;
/// Overflow (`into`).
pub const T_OFLOW: u64 = 20;
/// Bound range exceeded.
pub const T_BOUND: u64 = 21;
/// Device not available.
pub const T_DNA: u64 = 22;
/// Double fault.
pub const T_DOUBLEFLT: u64 = 23;
/// FPU operand fetch fault.
pub const T_FPOPFLT: u64 = 24;
/// Invalid TSS.
pub const T_TSSFLT: u64 = 25;
/// Segment not present.
pub const T_SEGNPFLT: u64 = 26;
/// Stack fault.
pub const T_STKFLT: u64 = 27;
/// Machine check.
pub const T_MCHK: u64 = 28;
/// SIMD floating-point exception.
pub const T_XMMFLT: u64 = 29;
/// Reserved.
pub const T_RESERVED: u64 = 30;
/// `int 0x80`.
pub const T_SYSCALL80: u64 = 0x80;
/// `syscall` instruction.
pub const T_FAST_SYSCALL: u64 = 0x81;

/// `struct trapframe` (200 bytes): the guest user context's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TrapFrame {
    /// Register `%rdi`.
    pub tf_rdi: u64,
    /// Register `%rsi`.
    pub tf_rsi: u64,
    /// Register `%rdx`.
    pub tf_rdx: u64,
    /// Register `%rcx`.
    pub tf_rcx: u64,
    /// Register `%r8`.
    pub tf_r8: u64,
    /// Register `%r9`.
    pub tf_r9: u64,
    /// Register `%rax`.
    pub tf_rax: u64,
    /// Register `%rbx`.
    pub tf_rbx: u64,
    /// Register `%rbp`.
    pub tf_rbp: u64,
    /// Register `%r10`.
    pub tf_r10: u64,
    /// Register `%r11`.
    pub tf_r11: u64,
    /// Register `%r12`.
    pub tf_r12: u64,
    /// Register `%r13`.
    pub tf_r13: u64,
    /// Register `%r14`.
    pub tf_r14: u64,
    /// Register `%r15`.
    pub tf_r15: u64,
    /// DragonFly's `tf_xflags`; vkrun does not interpret it.
    pub tf_xflags: u64,
    /// Why RUN returned: a `T_*` number (0 for a signal).
    pub tf_trapno: u64,
    /// The faulting address for `T_PAGEFLT`.
    pub tf_addr: u64,
    /// DragonFly's `tf_flags`; vkrun does not interpret it.
    pub tf_flags: u64,
    /// `PGEX_*` bits for `T_PAGEFLT`; 2 for `T_FAST_SYSCALL`.
    pub tf_err: u64,
    /// Instruction pointer (after the `syscall` for `T_FAST_SYSCALL`).
    pub tf_rip: u64,
    /// Code selector; RUN forces the host's 64-bit user selector.
    pub tf_cs: u64,
    /// Flags; RUN masks them with [`RFLAGS_USER_MASK`] and sets 0x202.
    pub tf_rflags: u64,
    /// Stack pointer.
    pub tf_rsp: u64,
    /// Stack selector; RUN forces the host's user selector.
    pub tf_ss: u64,
}

impl TrapFrame {
    /// The frame as its 25 words, in field (ABI) order.
    pub fn to_words(&self) -> [u64; 25] {
        [
            self.tf_rdi,
            self.tf_rsi,
            self.tf_rdx,
            self.tf_rcx,
            self.tf_r8,
            self.tf_r9,
            self.tf_rax,
            self.tf_rbx,
            self.tf_rbp,
            self.tf_r10,
            self.tf_r11,
            self.tf_r12,
            self.tf_r13,
            self.tf_r14,
            self.tf_r15,
            self.tf_xflags,
            self.tf_trapno,
            self.tf_addr,
            self.tf_flags,
            self.tf_err,
            self.tf_rip,
            self.tf_cs,
            self.tf_rflags,
            self.tf_rsp,
            self.tf_ss,
        ]
    }

    /// The frame of 25 words in field (ABI) order.
    pub fn from_words(w: [u64; 25]) -> Self {
        let [
            tf_rdi,
            tf_rsi,
            tf_rdx,
            tf_rcx,
            tf_r8,
            tf_r9,
            tf_rax,
            tf_rbx,
            tf_rbp,
            tf_r10,
            tf_r11,
            tf_r12,
            tf_r13,
            tf_r14,
            tf_r15,
            tf_xflags,
            tf_trapno,
            tf_addr,
            tf_flags,
            tf_err,
            tf_rip,
            tf_cs,
            tf_rflags,
            tf_rsp,
            tf_ss,
        ] = w;
        Self {
            tf_rdi,
            tf_rsi,
            tf_rdx,
            tf_rcx,
            tf_r8,
            tf_r9,
            tf_rax,
            tf_rbx,
            tf_rbp,
            tf_r10,
            tf_r11,
            tf_r12,
            tf_r13,
            tf_r14,
            tf_r15,
            tf_xflags,
            tf_trapno,
            tf_addr,
            tf_flags,
            tf_err,
            tf_rip,
            tf_cs,
            tf_rflags,
            tf_rsp,
            tf_ss,
        }
    }

    /// The frame's bytes, as the guest's memory holds them.
    pub fn to_bytes(&self) -> [u8; size_of::<TrapFrame>()] {
        words_to_bytes(&self.to_words())
    }

    /// A frame from the guest's bytes.
    pub fn from_bytes(b: &[u8; size_of::<TrapFrame>()]) -> Self {
        Self::from_words(bytes_to_words(b))
    }
}

impl VextFrame {
    /// The frame's bytes, as the guest's memory holds them.
    pub fn to_bytes(&self) -> [u8; size_of::<VextFrame>()] {
        let [fs, gs] = self.vx_tls;
        words_to_bytes(&[fs.base, fs.size as u64, gs.base, gs.size as u64])
    }

    /// A frame from the guest's bytes.
    pub fn from_bytes(b: &[u8; size_of::<VextFrame>()]) -> Self {
        let [fb, fsz, gb, gsz] = bytes_to_words(b);
        Self {
            vx_tls: [
                TlsInfo {
                    base: fb,
                    size: fsz as i64,
                },
                TlsInfo {
                    base: gb,
                    size: gsz as i64,
                },
            ],
        }
    }
}

fn words_to_bytes<const W: usize, const B: usize>(w: &[u64; W]) -> [u8; B] {
    let mut out = [0u8; B];
    for (chunk, v) in out.chunks_exact_mut(8).zip(w) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

fn bytes_to_words<const B: usize, const W: usize>(b: &[u8; B]) -> [u64; W] {
    let mut out = [0u64; W];
    for (v, chunk) in out.iter_mut().zip(b.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        *v = u64::from_ne_bytes(a);
    }
    out
}

/// `struct tls_info`: one TLS segment base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TlsInfo {
    /// The segment base (`wrfsbase`/`wrgsbase` value).
    pub base: u64,
    /// The segment's size; carried for DragonFly, not used by RUN.
    pub size: i64,
}

/// `struct vextframe` (32 bytes): `vx_tls[0]` is the FS base, `vx_tls[1]` the GS base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VextFrame {
    /// `[0]`: FS base, `[1]`: GS base.
    pub vx_tls: [TlsInfo; 2],
}

/// `rflags` bits a guest frame may carry into RUN (ABI section 7).
pub const RFLAGS_USER_MASK: u64 = 0x27_4DD5;
/// `rflags` bits RUN always sets (IF and the reserved bit 1).
pub const RFLAGS_USER_SET: u64 = 0x202;

// The layouts are part of the contract: fail the build if they drift.
const _: () = {
    assert!(size_of::<VkInfo>() == 48);
    assert!(offset_of!(VkInfo, ram_fd) == 8);
    assert!(offset_of!(VkInfo, ram_size) == 16);
    assert!(offset_of!(VkInfo, user_max) == 24);
    assert!(offset_of!(VkInfo, reserved) == 32);
    assert!(size_of::<TrapFrame>() == 200);
    assert!(offset_of!(TrapFrame, tf_rax) == 48);
    assert!(offset_of!(TrapFrame, tf_r12) == 88);
    assert!(offset_of!(TrapFrame, tf_xflags) == 120);
    assert!(offset_of!(TrapFrame, tf_rip) == 160);
    assert!(offset_of!(TrapFrame, tf_ss) == 192);
    assert!(size_of::<TlsInfo>() == 16);
    assert!(size_of::<VextFrame>() == 32);
    assert!(VK_SYS_BASE & (1 << 30) == 0);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_numbers_round_trip() {
        for h in Hypercall::ALL {
            assert_eq!(Hypercall::from_nr(h.nr()), Some(h));
            assert_eq!(Hypercall::from_name(h.name()), Some(h));
        }
        assert_eq!(Hypercall::VkInfo.nr(), 0x0DF0_0000);
        assert_eq!(Hypercall::VmspacePwrite.nr(), 0x0DF0_0000 + 493);
        assert_eq!(Hypercall::from_nr(VK_SYS_BASE + 1), None);
        assert_eq!(Hypercall::from_nr(39), None);
    }

    #[test]
    fn vk_info_bytes_follow_the_layout() {
        let info = VkInfo {
            abi_version: 1,
            page_size: 4096,
            ram_fd: -3,
            vpte_levels: 4,
            ram_size: 0x1122_3344_5566_7788,
            user_max: USER_MAX,
            reserved: [0, 9],
        };
        let b = info.to_bytes();
        assert_eq!(&b[8..12], &(-3i32).to_ne_bytes());
        assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[40..48], &9u64.to_ne_bytes());
    }

    #[test]
    fn vmspace_mmap_packs_flags_high() {
        let r10 = vmspace_mmap_prot_flags(PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE);
        assert_eq!(r10, (0x2001u64 << 32) | 3);
        assert_eq!(vmspace_mmap_prot_flags(-1, 0), 0xFFFF_FFFF);
    }

    #[test]
    fn frames_round_trip_through_bytes() {
        let mut w = [0u64; 25];
        for (i, v) in w.iter_mut().enumerate() {
            *v = 0x1111_0000_0000_0000 | i as u64;
        }
        let tf = TrapFrame::from_words(w);
        assert_eq!(tf.tf_rip, w[20]);
        assert_eq!(tf.tf_trapno, w[16]);
        assert_eq!(TrapFrame::from_bytes(&tf.to_bytes()), tf);
        assert_eq!(&tf.to_bytes()[160..168], &w[20].to_ne_bytes());
        let vf = VextFrame {
            vx_tls: [TlsInfo { base: 1, size: -2 }, TlsInfo { base: 3, size: 4 }],
        };
        assert_eq!(VextFrame::from_bytes(&vf.to_bytes()), vf);
    }
}
