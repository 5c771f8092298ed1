//! The minikernel sample vkernel end to end: unmodified static x86-64 Linux
//! programs run under `vkrun -- minikernel PROGRAM ARGS...` must print the
//! same stdout and end with the same exit status as when run natively.
//! Programs: `busybox-static` applets (skipped, loudly, when busybox is not
//! installed or not static) and small C programs built here with
//! `gcc -static` and `gcc -static-pie`; `busybox sh` scripts with pipes,
//! subshells and exit codes (each command a forked minikernel process).

use std::path::{Path, PathBuf};
use std::process::Command;

use vkrun_tests::minikernel::{build_source, has_interpreter, inside, same};
use vkrun_tests::{bin, require, run, shell_code, skip, text, vkrun};

/// A static busybox, or `None` after skipping.
fn busybox() -> Option<PathBuf> {
    let path = require("busybox")?;
    if has_interpreter(&path) != Some(false) {
        skip("busybox is not statically linked (install busybox-static)");
        return None;
    }
    Some(path)
}

#[test]
fn busybox_applets_behave_as_natively() {
    let Some(bb) = busybox() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let numbers = dir.path().join("numbers");
    let body: String = (0..500)
        .map(|i| format!("{}\n", (i * 7919) % 1000))
        .collect();
    std::fs::write(&numbers, body).expect("write numbers");
    std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
    std::fs::write(dir.path().join("a/b/c"), "c\n").expect("write c");
    let n = numbers.to_str().expect("utf-8 path");
    let d = dir.path().to_str().expect("utf-8 path");
    for args in [
        &["echo", "hello", "world"][..],
        &["cat", n],
        &["wc", "-l", n],
        &["sha256sum", n],
        &["sort", "-n", n],
        &["expr", "2", "+", "3"],
        &["expr", "2", "+", "x"],
        &["false"],
        &["true"],
        &["ls", "-R", d],
        &["head", "-3", n],
        &["cat", "/nonexistent"],
    ] {
        same(&bb, args);
    }
}

#[test]
fn busybox_sh_forks_execs_waits_and_pipes_as_natively() {
    let Some(bb) = busybox() else { return };
    for script in [
        "seq 1 200 | sort -rn | head -3",
        "for i in 1 2 3; do echo line $i; done | wc -l",
        "false; echo $?; (exit 5); echo $?; x=$(echo sub); echo $x",
        "i=0; while [ $i -lt 5 ]; do i=$((i+1)); busybox echo $i; done",
        "busybox sh -c 'exit 4'; echo inner $?; exit 6",
        "yes | head -2",
    ] {
        same(&bb, &["sh", "-c", script]);
    }
}

/// The C program: malloc 16 MiB, write a file, read it back, printf, exit 3.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    size_t n = 16 << 20;
    unsigned char *p = malloc(n);
    if (!p || argc < 2) return 2;
    memset(p, 0xab, n);
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 4096) sum += p[i];
    FILE *f = fopen(argv[1], "w");
    if (!f) { perror("fopen"); return 2; }
    fprintf(f, "sum %lu\n", sum);
    fclose(f);
    char line[64] = {0};
    f = fopen(argv[1], "r");
    if (!f || !fgets(line, sizeof line, f)) return 2;
    fclose(f);
    printf("%d args, read back: %s", argc, line);
    free(p);
    return 3;
}
"#;

/// A program that dies of a segmentation fault after printing a line.
const SEGV: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) {
    printf("before\n");
    fflush(stdout);
    if (argc > 1) { char *s = (char *)"read-only"; s[0] = 'x'; return s[0]; }
    return *(volatile int *)8;
}
"#;

#[test]
fn static_c_programs_behave_as_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, flags) in [("prog", "-static"), ("prog_pie", "-static-pie")] {
        let Some(prog) = build_source(dir.path(), name, PROGRAM, &[flags]) else {
            return;
        };
        let out = dir.path().join(format!("{name}.out"));
        let out = out.to_str().expect("utf-8 path");
        let under = same(&prog, &[out]);
        assert_eq!(text(&under.stdout), "2 args, read back: sum 700416\n");
        assert_eq!(shell_code(under.status), 3);
        assert_eq!(
            std::fs::read_to_string(out).expect("the file it wrote"),
            "sum 700416\n"
        );
    }
}

#[test]
fn a_segfault_ends_with_status_139_and_no_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build_source(dir.path(), "segv", SEGV, &["-static"]) else {
        return;
    };
    for args in [&[][..], &["write-read-only"]] {
        let under = same(&prog, args);
        assert_eq!(shell_code(under.status), 139);
        assert_eq!(text(&under.stderr), "", "nothing extra on stderr");
    }
    // A child process killed by SIGSEGV: its parent (a shell) sees the signal.
    if let Some(bb) = busybox() {
        let script = format!("{} ; echo status $?", prog.display());
        let under = same(&bb, &["sh", "-c", &script]);
        assert_eq!(text(&under.stdout), "before\nstatus 139\n");
    }
}

#[test]
fn a_program_that_cannot_be_loaded_is_status_127() {
    let under = inside(Path::new("/nonexistent/program"), &[]);
    assert_eq!(shell_code(under.status), 127);
    assert!(
        text(&under.stderr).contains("/nonexistent/program"),
        "{}",
        text(&under.stderr)
    );
}

/// The bundled demo program (README's first command): a freestanding static
/// executable cargo builds, no compiler needed. Inside the minikernel it
/// prints what it prints natively, apart from its pid and who loaded it (no
/// vDSO: the minikernel), and exits 0; its benchmark modes work too.
#[test]
fn the_bundled_hello_vmspace_runs_inside_as_natively() {
    let hello = bin("hello-vmspace");
    let args = ["one", "two words"];
    let native = run(Command::new(&hello).args(args));
    let under = run(vkrun()
        .args(["-q", "-m", "256M", "--"])
        .arg(bin("minikernel"))
        .arg(&hello)
        .args(args));
    let (native_out, under_out) = (text(&native.stdout), text(&under.stdout));
    assert_eq!(shell_code(native.status), 0, "natively: {native_out}");
    assert_eq!(
        shell_code(under.status),
        0,
        "inside: {under_out}{}",
        text(&under.stderr)
    );
    let same_lines = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| !l.starts_with("pid: ") && !l.starts_with("loaded by: "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(same_lines(&under_out), same_lines(&native_out));
    for want in [
        "hello from hello-vmspace",
        "\nuname: Linux ",
        "\nargv[1]: one\nargv[2]: two words\n",
        "\nbrk: heap grown by 1 MiB",
        "\nmmap: 8 MiB of fresh memory, 2048 pages",
        "\nbye (exit 0)\n",
    ] {
        assert!(
            under_out.contains(want),
            "{want:?} missing from {under_out}"
        );
    }
    assert!(
        native_out.contains("\nloaded by: Linux itself"),
        "{native_out}"
    );
    assert!(
        under_out.contains("\nloaded by: a kernel that maps no vDSO, e.g. the minikernel"),
        "{under_out}"
    );
    let pid_line = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("pid: "))
            .map(str::to_owned)
    };
    assert!(pid_line(&under_out).is_some(), "{under_out}");

    for (mode, arg, key) in [
        ("bench-getpid", "1000", "getpid_ns_per_call "),
        ("bench-touch", "4", "touch_ns_per_page "),
    ] {
        let out = inside(&hello, &[mode, arg]);
        let stdout = text(&out.stdout);
        let value = stdout
            .trim()
            .strip_prefix(key)
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            out.status.success() && value.is_some(),
            "{mode}: {stdout}{}",
            text(&out.stderr)
        );
    }
}

/// A system call the minikernel does not know.
const UNKNOWN_CALL: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long r = syscall(425, 0, 0); /* io_uring_setup */
    printf("%ld %s\n", r, r < 0 && errno == ENOSYS ? "ENOSYS" : "other");
    return 0;
}
"#;

#[test]
fn unknown_system_calls_answer_enosys_and_trace_lists_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build_source(dir.path(), "unknown", UNKNOWN_CALL, &["-static"]) else {
        return;
    };
    let out = run(vkrun()
        .args(["-q", "-m", "256M", "--"])
        .arg(bin("minikernel"))
        .arg("--trace")
        .arg(&prog));
    assert_eq!(text(&out.stdout), "-1 ENOSYS\n");
    assert_eq!(shell_code(out.status), 0);
    let err = text(&out.stderr);
    assert!(err.contains("unknown syscall 425 "), "{err}");
    // Without --trace nothing is listed.
    let quiet = inside(&prog, &[]);
    assert_eq!(text(&quiet.stdout), "-1 ENOSYS\n");
    assert!(!text(&quiet.stderr).contains("unknown syscall"));
    // A bad option is a usage error.
    let bad = run(vkrun()
        .args(["-q", "--"])
        .arg(bin("minikernel"))
        .arg("--bogus"));
    assert_eq!(shell_code(bad.status), 2);
}
