//! Helpers for vkrun's end-to-end tests: finding the built binaries, running
//! commands with a deadline, comparing a guest under vkrun with a native run,
//! and skipping loudly (failing in CI) when the machine lacks a tool.
//!
//! The binaries come from the same target directory as the test executable;
//! build them first with `cargo build --workspace` (the README's test command
//! does).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod uml;

/// How long any single command may run before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The directory holding the workspace's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VKRUN_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A `vkrun` command.
pub fn vkrun() -> Command {
    Command::new(bin("vkrun"))
}

/// Whether tests run in CI, where a skip is a failure (README, "Run the tests").
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skip the calling test loudly; in CI, fail instead.
pub fn skip(why: &str) {
    assert!(!in_ci(), "required capability missing in CI: {why}");
    // Straight to the process's stderr, in one write: libtest hides
    // `eprintln!` output of passing tests, and a skip must be seen.
    let line = format!("\n*** SKIP: {why} ***\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// Find `tool` in PATH, or skip (fail in CI) and return None.
pub fn require(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(&format!("{tool} is not installed"));
    }
    found
}

/// Run `cmd` to completion with captured output, failing the test after
/// [`DEADLINE`] (the process is killed, so no test hangs).
pub fn run(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    wait_output(child, DEADLINE)
}

/// Collect a spawned child's output, killing it after `deadline`.
pub fn wait_output(mut child: Child, deadline: Duration) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(out.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_t = reader(err.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = wait_deadline(&mut child, deadline);
    Output {
        status,
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

/// Wait for `child`, killing it and failing the test after `deadline`.
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("command did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Text of a byte buffer.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code a shell would report: the code, or 128 + signal.
pub fn shell_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .expect("exited or signaled")
}

/// Run `program args` natively and under `vkrun -q`, and assert that stdout
/// and the exit code are identical. Returns the vkrun run's output.
pub fn assert_transparent<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let native = run(Command::new(program).args(args));
    let under = run(vkrun().arg("-q").arg("--").arg(program).args(args));
    assert_eq!(
        text(&under.stdout),
        text(&native.stdout),
        "stdout differs for {program}; vkrun stderr: {}",
        text(&under.stderr)
    );
    assert_eq!(
        shell_code(under.status),
        shell_code(native.status),
        "exit status differs for {program}; vkrun stderr: {}",
        text(&under.stderr)
    );
    under
}

/// Compile a C file with gcc (with the guest ABI header on the include
/// path) into `dir`; None (after a skip) if gcc is missing.
pub fn compile_c(source: &Path, dir: &Path, extra: &[&str]) -> Option<PathBuf> {
    let gcc = require("gcc")?;
    let out = dir.join(source.file_stem().expect("file name"));
    let include = workspace_root().join("guest-samples/include");
    let result = run(Command::new(gcc)
        .arg("-O2")
        .arg("-Wall")
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&out)
        .arg(source)
        .args(extra));
    assert!(
        result.status.success(),
        "gcc {} failed: {}",
        source.display(),
        text(&result.stderr)
    );
    Some(out)
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// Wait until `cond` holds, up to `limit`; returns whether it did.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Assert that `under` (a run inside vkrun) printed what `native` did and
/// ended with the same status, naming `program args` and the inside run's
/// stderr when not.
pub fn assert_same_output(program: &Path, args: &[&str], under: &Output, native: &Output) {
    assert_eq!(
        text(&under.stdout),
        text(&native.stdout),
        "stdout differs for {} {args:?}; stderr inside: {}",
        program.display(),
        text(&under.stderr)
    );
    assert_eq!(
        shell_code(under.status),
        shell_code(native.status),
        "exit status differs for {} {args:?}; stderr inside: {}",
        program.display(),
        text(&under.stderr)
    );
}

/// Every counter `vkrun --stats -v` lists, in its order (without `-v`, the
/// ones that stayed zero are left out).
pub fn counter_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "vm.vpagetable_mmap",
        "vm.vpagetable_setmap",
        "vm.vpagetable_inval",
        "vm.vpagetable_faults",
        "vkrun.hypercalls",
        "vkrun.hypercall_errors",
    ]
    .map(String::from)
    .into();
    names.extend(
        vkabi::Hypercall::ALL
            .iter()
            .map(|h| format!("vkrun.hypercalls.{}", h.name())),
    );
    names.extend(
        [
            "vkrun.hypercalls.unknown",
            "vkrun.vmspaces_created",
            "vkrun.vmspaces_destroyed",
            "vkrun.runs",
            "vkrun.run_exits.syscall",
            "vkrun.run_exits.pagefault",
            "vkrun.run_exits.trap",
            "vkrun.run_exits.signal",
            "vkrun.host_mappings_installed",
            "vkrun.host_mappings_evicted",
            "vkrun.host_vmas",
            "vkrun.host_vmas_peak",
        ]
        .map(String::from),
    );
    names
}

/// The value of counter `name` in `--stats` output: 0 when its line is
/// absent (a counter that stayed zero). `name` must be one of
/// [`counter_names`], so a misspelt name fails instead of reading 0.
pub fn counter(stats: &str, name: &str) -> u64 {
    assert!(
        counter_names().iter().any(|n| n == name),
        "{name} is no vkrun counter"
    );
    let prefix = format!("{name}: ");
    match stats.lines().find_map(|l| l.strip_prefix(&prefix)) {
        Some(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("counter {name}: {v:?} is no number")),
        None => 0,
    }
}
