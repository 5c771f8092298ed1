//! Conformance of the C header `guest-samples/include/vkernel.h` with this
//! crate, the ABI's one definition (docs/ABI.md).
//!
//! The Rust side drives every check: [`vkabi_table`] lists each constant,
//! size, alignment, field offset and field type of the crate under its C
//! name, `guest-samples/c/abi_dump.c` prints what the header says as
//! `name value` lines, and a name missing on either side, or a value that
//! differs, fails. The table itself is checked for completeness against the
//! crate's source and the header's `#define`s, so neither can grow a name the
//! test does not compare. Further tests run the header's wrappers without a
//! supervisor (every hypercall is `ENOSYS`) and under a seccomp fake of one
//! (`hypercall_regs.c`: the registers each wrapper loads), and run
//! `vkinfo.c` both ways.
//!
//! The tests need `gcc`. Without it they print a loud SKIP, or fail when
//! `CI` is `true` or `1` (README, "Run the tests"); the same holds for seccomp,
//! which the fakes need. `musl-gcc` and `g++` are used when present and are
//! optional even in CI.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vkabi::hypercall::Errno;
use vkabi::{Hypercall, TlsInfo, TrapFrame, VextFrame, VkInfo, VpteT};

// ---- Where things are, and how to build them ------------------------------

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn include_dir() -> PathBuf {
    samples_dir().join("include")
}

fn c_dir() -> PathBuf {
    samples_dir().join("c")
}

/// The flags every C program here must build cleanly with.
const STRICT: &[&str] = &[
    "-std=c11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-Wconversion",
    "-Wsign-conversion",
];

/// `exit(77)`: a C program found that the machine lacks what it needs.
const EXIT_UNSUPPORTED: i32 = 77;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Report a missing capability: a loud SKIP locally, a failure in CI.
fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test}: {why}; CI is set, where a skipped test is a failure"
    );
    // Straight to the process's stderr, in one write: libtest hides
    // `eprintln!` output of passing tests, and a skip must be seen.
    let line = format!("\n*** SKIP {test}: {why}; the C header is NOT checked by this test ***\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn compiler_present(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A C (or C++) compiler driver.
#[derive(Debug, Clone, Copy)]
struct Compiler(&'static str);

impl Compiler {
    /// `gcc`, which these tests require (see [`skip`]).
    fn gcc(test: &str) -> Option<Compiler> {
        if compiler_present("gcc") {
            Some(Compiler("gcc"))
        } else {
            skip(test, "gcc not found on PATH");
            None
        }
    }

    /// A further compiler the header is checked with: its absence is a
    /// loud skip of that part (a failure in CI, which installs it); the
    /// rest of the test still runs.
    fn optional(test: &str, program: &'static str) -> Option<Compiler> {
        if compiler_present(program) {
            Some(Compiler(program))
        } else {
            skip(
                test,
                &format!("{program} not found on PATH; vkernel.h is not checked with it"),
            );
            None
        }
    }

    /// Build `source` into `out` with `flags` and the header's directory (and
    /// `guest-samples/c`) on the include path; panics with the compiler's
    /// messages if it fails.
    fn build(self, flags: &[&str], source: &Path, out: &Path) {
        let output = Command::new(self.0)
            .args(flags)
            .arg("-I")
            .arg(include_dir())
            .arg("-I")
            .arg(c_dir())
            .arg(source)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.0));
        assert!(
            output.status.success(),
            "{} {} {} failed:\n{}",
            self.0,
            flags.join(" "),
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("the C programs print ASCII")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

// ---- The Rust side of the comparison --------------------------------------

/// An integer constant of the ABI, as the C program prints it.
trait CInt: Copy {
    /// The name abi_dump.c's `TYPE_NAME` gives the matching C type.
    const C_TYPE: &'static str;
    /// The value converted to a 64-bit unsigned integer as C's
    /// `(unsigned long long)` cast does (sign-extending signed types).
    fn bits(self) -> u64;
}

impl CInt for u32 {
    const C_TYPE: &'static str = "u32";
    fn bits(self) -> u64 {
        u64::from(self)
    }
}

impl CInt for i32 {
    const C_TYPE: &'static str = "i32";
    fn bits(self) -> u64 {
        i64::from(self) as u64
    }
}

impl CInt for u64 {
    const C_TYPE: &'static str = "u64";
    fn bits(self) -> u64 {
        self
    }
}

impl CInt for usize {
    const C_TYPE: &'static str = "u64";
    fn bits(self) -> u64 {
        self as u64
    }
}

/// A field type, named as abi_dump.c names it.
trait CType {
    fn c_type() -> String;
}

macro_rules! int_c_type {
    ($($t:ty => $name:literal),* $(,)?) => {
        $(impl CType for $t {
            fn c_type() -> String {
                $name.to_owned()
            }
        })*
    };
}

int_c_type!(u32 => "u32", i32 => "i32", u64 => "u64", i64 => "i64");

impl CType for TlsInfo {
    fn c_type() -> String {
        "struct tls_info".to_owned()
    }
}

impl<T: CType, const N: usize> CType for [T; N] {
    fn c_type() -> String {
        format!("{}[{N}]", T::c_type())
    }
}

/// The C type name of the field `get` projects.
fn field_type<S, F: CType>(_get: fn(&S) -> &F) -> String {
    F::c_type()
}

/// What abi_dump.c must print, built from the crate.
#[derive(Debug, Default)]
struct Abi {
    /// Every `name value` line, exactly.
    lines: BTreeMap<String, String>,
    /// The crate's items the lines cover, by Rust name (`USER_MAX`,
    /// `VkInfo.ram_fd`, `Errno::ENOSYS`, `fn vmspace_mmap_prot_flags`).
    rust_items: BTreeSet<String>,
    /// The C macro names the lines cover.
    c_constants: BTreeSet<String>,
}

impl Abi {
    fn line(&mut self, key: String, value: String) {
        let old = self.lines.insert(key.clone(), value);
        assert!(old.is_none(), "the table has {key} twice");
    }

    fn constant<T: CInt>(&mut self, rust: &str, c: &str, value: T) {
        self.rust_items.insert(rust.to_owned());
        self.c_constants.insert(c.to_owned());
        self.line(c.to_owned(), value.bits().to_string());
        self.line(format!("typeof({c})"), T::C_TYPE.to_owned());
    }

    fn layout<T>(&mut self, rust: &str, c: &str) {
        self.rust_items.insert(rust.to_owned());
        self.line(format!("sizeof({c})"), size_of::<T>().to_string());
        self.line(format!("alignof({c})"), align_of::<T>().to_string());
    }

    fn field(&mut self, rust: &str, c: &str, field: &str, offset: usize, ty: String) {
        self.rust_items.insert(format!("{rust}.{field}"));
        self.line(format!("offsetof({c}.{field})"), offset.to_string());
        self.line(format!("typeof({c}.{field})"), ty);
    }
}

/// Constants whose C name is their Rust name.
macro_rules! constants {
    ($abi:ident: $($name:ident),* $(,)?) => {
        $($abi.constant(stringify!($name), stringify!($name), vkabi::$name);)*
    };
}

/// A struct's size, alignment, and each field's offset and type.
macro_rules! fields {
    ($abi:ident, $s:ident as $c:literal: $($f:ident),* $(,)?) => {
        $abi.layout::<$s>(stringify!($s), $c);
        $($abi.field(
            stringify!($s),
            $c,
            stringify!($f),
            offset_of!($s, $f),
            field_type(|s: &$s| &s.$f),
        );)*
    };
}

/// The `(prot, flags)` pairs abi_dump.c packs with
/// `vk_vmspace_mmap_prot_flags` (the same list, in its PACK lines).
fn packed_prot_flags() -> [(i32, i32); 5] {
    use vkabi::*;
    [
        (PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE),
        (PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED),
        (-1, 0),
        (0, -1),
        (i32::MIN, i32::MAX),
    ]
}

/// Everything vkernel.h must agree on, from the crate.
fn vkabi_table() -> Abi {
    let mut abi = Abi::default();

    constants!(abi: VK_ABI_VERSION, VK_SYS_BASE, VK_SYS_COUNT);
    for h in Hypercall::ALL {
        abi.constant(
            &format!("Hypercall::{h:?}"),
            &format!("VK_SYS_{}", h.name()),
            h.nr(),
        );
    }
    constants!(abi: PAGE_SIZE, PAGE_SHIFT, VPTE_LEVELS, RAM_SIZE_MAX);
    // DragonFly's name for the crate's USER_MAX.
    abi.constant("USER_MAX", "VM_MAX_USER_ADDRESS", vkabi::USER_MAX);
    constants!(abi:
        MAP_VPAGETABLE, PROT_READ, PROT_WRITE, PROT_EXEC, MAP_SHARED, MAP_PRIVATE, MAP_FIXED,
        MAP_ANONYMOUS, MAP_STACK, MADV_INVAL, MADV_SETMAP, VMSPACE_CTL_RUN,
    );
    constants!(abi:
        VPTE_V, VPTE_RW, VPTE_U, VPTE_A, VPTE_M, VPTE_PS, VPTE_G, VPTE_WIRED, VPTE_MANAGED,
        VPTE_NX, VPTE_FRAME, VPTE_ENTRIES, VPTE_TOP_SHIFT,
    );
    constants!(abi: PGEX_P, PGEX_W, PGEX_U, PGEX_I);
    constants!(abi:
        T_SIGNAL, T_PRIVINFLT, T_BPTFLT, T_ARITHTRAP, T_ASTFLT, T_PROTFLT, T_TRCTRAP, T_PAGEFLT,
        T_ALIGNFLT, T_DIVIDE, T_NMI, T_OFLOW, T_BOUND, T_DNA, T_DOUBLEFLT, T_FPOPFLT, T_TSSFLT,
        T_SEGNPFLT, T_STKFLT, T_MCHK, T_XMMFLT, T_RESERVED, T_SYSCALL80, T_FAST_SYSCALL,
    );
    constants!(abi: RFLAGS_USER_MASK, RFLAGS_USER_SET);
    // The fast RUN's block layout (vkabi::fastrun), which the header's
    // vmspace_ctl() implements too.
    {
        use vkabi::fastrun;
        abi.constant(
            "fastrun::VMSPACE_CTL_FASTINFO",
            "VMSPACE_CTL_FASTINFO",
            fastrun::VMSPACE_CTL_FASTINFO,
        );
        abi.constant(
            "fastrun::OPEN_MAGIC",
            "VK_FAST_OPEN_MAGIC",
            fastrun::OPEN_MAGIC,
        );
        abi.constant(
            "fastrun::CX_STATE",
            "VK_FAST_CX_STATE",
            fastrun::CX_STATE as i32,
        );
        abi.constant("fastrun::CX_SEQ", "VK_FAST_CX_SEQ", fastrun::CX_SEQ as i32);
        abi.constant(
            "fastrun::CX_KICK",
            "VK_FAST_CX_KICK",
            fastrun::CX_KICK as i32,
        );
        abi.constant("fastrun::CX_SIG", "VK_FAST_CX_SIG", fastrun::CX_SIG as i32);
        abi.constant(
            "fastrun::CX_CODE",
            "VK_FAST_CX_CODE",
            fastrun::CX_CODE as i32,
        );
        abi.constant(
            "fastrun::CX_ADDR",
            "VK_FAST_CX_ADDR",
            fastrun::CX_ADDR as i32,
        );
        abi.constant(
            "fastrun::CX_SYSCALL",
            "VK_FAST_CX_SYSCALL",
            fastrun::CX_SYSCALL as i32,
        );
        abi.constant(
            "fastrun::CX_FS_OUT",
            "VK_FAST_CX_FS_OUT",
            fastrun::CX_FS_OUT as i32,
        );
        abi.constant(
            "fastrun::CX_GS_OUT",
            "VK_FAST_CX_GS_OUT",
            fastrun::CX_GS_OUT as i32,
        );
        abi.constant(
            "fastrun::CX_FS_IN",
            "VK_FAST_CX_FS_IN",
            fastrun::CX_FS_IN as i32,
        );
        abi.constant(
            "fastrun::CX_GS_IN",
            "VK_FAST_CX_GS_IN",
            fastrun::CX_GS_IN as i32,
        );
        abi.constant(
            "fastrun::CX_OPEN",
            "VK_FAST_CX_OPEN",
            fastrun::CX_OPEN as i32,
        );
        abi.constant(
            "fastrun::CX_BUSY",
            "VK_FAST_CX_BUSY",
            fastrun::CX_BUSY as i32,
        );
        abi.constant(
            "fastrun::CX_MASK_HELD",
            "VK_FAST_CX_MASK_HELD",
            fastrun::CX_MASK_HELD as i32,
        );
        abi.constant(
            "fastrun::CX_FAULT",
            "VK_FAST_CX_FAULT",
            fastrun::CX_FAULT as i32,
        );
        abi.constant(
            "fastrun::CX_SAVED_MASK",
            "VK_FAST_CX_SAVED_MASK",
            fastrun::CX_SAVED_MASK as i32,
        );
        abi.constant(
            "fastrun::CX_FAULT_ADDR",
            "VK_FAST_CX_FAULT_ADDR",
            fastrun::CX_FAULT_ADDR as i32,
        );
        abi.constant(
            "fastrun::CX_FAULT_ERR",
            "VK_FAST_CX_FAULT_ERR",
            fastrun::CX_FAULT_ERR as i32,
        );
        abi.constant(
            "fastrun::CX_STUB_PID",
            "VK_FAST_CX_STUB_PID",
            fastrun::CX_STUB_PID as i32,
        );
        abi.constant(
            "fastrun::CX_CTX_TID",
            "VK_FAST_CX_CTX_TID",
            fastrun::CX_CTX_TID as i32,
        );
        abi.constant(
            "fastrun::CX_KICK_AT",
            "VK_FAST_CX_KICK_AT",
            fastrun::CX_KICK_AT as i32,
        );
        abi.constant(
            "fastrun::CX_N_RUNS",
            "VK_FAST_CX_N_RUNS",
            fastrun::CX_N_RUNS as i32,
        );
        abi.constant(
            "fastrun::CX_N_SYSCALL",
            "VK_FAST_CX_N_SYSCALL",
            fastrun::CX_N_SYSCALL as i32,
        );
        abi.constant(
            "fastrun::CX_N_PAGEFAULT",
            "VK_FAST_CX_N_PAGEFAULT",
            fastrun::CX_N_PAGEFAULT as i32,
        );
        abi.constant(
            "fastrun::CX_N_TRAP",
            "VK_FAST_CX_N_TRAP",
            fastrun::CX_N_TRAP as i32,
        );
        abi.constant(
            "fastrun::CX_N_SIGNAL",
            "VK_FAST_CX_N_SIGNAL",
            fastrun::CX_N_SIGNAL as i32,
        );
        abi.constant(
            "fastrun::CX_NOTIF",
            "VK_FAST_CX_NOTIF",
            fastrun::CX_NOTIF as i32,
        );
        abi.constant(
            "fastrun::CX_LISTENER",
            "VK_FAST_CX_LISTENER",
            fastrun::CX_LISTENER as i32,
        );
        abi.constant(
            "fastrun::CX_NOTIF_ID",
            "VK_FAST_CX_NOTIF_ID",
            fastrun::CX_NOTIF_ID as i32,
        );
        abi.constant(
            "fastrun::CX_RECV_LOCK",
            "VK_FAST_CX_RECV_LOCK",
            fastrun::CX_RECV_LOCK as i32,
        );
        abi.constant(
            "fastrun::NR_REPORT",
            "VK_FAST_NR_REPORT",
            fastrun::NR_REPORT as i32,
        );
        abi.constant(
            "fastrun::FASTINFO_LISTENER",
            "VK_FAST_FASTINFO_LISTENER",
            fastrun::FASTINFO_LISTENER as i32,
        );
        abi.constant("fastrun::CX_IN", "VK_FAST_CX_IN", fastrun::CX_IN as i32);
        abi.constant("fastrun::CX_OUT", "VK_FAST_CX_OUT", fastrun::CX_OUT as i32);
        abi.constant(
            "fastrun::GREGS_IN",
            "VK_FAST_GREGS_IN",
            fastrun::GREGS_IN as i32,
        );
        abi.constant("fastrun::GREGS", "VK_FAST_GREGS", fastrun::GREGS as i32);
        abi.constant(
            "fastrun::STATE_WAIT",
            "VK_FAST_STATE_WAIT",
            fastrun::STATE_WAIT as i32,
        );
        abi.constant(
            "fastrun::STATE_GO",
            "VK_FAST_STATE_GO",
            fastrun::STATE_GO as i32,
        );
        abi.constant(
            "fastrun::STATE_RUNNING",
            "VK_FAST_STATE_RUNNING",
            fastrun::STATE_RUNNING as i32,
        );
        abi.constant(
            "fastrun::STATE_EXIT",
            "VK_FAST_STATE_EXIT",
            fastrun::STATE_EXIT as i32,
        );
        abi.constant(
            "fastrun::KICK_SIGNAL",
            "VK_FAST_KICK_SIGNAL",
            fastrun::KICK_SIGNAL as i32,
        );
    }

    // The crate's errno values against <errno.h>.
    for (name, errno) in [
        ("EPERM", Errno::EPERM),
        ("ENOENT", Errno::ENOENT),
        ("EINTR", Errno::EINTR),
        ("EIO", Errno::EIO),
        ("EBADF", Errno::EBADF),
        ("ENOMEM", Errno::ENOMEM),
        ("EFAULT", Errno::EFAULT),
        ("EBUSY", Errno::EBUSY),
        ("EEXIST", Errno::EEXIST),
        ("EINVAL", Errno::EINVAL),
        ("ENOSYS", Errno::ENOSYS),
        ("EOPNOTSUPP", Errno::EOPNOTSUPP),
    ] {
        abi.constant(&format!("Errno::{name}"), name, errno.0);
    }

    abi.layout::<VpteT>("VpteT", "vpte_t");
    abi.line(
        "typeof(vpte_t)".to_owned(),
        <VpteT as CInt>::C_TYPE.to_owned(),
    );

    fields!(abi, VkInfo as "vk_info":
        abi_version, page_size, ram_fd, vpte_levels, ram_size, user_max, reserved,
    );
    fields!(abi, TrapFrame as "trapframe":
        tf_rdi, tf_rsi, tf_rdx, tf_rcx, tf_r8, tf_r9, tf_rax, tf_rbx, tf_rbp, tf_r10, tf_r11,
        tf_r12, tf_r13, tf_r14, tf_r15, tf_xflags, tf_trapno, tf_addr, tf_flags, tf_err, tf_rip,
        tf_cs, tf_rflags, tf_rsp, tf_ss,
    );
    fields!(abi, TlsInfo as "tls_info": base, size);
    fields!(abi, VextFrame as "vextframe": vx_tls);

    abi.rust_items
        .insert("fn vmspace_mmap_prot_flags".to_owned());
    for (prot, flags) in packed_prot_flags() {
        abi.line(
            format!("vk_vmspace_mmap_prot_flags({prot},{flags})"),
            vkabi::vmspace_mmap_prot_flags(prot, flags).to_string(),
        );
    }
    abi
}

/// The public items the crate's source defines, by the names
/// [`Abi::rust_items`] uses: top-level `pub const`, `pub type`, `pub struct`
/// and their `pub` fields, top-level `pub fn`s, and the `Errno` constants.
fn rust_items_in_source() -> BTreeSet<String> {
    fn ident(s: &str) -> &str {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        &s[..end]
    }

    let mut items = BTreeSet::new();
    let mut in_struct: Option<&str> = None;
    for line in include_str!("../src/lib.rs").lines() {
        if let Some(s) = in_struct {
            if line == "}" {
                in_struct = None;
            } else if let Some(rest) = line.trim_start().strip_prefix("pub ") {
                items.insert(format!("{s}.{}", ident(rest)));
            }
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("pub const fn ")
            .or_else(|| line.strip_prefix("pub fn "))
        {
            items.insert(format!("fn {}", ident(rest)));
        } else if let Some(rest) = line
            .strip_prefix("pub const ")
            .or_else(|| line.strip_prefix("pub type "))
        {
            items.insert(ident(rest).to_owned());
        } else if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = ident(rest);
            items.insert(name.to_owned());
            if rest.trim_end().ends_with('{') {
                in_struct = Some(name);
            }
        }
    }
    for line in include_str!("../src/hypercall.rs").lines() {
        if let Some(rest) = line.trim_start().strip_prefix("pub const ")
            && rest.contains(": Errno")
        {
            items.insert(format!("Errno::{}", ident(rest)));
        }
    }
    for line in include_str!("../src/fastrun.rs").lines() {
        if let Some(rest) = line.strip_prefix("pub const ") {
            items.insert(format!("fastrun::{}", ident(rest)));
        }
    }
    for h in Hypercall::ALL {
        items.insert(format!("Hypercall::{h:?}"));
    }
    items
}

/// The object-like and function-like macros vkernel.h defines, except its
/// include guard and its internal `VK__*` helpers.
fn header_macros() -> BTreeSet<String> {
    let path = include_dir().join("vkernel.h");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|line| {
            let directive = line.trim_start().strip_prefix('#')?.trim_start();
            let rest = directive.strip_prefix("define")?.trim_start();
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            Some(rest[..end].to_owned())
        })
        .filter(|name| name != "VKERNEL_H" && !name.starts_with("VK__"))
        .collect()
}

/// Differences between the expected lines and the C program's output: a
/// name missing on either side, a duplicate, or a different value.
fn compare(expected: &BTreeMap<String, String>, dump: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut got = BTreeMap::new();
    for line in dump.lines() {
        let Some((key, value)) = line.split_once(' ') else {
            errors.push(format!("malformed line from the C program: {line:?}"));
            continue;
        };
        if got.insert(key, value).is_some() {
            errors.push(format!("{key}: printed twice by the C program"));
        }
    }
    for (key, want) in expected {
        match got.get(key.as_str()) {
            None => errors.push(format!(
                "{key}: missing on the C side (vkernel.h / abi_dump.c); vkabi says {want}"
            )),
            Some(have) if have != want => {
                let hex = match (have.parse::<u64>(), want.parse::<u64>()) {
                    (Ok(h), Ok(w)) => format!(" ({h:#x} vs {w:#x})"),
                    _ => String::new(),
                };
                errors.push(format!("{key}: C says {have}, vkabi says {want}{hex}"));
            }
            Some(_) => {}
        }
    }
    for key in got.keys() {
        if !expected.contains_key(*key) {
            errors.push(format!(
                "{key}: printed by the C program but missing on the Rust side (the vkabi table in tests/c_header.rs)"
            ));
        }
    }
    errors
}

fn assert_no_errors(what: &str, errors: &[String]) {
    assert!(
        errors.is_empty(),
        "{what}: {} difference(s):\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
}

// ---- Tests: the table ------------------------------------------------------

#[test]
fn the_table_covers_every_public_item_of_vkabi() {
    let table = vkabi_table().rust_items;
    let source = rust_items_in_source();
    let unchecked: Vec<_> = source.difference(&table).collect();
    let unknown: Vec<_> = table.difference(&source).collect();
    assert!(
        unchecked.is_empty() && unknown.is_empty(),
        "vkabi items the C conformance table does not check: {unchecked:?}; \
         table items not found in vkabi's source: {unknown:?}. Add new items to \
         vkernel.h, guest-samples/c/abi_dump.c and vkabi_table()."
    );
}

#[test]
fn the_table_covers_every_macro_of_the_header() {
    let abi = vkabi_table();
    let macros = header_macros();
    assert!(
        macros.len() > 50,
        "found only {} #defines in vkernel.h; is the parser broken?",
        macros.len()
    );
    let unchecked: Vec<_> = macros.difference(&abi.c_constants).collect();
    assert!(
        unchecked.is_empty(),
        "vkernel.h defines {unchecked:?}, which vkabi does not define or the table does not \
         check: mirror vkabi (the single definition of the ABI), or name internal helpers VK__*"
    );
}

#[test]
fn the_comparison_reports_every_kind_of_difference() {
    let expected: BTreeMap<String, String> = [("A", "1"), ("B", "2"), ("C", "3")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_no_errors("identical", &compare(&expected, "C 3\nA 1\nB 2\n"));

    let errors = compare(&expected, "A 1\nB 5\nD 4\nA 1\nnonsense\n");
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    assert!(has("C: missing on the C side"), "{errors:?}");
    assert!(has("B: C says 5, vkabi says 2 (0x5 vs 0x2)"), "{errors:?}");
    assert!(
        has("D: printed by the C program but missing on the Rust side"),
        "{errors:?}"
    );
    assert!(has("A: printed twice"), "{errors:?}");
    assert!(has("malformed line"), "{errors:?}");
    assert_eq!(errors.len(), 5, "{errors:?}");
}

// ---- Tests: the header against the crate -----------------------------------

#[test]
fn c_header_matches_vkabi() {
    const TEST: &str = "c_header_matches_vkabi";
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("abi_dump");
    gcc.build(STRICT, &c_dir().join("abi_dump.c"), &bin);
    let output = run(&bin, &[]);
    assert!(output.status.success(), "abi_dump: {}", stderr(&output));

    let abi = vkabi_table();
    assert_no_errors(
        "vkernel.h against vkabi",
        &compare(&abi.lines, &stdout(&output)),
    );
}

/// Every C program here, with every standard and compiler available: the
/// header must build without a warning under all of them.
#[test]
fn c_header_builds_cleanly_in_every_mode() {
    const TEST: &str = "c_header_builds_cleanly_in_every_mode";
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let mut builds: Vec<(Compiler, Vec<&str>, &str)> = Vec::new();
    for std in ["-std=c99", "-std=c11", "-std=c17", "-std=gnu17"] {
        for opt in ["-O0", "-O2"] {
            builds.push((gcc, strict_with(&[std, opt]), "no_supervisor.c"));
        }
    }
    for source in C_PROGRAMS {
        builds.push((gcc, STRICT.to_vec(), source));
    }
    if let Some(musl) = Compiler::optional(TEST, "musl-gcc") {
        // musl-gcc sees no Linux UAPI headers, which the seccomp fakes need.
        for source in ["abi_dump.c", "no_supervisor.c", "vkinfo.c"] {
            builds.push((musl, STRICT.to_vec(), source));
        }
    }
    if let Some(gxx) = Compiler::optional(TEST, "g++") {
        for std in ["-std=c++11", "-std=c++17"] {
            let mut flags = CXX.to_vec();
            flags.push(std);
            builds.push((gxx, flags, "no_supervisor.c"));
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    for (n, (cc, flags, source)) in builds.into_iter().enumerate() {
        cc.build(
            &flags,
            &c_dir().join(source),
            &dir.path().join(format!("bin{n}")),
        );
    }
}

/// Every C program in guest-samples/c.
const C_PROGRAMS: [&str; 5] = [
    "abi_dump.c",
    "no_supervisor.c",
    "hypercall_regs.c",
    "vkinfo.c",
    "fake_supervisor_vkinfo.c",
];

/// Flags for building a C program as C++ (add a `-std=`).
const CXX: &[&str] = &[
    "-x",
    "c++",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-Wconversion",
    "-Wsign-conversion",
];

/// [`STRICT`] with `-std` and `-O` replaced by `overrides`.
fn strict_with<'a>(overrides: &[&'a str]) -> Vec<&'a str> {
    STRICT
        .iter()
        .copied()
        .filter(|f| !f.starts_with("-std=") && !f.starts_with("-O"))
        .chain(overrides.iter().copied())
        .collect()
}

// ---- Tests: the wrappers ----------------------------------------------------

/// What no_supervisor.c must print: every wrapper fails with ENOSYS, every
/// raw hypercall returns -ENOSYS, and vk_info leaves its buffer alone.
fn no_supervisor_expected() -> String {
    let enosys = Errno::ENOSYS.0;
    let mut out = String::new();
    for h in Hypercall::ALL {
        out += &format!("call {} ret=-1 errno={enosys}\n", h.name());
    }
    for h in Hypercall::ALL {
        out += &format!("raw {} -{enosys}\n", h.name());
    }
    out + "vk_info_untouched 1\n"
}

#[test]
fn wrappers_without_a_supervisor_fail_with_enosys() {
    const TEST: &str = "wrappers_without_a_supervisor_fail_with_enosys";
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut compilers = vec![("gcc", gcc, STRICT.to_vec())];
    if let Some(musl) = Compiler::optional(TEST, "musl-gcc") {
        compilers.push(("musl-gcc", musl, STRICT.to_vec()));
    }
    if let Some(gxx) = Compiler::optional(TEST, "g++") {
        let mut flags = CXX.to_vec();
        flags.push("-std=c++11");
        compilers.push(("g++", gxx, flags));
    }
    for (name, cc, flags) in compilers {
        let bin = dir.path().join(format!("no_supervisor-{name}"));
        cc.build(&flags, &c_dir().join("no_supervisor.c"), &bin);
        let output = run(&bin, &[]);
        assert!(
            output.status.success(),
            "no_supervisor ({name}): {}",
            stderr(&output)
        );
        assert_eq!(
            stdout(&output),
            no_supervisor_expected(),
            "no_supervisor built with {name}"
        );
    }
}

/// How a wrapper turns the raw result into its return value.
#[derive(Debug, Clone, Copy)]
enum Returns {
    /// `int`: -1 on failure, else the raw value truncated to 32 bits.
    Int,
    /// `ssize_t` or a pointer (MAP_FAILED is -1): -1 on failure, else the
    /// raw value.
    Long,
}

/// One call hypercall_regs.c makes and the registers it must load.
#[derive(Debug)]
struct Call {
    hypercall: Hypercall,
    args: [u64; 6],
    returns: Returns,
}

/// The calls hypercall_regs.c makes, in its order, with the registers the
/// ABI prescribes for its arguments. Ints are sign-extended, as the Rust
/// wrappers in `vkabi::hypercall` do (`x as u64`).
fn expected_calls() -> Vec<Call> {
    use Hypercall::*;
    use Returns::{Int, Long};
    use vkabi::*;

    let id = 0x1d00;
    let int = |i: i32| i64::from(i) as u64;
    let call = |hypercall, args, returns| Call {
        hypercall,
        args,
        returns,
    };
    vec![
        call(
            VkInfo,
            [0x1000, size_of::<vkabi::VkInfo>() as u64, 0, 0, 0, 0],
            Int,
        ),
        call(
            VkMmap,
            [
                0x20_0000,
                0x3000,
                int(PROT_READ | PROT_WRITE),
                int(MAP_SHARED | MAP_VPAGETABLE),
                7,
                0x80_0000_0000,
            ],
            Long,
        ),
        call(
            VkMmap,
            [
                0,
                0x1000,
                int(PROT_READ),
                int(MAP_PRIVATE | MAP_ANONYMOUS),
                int(-1),
                0,
            ],
            Long,
        ),
        call(
            Mcontrol,
            [0x7000, 0x2000, int(MADV_SETMAP), 0x12_3007, 0, 0],
            Int,
        ),
        call(VmspaceCreate, [id, int(-2), 0xda7a, 0, 0, 0], Int),
        call(VmspaceDestroy, [id, 0, 0, 0, 0, 0], Int),
        call(
            VmspaceCtl,
            [id, int(VMSPACE_CTL_RUN), 0x7f00, 0x7e00, 0, 0],
            Int,
        ),
        call(
            VmspaceMmap,
            [
                id,
                0x40_0000,
                0x5000,
                vmspace_mmap_prot_flags(PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE),
                7,
                0x80_0000_0000,
            ],
            Long,
        ),
        call(
            VmspaceMmap,
            [
                id,
                0,
                0x1000,
                vmspace_mmap_prot_flags(
                    PROT_READ | PROT_EXEC,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                ),
                int(-1),
                0,
            ],
            Long,
        ),
        call(VmspaceMunmap, [id, 0x40_0000, 0x5000, 0, 0, 0], Int),
        call(
            VmspaceMcontrol,
            [id, 0x40_0000, 0x5000, int(MADV_INVAL), 0, 0],
            Int,
        ),
        call(VmspacePread, [id, 0xb000, 100, 0, 0x40_0123, 0], Long),
        call(VmspacePwrite, [id, 0xc000, 200, 0, 0x40_1234, 0], Long),
    ]
}

/// The line hypercall_regs.c must print for `call` when the fake supervisor
/// answers `raw`.
fn expected_regs_line(call: &Call, raw: i64) -> String {
    let failed = (-4095..0).contains(&raw);
    let (ret, errno) = match (failed, call.returns) {
        (true, _) => (-1, -raw),
        (false, Returns::Int) => (i64::from(raw as i32), 0),
        (false, Returns::Long) => (raw, 0),
    };
    let args: Vec<String> = call.args.iter().map(|a| format!("{a:#x}")).collect();
    format!(
        "call {} nr={:#x} args={} ret={ret} errno={errno} traps=1",
        call.hypercall.name(),
        call.hypercall.nr(),
        args.join(",")
    )
}

#[test]
fn wrappers_load_the_registers_vkabi_prescribes() {
    const TEST: &str = "wrappers_load_the_registers_vkabi_prescribes";
    let calls = expected_calls();
    for h in Hypercall::ALL {
        assert!(
            calls.iter().any(|c| c.hypercall == h),
            "{}: no call in expected_calls() / hypercall_regs.c",
            h.name()
        );
    }
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("hypercall_regs");
    gcc.build(STRICT, &c_dir().join("hypercall_regs.c"), &bin);

    // Success values, errors at both ends of the errno range, the first
    // value that is not an error, and a user address.
    for raw in [0i64, 3, -1, -2, -38, -4095, -4096, 0x7f12_3456_7000] {
        let output = run(&bin, &[&raw.to_string()]);
        if output.status.code() == Some(EXIT_UNSUPPORTED) {
            skip(TEST, stderr(&output).trim());
            return;
        }
        assert!(
            output.status.success(),
            "hypercall_regs {raw}: {}",
            stderr(&output)
        );
        let got = stdout(&output);
        let got: Vec<&str> = got.lines().collect();
        let want: Vec<String> = calls.iter().map(|c| expected_regs_line(c, raw)).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "hypercall_regs {raw}: wrong number of calls:\n{}",
            got.join("\n")
        );
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, w, "hypercall_regs with raw result {raw}");
        }
    }
}

// ---- Tests: vkinfo.c -------------------------------------------------------

#[test]
fn vkinfo_c_without_a_supervisor_reports_enosys() {
    const TEST: &str = "vkinfo_c_without_a_supervisor_reports_enosys";
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("vkinfo");
    // The build line its header comment documents.
    gcc.build(
        &["-O2", "-Wall", "-Wextra", "-Werror"],
        &c_dir().join("vkinfo.c"),
        &bin,
    );
    let output = run(&bin, &[]);
    assert_eq!(output.status.code(), Some(1), "vkinfo exit status");
    assert_eq!(stdout(&output), "", "vkinfo stdout");
    assert_eq!(
        stderr(&output),
        "vk_info: Function not implemented\n",
        "vkinfo stderr"
    );
}

#[test]
fn vkinfo_c_prints_vk_info_and_checks_the_ram_alias() {
    const TEST: &str = "vkinfo_c_prints_vk_info_and_checks_the_ram_alias";
    // The descriptor fake_supervisor_vkinfo.c puts the RAM memfd at.
    const FAKE_RAM_FD: i32 = 100;
    let Some(gcc) = Compiler::gcc(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("fake_supervisor_vkinfo");
    gcc.build(STRICT, &c_dir().join("fake_supervisor_vkinfo.c"), &bin);

    let page = vkabi::PAGE_SIZE;
    // One page, a few pages, and more than the 64 MiB vkinfo maps.
    for ram_size in [page, 3 * page, 128 << 20] {
        let output = run(&bin, &[&ram_size.to_string()]);
        if output.status.code() == Some(EXIT_UNSUPPORTED) {
            skip(TEST, stderr(&output).trim());
            return;
        }
        assert!(
            output.status.success(),
            "vkinfo with {ram_size} bytes of RAM: {}",
            stderr(&output)
        );
        let want = format!(
            "abi_version: {}\npage_size: {}\nram_fd: {FAKE_RAM_FD}\nvpte_levels: {}\n\
             ram_size: {ram_size}\nuser_max: {:#x}\npattern: ok\n",
            vkabi::VK_ABI_VERSION,
            vkabi::PAGE_SIZE,
            vkabi::VPTE_LEVELS,
            vkabi::USER_MAX,
        );
        assert_eq!(stdout(&output), want, "vkinfo with {ram_size} bytes of RAM");
    }

    // RAM that misbehaves: exit status 2 and a `pattern:` message, as the
    // Rust vkinfo.
    for (args, message) in [
        (&["100"][..], "pattern: ram_size 100 is less than a page\n"),
        (&["12288", "unsealed"][..], "pattern: RAM could be grown\n"),
    ] {
        let output = run(&bin, args);
        assert_eq!(output.status.code(), Some(2), "vkinfo with RAM {args:?}");
        assert_eq!(stderr(&output), message, "vkinfo with RAM {args:?}");
    }
}
