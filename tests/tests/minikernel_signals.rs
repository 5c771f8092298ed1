//! The minikernel's signals, futex and shells end to end: C programs built
//! here with `gcc -static` and `musl-gcc -static`, and `bash-static` and
//! `zsh-static` scripts, each run natively and under
//! `vkrun -- minikernel`, must print the same stdout and end with the same
//! status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vkrun_tests::{bin, require, run, shell_code, skip, text, vkrun, workspace_root};

/// Run `program args` under vkrun and the minikernel.
fn inside(program: &Path, args: &[&str]) -> Output {
    run(vkrun()
        .args(["-q", "-m", "512M", "--"])
        .arg(bin("minikernel"))
        .arg(program)
        .args(args))
}

/// Run `program args` natively and inside; assert equal stdout and status.
fn same(program: &Path, args: &[&str]) -> Output {
    let native = run(Command::new(program).args(args));
    let under = inside(program, args);
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
    under
}

/// Build `tests/programs/<name>.c` with `compiler -static` into `dir`, or
/// `None` after a skip.
fn build(compiler: &str, dir: &Path, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let cc = require(compiler)?;
    let src = workspace_root().join(format!("tests/programs/{name}.c"));
    let out = dir.join(format!("{name}-{compiler}"));
    let r = run(Command::new(cc)
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra));
    assert!(
        r.status.success(),
        "{compiler} {name}.c failed: {}",
        text(&r.stderr)
    );
    Some(out)
}

#[test]
fn signal_handlers_of_every_kind_run_as_natively_glibc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("gcc", dir.path(), "signals", &["-pthread"]) else {
        return;
    };
    let under = same(&prog, &[]);
    let out = text(&under.stdout);
    assert!(out.contains("8 segv in page 0 code 2 write-fault 1 value 42"), "{out}");
    assert!(out.contains("10 chld status 7 code 1 exit 7"), "{out}");
    assert_eq!(shell_code(under.status), 128 + libc::SIGUSR2);
}

#[test]
fn signal_handlers_of_every_kind_run_as_natively_musl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("musl-gcc", dir.path(), "signals", &[]) else {
        return;
    };
    same(&prog, &[]);
}
