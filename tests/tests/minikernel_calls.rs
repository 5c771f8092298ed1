//! The minikernel's smaller system calls and sockets (issue 18, part 2),
//! end to end: `tests/programs/calls.c` (mremap growth, move, shrink and
//! `MREMAP_FIXED`; creat, mknod, mknodat; select, pselect6, poll, ppoll and
//! epoll on pipes and sockets; an AF_UNIX socketpair passing a descriptor
//! with `SCM_RIGHTS`; a loopback TCP echo; `/proc/self/exe` and
//! `/proc/self/cmdline`; a fork/exec chain through `/proc/self/exe`) built
//! with `gcc -static`, `musl-gcc -static` and dynamically linked, then
//! busybox applets on fixed input and `sash` scripts: each run natively
//! and under `vkrun -- minikernel` must print the same stdout and end with
//! the same status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vkrun_tests::{assert_same_output, bin, require, run, shell_code, text, vkrun, workspace_root};

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
    assert_same_output(program, args, &under, &native);
    under
}

/// Build `tests/programs/<name>.c` with `compiler` and `flags` into `dir`,
/// or `None` after a skip.
fn build(compiler: &str, dir: &Path, name: &str, flags: &[&str]) -> Option<PathBuf> {
    let cc = require(compiler)?;
    let src = workspace_root().join(format!("tests/programs/{name}.c"));
    let out = dir.join(format!("{name}-{compiler}{}", flags.join("")));
    let r = run(Command::new(cc)
        .args(["-O1", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .args(flags));
    assert!(
        r.status.success(),
        "{compiler} {name}.c failed: {}",
        text(&r.stderr)
    );
    Some(out)
}

/// `calls DIR` natively and inside (each with a fresh DIR): every check
/// passes in both, and the outputs are the same.
fn calls_match(prog: &Path) {
    let native_dir = tempfile::tempdir().expect("tempdir");
    let inside_dir = tempfile::tempdir().expect("tempdir");
    let native = run(Command::new(prog).arg(native_dir.path()));
    let under = inside(prog, &[inside_dir.path().to_str().expect("utf-8 path")]);
    let (n, u) = (text(&native.stdout), text(&under.stdout));
    assert!(
        !n.contains("FAILED") && native.status.success(),
        "natively: {n}"
    );
    assert_eq!(u, n, "stderr inside: {}", text(&under.stderr));
    assert_eq!(shell_code(under.status), 0, "{}", text(&under.stderr));
    for want in [
        "mremap MAYMOVE moves the contents            ok",
        "child read: through the socket",
        "the echo comes back upper-cased              ok",
        "/proc/self/cmdline holds argv                ok",
    ] {
        assert!(u.contains(want), "{want:?} missing from {u}");
    }
    // A fork/exec chain: each level execs /proc/self/exe and adds 1 to
    // its child's status.
    let under = same(prog, &["x", "chain", "4"]);
    assert_eq!(
        text(&under.stdout),
        "chain 4\nchain 3\nchain 2\nchain 1\nchain 0\n"
    );
    assert_eq!(shell_code(under.status), 11);
}

#[test]
fn small_calls_and_sockets_behave_as_natively_glibc_static() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("gcc", dir.path(), "calls", &["-static"]) else {
        return;
    };
    calls_match(&prog);
}

#[test]
fn small_calls_and_sockets_behave_as_natively_musl_static() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("musl-gcc", dir.path(), "calls", &["-static"]) else {
        return;
    };
    calls_match(&prog);
}

#[test]
fn small_calls_and_sockets_behave_as_natively_glibc_dynamic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("gcc", dir.path(), "calls", &[]) else {
        return;
    };
    calls_match(&prog);
}

#[test]
fn busybox_applets_on_fixed_input_behave_as_natively() {
    let Some(bb) = require("busybox") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let words = dir.path().join("words");
    let body: String = (0..400)
        .map(|i| format!("w{} {} line{}\n", (i * 37) % 101, i % 7, i))
        .collect();
    std::fs::write(&words, body).expect("write words");
    let w = words.to_str().expect("utf-8 path");
    let d = dir.path().to_str().expect("utf-8 path");
    for args in [
        &["tr", "a-z", "A-Z"][..],
        &["cut", "-d", " ", "-f", "2", w],
        &["sort", "-k2,2n", "-k1,1", w],
        &["uniq", "-c", w],
        &["rev", w],
        &["tac", w],
        &["nl", w],
        &["fold", "-w", "7", w],
        &["od", "-c", w],
        &["md5sum", w],
        &["sha1sum", w],
        &["sha512sum", w],
        &["base64", w],
        &["grep", "-c", "w1", w],
        &["grep", "-n", "line3[0-9]$", w],
        &["sed", "-n", "s/w\\([0-9]*\\) 3/\\1/p", w],
        &["awk", "{ s += $2 } END { print s, NR }", w],
        &["seq", "-s", ",", "1", "3", "40"],
        &["wc", w],
        &["tail", "-n", "5", w],
        &["printf", "%05d|%s|%x\\n", "42", "str", "255"],
        &["basename", "/a/b/c.txt", ".txt"],
        &["dirname", "/a/b/c.txt"],
        &["find", d, "-name", "words"],
        &["stat", "-c", "%s %F", w],
        &["test", "-f", w],
        &["test", "-d", w],
    ] {
        same(&bb, args);
    }
    // `tr` reads stdin: give it the file.
    let native = run(Command::new(&bb).args(["sh", "-c", &format!("tr a-z A-Z < {w} | head -3")]));
    let under = inside(&bb, &["sh", "-c", &format!("tr a-z A-Z < {w} | head -3")]);
    assert_same_output(&bb, &["sh", "-c", "tr"], &under, &native);
    assert_eq!(
        text(&under.stdout),
        "W0 0 LINE0\nW37 1 LINE1\nW74 2 LINE2\n"
    );
}

#[test]
fn sash_scripts_behave_as_natively() {
    let Some(sash) = require("sash") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let script = dir.path().join("script.sash");
    std::fs::write(
        &script,
        format!(
            "echo start\n-mkdir {d}/made\n-echo built-in echo\n-ls {d}\n\
             -cp {s} {d}/made/copy\n-cmp {s} {d}/made/copy\n-rm {d}/made/copy\n\
             ls {d}/made\necho child status follows\nsh -c 'exit 4'\nexit 3\n",
            s = script.display()
        ),
    )
    .expect("write script");
    let under = same(&sash, &["-f", script.to_str().expect("utf-8 path")]);
    let out = text(&under.stdout);
    // Built-ins write through stdio (flushed at exit), external commands
    // straight away: the order is sash's, the same natively.
    for want in [
        "start\n",
        "built-in echo\n",
        "Files are identical\n",
        "script.sash\n",
    ] {
        assert!(out.contains(want), "{want:?} missing from {out}");
    }
    assert_eq!(shell_code(under.status), 3);
}

/// `cow.c` natively and inside: every check passes in both. Inside, the
/// counters show that fork shared the pages (copies on write, pages taken
/// over by their last user) and that children reuse idle vmspaces.
fn cow_matches(prog: &Path) {
    let under = same(prog, &[]);
    let out = text(&under.stdout);
    assert!(!out.contains("FAILED"), "{out}");
    assert!(
        out.contains("20 children wrote everything: 0 failed"),
        "{out}"
    );
    let counted = run(vkrun()
        .args(["--stats", "-q", "-m", "512M", "--"])
        .arg(bin("minikernel"))
        .arg(prog)
        .env("MINIKERNEL_STATS", "1"));
    let err = text(&counted.stderr);
    let number_before = |line: &str, what: &str| -> u64 {
        line.split(", ")
            .find_map(|part| part.trim().strip_suffix(what)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(" forks (")).collect();
    let copies: u64 = lines.iter().map(|l| number_before(l, "cow copies")).sum();
    let reuses: u64 = lines.iter().map(|l| number_before(l, "cow reuses")).sum();
    assert!(copies > 20 * 300, "copies {copies}: {err}");
    assert!(reuses > 0, "reuses {reuses}: {err}");
    let created = err
        .lines()
        .find_map(|l| l.strip_prefix("vkrun.vmspaces_created: "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("vkrun --stats counts vmspaces");
    // 26 processes; the sequential ones take their predecessor's vmspace.
    assert!(created <= 6, "{created} vmspaces created: {err}");
}

#[test]
fn fork_copies_on_write_as_natively_glibc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("gcc", dir.path(), "cow", &["-static"]) else {
        return;
    };
    cow_matches(&prog);
}

#[test]
fn fork_copies_on_write_as_natively_musl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build("musl-gcc", dir.path(), "cow", &["-static"]) else {
        return;
    };
    cow_matches(&prog);
}
