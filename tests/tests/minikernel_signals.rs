//! The minikernel's signals, futex and shells end to end: C programs built
//! here with `gcc -static` and `musl-gcc -static`, and `bash-static` and
//! `zsh-static` scripts, each run natively and under
//! `vkrun -- minikernel`, must print the same stdout and end with the same
//! status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vkrun_tests::{assert_same_output, bin, require, run, shell_code, text, vkrun, workspace_root};

/// Run `program args` natively and inside; assert equal stdout and status.
fn same(program: &Path, args: &[&str]) -> Output {
    same_env(program, args, &[])
}

/// [`same`] with environment variables `env` set for both runs.
fn same_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let native = run(Command::new(program).args(args).envs(env.iter().copied()));
    let under = run(vkrun()
        .args(["-q", "-m", "512M", "--"])
        .arg(bin("minikernel"))
        .arg(program)
        .args(args)
        .envs(env.iter().copied()));
    assert_same_output(program, args, &under, &native);
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
    assert!(
        out.contains("8 segv in page 0 code 2 write-fault 1 value 42"),
        "{out}"
    );
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

/// A shell script using traps, `kill`, background jobs and `wait`,
/// pipelines, `$(...)` and subshells; external commands are busybox
/// applets (`BB`), which is static.
const SCRIPT: &str = r#"
trap 'echo got USR1' USR1
kill -USR1 $$
echo after
BB sleep 0.1 & wait; echo waited $?
x=$(echo sub | BB tr a-z A-Z); echo "$x"
echo a b c | BB wc -w
BB true; echo true $?
( exit 3 ); echo sub $?
trap 'echo term' TERM; kill -TERM $$; echo alive
printf '%s\n' "h\303\251llo" | BB wc -c
BB sh -c 'kill -USR1 $PPID'; echo after child signal
(trap 'echo child got HUP; exit 4' HUP; BB sh -c 'kill -HUP $PPID'; BB sleep 1); echo sub $?
for i in 1 2 3; do BB echo $i; done | BB sort -r | BB head -2
BB sleep 5 & kill $!; wait $!; echo killed $?
trap - USR1; kill -USR1 $$; echo not reached
"#;

#[test]
fn bash_and_zsh_traps_jobs_and_pipelines_behave_as_natively_in_c_and_utf8_locales() {
    let Some(bb) = require("busybox") else { return };
    let script = SCRIPT.replace("BB", bb.to_str().expect("utf-8 path"));
    for shell in ["bash-static", "zsh-static"] {
        let Some(sh) = require(shell) else { return };
        for lang in ["C", "C.UTF-8"] {
            let under = same_env(&sh, &["-c", &script], &[("LANG", lang)]);
            let out = text(&under.stdout);
            assert!(
                out.starts_with("got USR1\nafter\nwaited 0\nSUB\n"),
                "{shell}: {out}"
            );
            assert!(out.contains("child got HUP\nsub 4\n"), "{shell}: {out}");
            assert_eq!(shell_code(under.status), 128 + libc::SIGUSR1, "{shell}");
        }
    }
}

#[test]
fn asynchronous_signals_interrupt_running_and_sleeping_code_as_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cc in ["gcc", "musl-gcc"] {
        let Some(prog) = build(cc, dir.path(), "signals_async", &[]) else {
            return;
        };
        let under = same(&prog, &[]);
        assert!(
            text(&under.stdout).contains("1 busy loop saw 1 ticks\n2 nanosleep -1 errno 4\n"),
            "{cc}: {}",
            text(&under.stdout)
        );
    }
}

#[test]
fn pthreads_mutexes_condvars_barriers_once_and_tls_run_as_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (cc, extra) in [("gcc", &["-pthread"][..]), ("musl-gcc", &[][..])] {
        let Some(prog) = build(cc, dir.path(), "threads", extra) else {
            return;
        };
        let under = same(&prog, &[]);
        assert!(
            text(&under.stdout).contains("counter 40000 onces 1 main tls 7\nping-pong done\n"),
            "{cc}: {}",
            text(&under.stdout)
        );
    }
}

/// A thread that dies holding a robust mutex (joined first, or while
/// another thread waits in `pthread_mutex_lock`) hands EOWNERDEAD to the
/// next locker: the minikernel walks the thread's robust list at its exit
/// as Linux does. Without that walk the lock never returns.
#[test]
fn robust_mutexes_of_a_dead_thread_answer_eownerdead_as_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (cc, extra) in [("gcc", &["-pthread"][..]), ("musl-gcc", &[][..])] {
        let Some(prog) = build(cc, dir.path(), "robust", extra) else {
            return;
        };
        let under = same(&prog, &[]);
        let out = text(&under.stdout);
        assert_eq!(
            out.matches("lock after owner died: EOWNERDEAD").count(),
            2,
            "{cc}: {out}"
        );
        assert!(out.contains("bad length: EINVAL"), "{cc}: {out}");
    }
}

#[test]
fn go_goroutines_channels_sleep_and_gc_run_as_natively() {
    let Some(go) = require("go") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = dir.path().join("gochan");
    let r = run(Command::new(go)
        .arg("build")
        .arg("-o")
        .arg(&prog)
        .arg(workspace_root().join("tests/programs/gochan/main.go"))
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.path().join("cache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("HOME", dir.path()));
    assert!(r.status.success(), "go build failed: {}", text(&r.stderr));
    for _ in 0..3 {
        let under = same(&prog, &[]);
        assert_eq!(
            text(&under.stdout),
            "sum 499500\nn 8000\nslept true\nkept 200\n"
        );
    }
}

#[test]
fn sigwaitinfo_and_sigtimedwait_take_signals_as_natively() {
    let dir = tempfile::tempdir().expect("tempdir");
    for cc in ["gcc", "musl-gcc"] {
        let Some(prog) = build(cc, dir.path(), "sigwait", &[]) else {
            return;
        };
        let under = same(&prog, &[]);
        assert!(
            text(&under.stdout).contains("chld 17 status 9 code 1\ntimeout -1\n"),
            "{cc}: {}",
            text(&under.stdout)
        );
    }
}
