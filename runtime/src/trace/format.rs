//! The trace's rendering, strace's grammar: results, signals, flag sets,
//! hypercalls with their arguments decoded, RUN's traps and VPAGETABLE
//! faults. Primitives in, text out.

use std::fmt::Write as _;

use nix::errno::Errno;
use vkabi::{Hypercall, PGEX_I, PGEX_P, PGEX_U, PGEX_W};

use crate::sys::abi::{SEGV_ACCERR, SEGV_MAPERR, SI_KERNEL};

/// strace's rendering of a result: `= 0`, `= 0x7f0000000000`,
/// `= -1 EINVAL (Invalid argument)`.
pub fn format_result(result: Result<i64, Errno>, hex: bool) -> String {
    match result {
        Ok(v) if hex => format!("= {v:#x}"),
        Ok(v) => format!("= {v}"),
        Err(e) => format!("= -1 {e:?} ({})", e.desc()),
    }
}

/// strace's line for a delivered signal:
/// `--- SIGSEGV {si_signo=SIGSEGV, si_code=SEGV_MAPERR, si_addr=0x8} ---`.
pub fn format_signal(info: &crate::sys::ptrace::SignalInfo) -> String {
    let name = |signo: i32| {
        nix::sys::signal::Signal::try_from(signo)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("SIG{signo}"))
    };
    let sig = name(info.signo);
    let code = match (info.signo, info.code) {
        (_, 0) => "SI_USER".to_owned(),
        (_, -1) => "SI_QUEUE".to_owned(),
        (_, -6) => "SI_TKILL".to_owned(),
        (_, SI_KERNEL) => "SI_KERNEL".to_owned(),
        (libc::SIGSEGV, SEGV_MAPERR) => "SEGV_MAPERR".to_owned(),
        (libc::SIGSEGV, SEGV_ACCERR) => "SEGV_ACCERR".to_owned(),
        (libc::SIGBUS, 1) => "BUS_ADRALN".to_owned(),
        (libc::SIGBUS, 2) => "BUS_ADRERR".to_owned(),
        (libc::SIGTRAP, 1) => "TRAP_BRKPT".to_owned(),
        (libc::SIGCHLD, 1) => "CLD_EXITED".to_owned(),
        (libc::SIGCHLD, 2) => "CLD_KILLED".to_owned(),
        (libc::SIGCHLD, 3) => "CLD_DUMPED".to_owned(),
        (libc::SIGCHLD, 5) => "CLD_STOPPED".to_owned(),
        (libc::SIGCHLD, 6) => "CLD_CONTINUED".to_owned(),
        (_, c) => c.to_string(),
    };
    let mut out = format!("--- {sig} {{si_signo={sig}, si_code={code}");
    if let Some(addr) = info.addr {
        let _ = write!(out, ", si_addr={addr:#x}");
    }
    if let Some((pid, uid)) = info.sender {
        let _ = write!(out, ", si_pid={pid}, si_uid={uid}");
    }
    if let Some(status) = info.status {
        // An exit code, or (killed, dumped, stopped) the signal's name.
        if matches!(info.code, 2 | 3 | 5 | 6) {
            let _ = write!(out, ", si_status={}", name(status));
        } else {
            let _ = write!(out, ", si_status={status}");
        }
    }
    out.push_str("} ---");
    out
}

/// The `clone` flags strace names (the low byte is the exit signal).
const CLONE_NAMES: &[(u64, &str)] = &[
    (0x100, "CLONE_VM"),
    (0x200, "CLONE_FS"),
    (0x400, "CLONE_FILES"),
    (0x800, "CLONE_SIGHAND"),
    (0x1000, "CLONE_PIDFD"),
    (0x2000, "CLONE_PTRACE"),
    (0x4000, "CLONE_VFORK"),
    (0x8000, "CLONE_PARENT"),
    (0x1_0000, "CLONE_THREAD"),
    (0x2_0000, "CLONE_NEWNS"),
    (0x4_0000, "CLONE_SYSVSEM"),
    (0x8_0000, "CLONE_SETTLS"),
    (0x10_0000, "CLONE_PARENT_SETTID"),
    (0x20_0000, "CLONE_CHILD_CLEARTID"),
    (0x40_0000, "CLONE_DETACHED"),
    (0x80_0000, "CLONE_UNTRACED"),
    (0x100_0000, "CLONE_CHILD_SETTID"),
];

/// A new task, as strace shows the call that made it: `fork() = 42`,
/// `vfork() = 42`, `clone(flags=CLONE_VM|...|SIGCHLD) = 42`, `clone3(...) =
/// 42`. `nr` is the system call, `flags` its first argument.
pub fn format_new_task(nr: u64, flags: u64, child: i32) -> String {
    let call = match nr as i64 {
        libc::SYS_fork => "fork()".to_owned(),
        libc::SYS_vfork => "vfork()".to_owned(),
        libc::SYS_clone => {
            let mut text = format_flags(flags & !0xff, CLONE_NAMES, "0");
            let signal = (flags & 0xff) as i32;
            if signal != 0 {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| signal.to_string());
                if text == "0" {
                    text = name;
                } else {
                    text = format!("{text}|{name}");
                }
            }
            format!("clone(flags={text})")
        }
        libc::SYS_clone3 => "clone3(...)".to_owned(),
        _ => format!("syscall_{nr}(...)"),
    };
    format!("{call} = {child}")
}

/// A finished exec: `execve("/usr/bin/true", ["true"], ...) = 0` (the
/// program as the kernel resolved it, the new argv).
pub fn format_exec(exe: &str, args: &[String]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("execve({exe:?}, [{}], ...) = 0", args.join(", "))
}

/// Render `value` as `A|B|0x...` from a table of named bits; zero is `zero`.
pub fn format_flags(value: u64, names: &[(u64, &str)], zero: &str) -> String {
    if value == 0 {
        return zero.to_owned();
    }
    let mut out = String::new();
    let mut rest = value;
    for &(bit, name) in names {
        if bit != 0 && rest & bit == bit {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !out.is_empty() {
            out.push('|');
        }
        let _ = write!(out, "{rest:#x}");
    }
    out
}

const PROT_NAMES: &[(u64, &str)] = &[
    (libc::PROT_READ as u64, "PROT_READ"),
    (libc::PROT_WRITE as u64, "PROT_WRITE"),
    (libc::PROT_EXEC as u64, "PROT_EXEC"),
];

const MAP_NAMES: &[(u64, &str)] = &[
    (libc::MAP_SHARED as u64, "MAP_SHARED"),
    (libc::MAP_PRIVATE as u64, "MAP_PRIVATE"),
    (libc::MAP_FIXED as u64, "MAP_FIXED"),
    (libc::MAP_ANONYMOUS as u64, "MAP_ANONYMOUS"),
    (vkabi::MAP_VPAGETABLE as u64, "MAP_VPAGETABLE"),
    (libc::MAP_NORESERVE as u64, "MAP_NORESERVE"),
    (libc::MAP_POPULATE as u64, "MAP_POPULATE"),
    (vkabi::MAP_STACK as u64, "MAP_STACK"),
    (libc::MAP_FIXED_NOREPLACE as u64, "MAP_FIXED_NOREPLACE"),
];

/// DragonFly's `madvise`/`mcontrol` behaviours by value.
fn madv_name(behav: u64) -> String {
    const NAMES: [&str; 12] = [
        "MADV_NORMAL",
        "MADV_RANDOM",
        "MADV_SEQUENTIAL",
        "MADV_WILLNEED",
        "MADV_DONTNEED",
        "MADV_FREE",
        "MADV_NOSYNC",
        "MADV_AUTOSYNC",
        "MADV_NOCORE",
        "MADV_CORE",
        "MADV_INVAL",
        "MADV_SETMAP",
    ];
    match NAMES.get(behav as usize) {
        Some(name) => (*name).to_owned(),
        None => format!("{:#x}", behav as i32),
    }
}

fn ptr(v: u64) -> String {
    if v == 0 {
        "NULL".to_owned()
    } else {
        format!("{v:#x}")
    }
}

/// The length of an address range: hex beside the hex addresses when it
/// is whole pages (0x7fffffff0000), decimal otherwise (48).
fn len(v: u64) -> String {
    if v != 0 && v.is_multiple_of(vkabi::PAGE_SIZE) {
        format!("{v:#x}")
    } else {
        v.to_string()
    }
}

/// Hypercall `nr` (`h`: what it names, if anything) with arguments `a`, as
/// strace would print it: `vk_info(0x7ffd..., 48)`.
pub fn format_call(h: Option<Hypercall>, nr: u64, a: [u64; 6]) -> String {
    let int = |v: u64| (v as i32).to_string();
    let prot = |v: u64| format_flags(v & 0xffff_ffff, PROT_NAMES, "PROT_NONE");
    let flags = |v: u64| format_flags(v & 0xffff_ffff, MAP_NAMES, "0");
    let value = |behav: u64, v: u64| {
        if behav == vkabi::MADV_SETMAP as u64 {
            vpte::Vpte(v).to_string()
        } else {
            format!("{v:#x}")
        }
    };
    let Some(h) = h else {
        let mut s = format!("syscall_{nr:#x}(");
        for (i, v) in a.iter().enumerate() {
            let _ = write!(s, "{}{v:#x}", if i == 0 { "" } else { ", " });
        }
        s.push(')');
        return s;
    };
    let args = match h {
        Hypercall::VkInfo => format!("{}, {}", ptr(a[0]), a[1]),
        Hypercall::VkMmap => format!(
            "{}, {}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            len(a[1]),
            prot(a[2]),
            flags(a[3]),
            int(a[4]),
            a[5]
        ),
        Hypercall::Mcontrol => format!(
            "{}, {}, {}, {}",
            ptr(a[0]),
            len(a[1]),
            madv_name(a[2] & 0xffff_ffff),
            value(a[2], a[3])
        ),
        Hypercall::VmspaceCreate => format!("{}, {}, {}", ptr(a[0]), int(a[1]), ptr(a[2])),
        Hypercall::VmspaceDestroy => ptr(a[0]),
        Hypercall::VmspaceCtl => {
            let cmd = if a[1] as i32 == vkabi::VMSPACE_CTL_RUN {
                "VMSPACE_CTL_RUN".to_owned()
            } else {
                int(a[1])
            };
            format!("{}, {cmd}, {}, {}", ptr(a[0]), ptr(a[2]), ptr(a[3]))
        }
        Hypercall::VmspaceMmap => format!(
            "{}, {}, {}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            ptr(a[1]),
            len(a[2]),
            prot(a[3] & 0xffff_ffff),
            flags(a[3] >> 32),
            int(a[4]),
            a[5]
        ),
        Hypercall::VmspaceMunmap => format!("{}, {}, {}", ptr(a[0]), ptr(a[1]), len(a[2])),
        Hypercall::VmspaceMcontrol => format!(
            "{}, {}, {}, {}, {}",
            ptr(a[0]),
            ptr(a[1]),
            len(a[2]),
            madv_name(a[3] & 0xffff_ffff),
            value(a[3], a[4])
        ),
        Hypercall::VmspacePread | Hypercall::VmspacePwrite => format!(
            "{}, {}, {}, {}, {:#x}",
            ptr(a[0]),
            ptr(a[1]),
            a[2],
            int(a[3]),
            a[4]
        ),
    };
    format!("{}({args})", h.name())
}

/// A whole hypercall line: the call and its result.
pub fn format_call_result(
    h: Option<Hypercall>,
    nr: u64,
    a: [u64; 6],
    result: Result<i64, Errno>,
) -> String {
    format!(
        "{} {}",
        format_call(h, nr, a),
        format_result(result, returns_address(h))
    )
}

/// `vk_info(out, size)` as strace shows a call that filled a struct: the
/// fields written (the first `written` bytes of the 48), `...` for the rest.
pub fn format_vk_info(a: [u64; 6], info: &vkabi::VkInfo, written: usize) -> String {
    let fields: [(usize, String); 7] = [
        (4, format!("abi_version={}", info.abi_version)),
        (8, format!("page_size={}", info.page_size)),
        (12, format!("ram_fd={}", info.ram_fd)),
        (16, format!("vpte_levels={}", info.vpte_levels)),
        (24, format!("ram_size={}", len(info.ram_size))),
        (32, format!("user_max={:#x}", info.user_max)),
        (48, "reserved=[0, 0]".to_owned()),
    ];
    let mut shown: Vec<&str> = fields
        .iter()
        .take_while(|(end, _)| *end <= written)
        .map(|(_, f)| f.as_str())
        .collect();
    if shown.len() < fields.len() {
        shown.push("...");
    }
    format!("vk_info({{{}}}, {})", shown.join(", "), a[1])
}

/// Whether `h` returns an address (printed in hex).
pub fn returns_address(h: Option<Hypercall>) -> bool {
    matches!(h, Some(Hypercall::VkMmap | Hypercall::VmspaceMmap))
}

/// DragonFly's name of a trap number.
pub fn trap_name(trapno: u64) -> Option<&'static str> {
    use vkabi::*;
    Some(match trapno {
        T_SIGNAL => "T_SIGNAL",
        T_PRIVINFLT => "T_PRIVINFLT",
        T_BPTFLT => "T_BPTFLT",
        T_ARITHTRAP => "T_ARITHTRAP",
        T_PROTFLT => "T_PROTFLT",
        T_TRCTRAP => "T_TRCTRAP",
        T_PAGEFLT => "T_PAGEFLT",
        T_ALIGNFLT => "T_ALIGNFLT",
        T_DIVIDE => "T_DIVIDE",
        T_SEGNPFLT => "T_SEGNPFLT",
        T_STKFLT => "T_STKFLT",
        T_XMMFLT => "T_XMMFLT",
        T_SYSCALL80 => "T_SYSCALL80",
        T_FAST_SYSCALL => "T_FAST_SYSCALL",
        _ => return None,
    })
}

/// A trap for the trace: `T_FAST_SYSCALL rax=1 (write) rip=0x401002` (the
/// system call the user code asked for: rax, and its Linux name if it has
/// one), `T_PAGEFLT addr=0x1000 err=W|U rip=...`.
pub fn format_trap(trapno: u64, err: u64, addr: u64, rip: u64, rax: u64) -> String {
    let name = trap_name(trapno).map_or_else(|| trapno.to_string(), str::to_owned);
    match trapno {
        vkabi::T_PAGEFLT => {
            let bits = [(PGEX_P, "P"), (PGEX_W, "W"), (PGEX_U, "U"), (PGEX_I, "I")];
            let err = format_flags(err, &bits, "0");
            format!("{name} addr={addr:#x} err={err} rip={rip:#x}")
        }
        vkabi::T_FAST_SYSCALL | vkabi::T_SYSCALL80 => {
            let call = match super::syscalls::syscall_name(rax) {
                Some(n) => format!("{rax} ({n})"),
                None if rax < 0x1000 => rax.to_string(),
                None => format!("{rax:#x}"),
            };
            format!("{name} rax={call} rip={rip:#x}")
        }
        _ => format!("{name} rip={rip:#x}"),
    }
}

/// A VPAGETABLE fault at `va` under master PDE `master`, for an access of
/// kind `access`, with what the walk found:
/// `fault(0x7f..., V|RW frame=0x100000, write) = 0x5000 rw`; a failed walk
/// shows what it becomes: `= SIGSEGV (...)` in a guest process,
/// `= T_PAGEFLT (...)` in a vmspace (a RUN that returns it, no signal).
pub fn format_fault(
    va: u64,
    master: u64,
    access: vpte::Access,
    result: &Result<vpte::Translation, Option<vpte::WalkError>>,
    in_vmspace: bool,
) -> String {
    let failed = if in_vmspace { "T_PAGEFLT" } else { "SIGSEGV" };
    let kind = match access {
        vpte::Access::Read => "read",
        vpte::Access::Write => "write",
        vpte::Access::Execute => "exec",
    };
    let outcome = match result {
        Ok(t) => format!("= {:#x} {}", t.pa.0, if t.writable { "rw" } else { "ro" }),
        Err(Some(e)) => format!("= {failed} ({e})"),
        Err(None) => format!("= {failed} (page index overflows)"),
    };
    format!("fault({va:#x}, {}, {kind}) {outcome}", vpte::Vpte(master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vk_info_shows_the_struct_it_wrote() {
        let info = vkabi::VkInfo {
            abi_version: 1,
            page_size: 4096,
            ram_fd: 3,
            vpte_levels: 4,
            ram_size: 256 << 20,
            user_max: 0x7fff_ffff_f000,
            reserved: [0; 2],
        };
        assert_eq!(
            format_vk_info([0x1000, 48, 0, 0, 0, 0], &info, 48),
            "vk_info({abi_version=1, page_size=4096, ram_fd=3, vpte_levels=4, \
             ram_size=0x10000000, user_max=0x7ffffffff000, reserved=[0, 0]}, 48)"
        );
        assert_eq!(
            format_vk_info([0x1000, 16, 0, 0, 0, 0], &info, 16),
            "vk_info({abi_version=1, page_size=4096, ram_fd=3, vpte_levels=4, ...}, 16)"
        );
    }

    #[test]
    fn results_render_like_strace() {
        assert_eq!(format_result(Ok(0), false), "= 0");
        assert_eq!(
            format_result(Ok(0x7f00_0000_0000), true),
            "= 0x7f0000000000"
        );
        assert_eq!(
            format_result(Err(Errno::EINVAL), false),
            "= -1 EINVAL (Invalid argument)"
        );
    }

    #[test]
    fn signals_render_like_strace() {
        use crate::sys::ptrace::SignalInfo;
        let segv = SignalInfo {
            signo: libc::SIGSEGV,
            code: 1,
            addr: Some(8),
            sender: None,
            status: None,
        };
        assert_eq!(
            format_signal(&segv),
            "--- SIGSEGV {si_signo=SIGSEGV, si_code=SEGV_MAPERR, si_addr=0x8} ---"
        );
        let term = SignalInfo {
            signo: libc::SIGTERM,
            code: 0,
            addr: None,
            sender: Some((42, 0)),
            status: None,
        };
        assert_eq!(
            format_signal(&term),
            "--- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=42, si_uid=0} ---"
        );
        let chld = |code, status| SignalInfo {
            signo: libc::SIGCHLD,
            code,
            addr: None,
            sender: Some((43, 0)),
            status: Some(status),
        };
        assert_eq!(
            format_signal(&chld(1, 3)),
            "--- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=43, si_uid=0, si_status=3} ---"
        );
        assert_eq!(
            format_signal(&chld(2, libc::SIGKILL)),
            "--- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_KILLED, si_pid=43, si_uid=0, si_status=SIGKILL} ---"
        );
    }

    #[test]
    fn process_events_render_like_strace() {
        assert_eq!(format_new_task(libc::SYS_fork as u64, 0, 42), "fork() = 42");
        assert_eq!(
            format_new_task(libc::SYS_clone as u64, 0x3d0f00, 43),
            "clone(flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|\
             CLONE_SETTLS|CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID) = 43"
        );
        assert_eq!(
            format_new_task(libc::SYS_clone as u64, 0x1200011, 44),
            "clone(flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD) = 44"
        );
        assert_eq!(
            format_exec("/usr/bin/true", &["true".to_owned(), "a b".to_owned()]),
            r#"execve("/usr/bin/true", ["true", "a b"], ...) = 0"#
        );
    }

    #[test]
    fn flags_render_with_leftover_bits() {
        let names = [(1, "A"), (2, "B"), (8, "D")];
        assert_eq!(format_flags(0, &names, "0"), "0");
        assert_eq!(format_flags(3, &names, "0"), "A|B");
        assert_eq!(format_flags(0x15, &names, "0"), "A|0x14");
    }

    #[test]
    fn calls_are_decoded_symbolically() {
        let call = |h: Hypercall, a| format_call(Some(h), h.nr(), a);
        assert_eq!(
            call(Hypercall::VkInfo, [0x7ffd_0000_1000, 48, 0, 0, 0, 0]),
            "vk_info(0x7ffd00001000, 48)"
        );
        assert_eq!(
            call(Hypercall::VkMmap, [0, 8192, 3, 0x2001, 3, 0]),
            "vk_mmap(NULL, 0x2000, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_VPAGETABLE, 3, 0x0)"
        );
        assert_eq!(
            call(Hypercall::Mcontrol, [0x1000, 4096, 11, 0x5023, 0, 0]),
            "mcontrol(0x1000, 0x1000, MADV_SETMAP, V|RW|A frame=0x5000)"
        );
        // A length that is not whole pages stays decimal.
        assert_eq!(
            call(Hypercall::VmspaceMunmap, [1, 0x1000, 100, 0, 0, 0]),
            "vmspace_munmap(0x1, 0x1000, 100)"
        );
        let packed = vkabi::vmspace_mmap_prot_flags(1, 0x22);
        assert_eq!(
            call(
                Hypercall::VmspaceMmap,
                [7, 0x400000, 4096, packed, -1i64 as u64, 0]
            ),
            "vmspace_mmap(0x7, 0x400000, 0x1000, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0x0)"
        );
        assert_eq!(
            format_call(None, vkabi::VK_SYS_BASE + 1, [1, 2, 3, 4, 5, 6]),
            "syscall_0xdf00001(0x1, 0x2, 0x3, 0x4, 0x5, 0x6)"
        );
    }

    #[test]
    fn traps_are_traced_by_name() {
        use vkabi::{T_FAST_SYSCALL, T_PAGEFLT};
        assert_eq!(
            format_trap(T_PAGEFLT, PGEX_W | PGEX_U, 0x1000, 0x401000, 0),
            "T_PAGEFLT addr=0x1000 err=W|U rip=0x401000"
        );
        assert_eq!(
            format_trap(T_FAST_SYSCALL, 2, 0, 0x401002, 1),
            "T_FAST_SYSCALL rax=1 (write) rip=0x401002"
        );
        assert_eq!(format_trap(99, 0, 0, 0x10, 0), "99 rip=0x10");
        assert_eq!(
            format_trap(T_FAST_SYSCALL, 2, 0, 0x10, 335),
            "T_FAST_SYSCALL rax=335 rip=0x10"
        );
    }
}
