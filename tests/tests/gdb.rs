//! `vkrun --gdb`: Debian's gdb, in batch mode, debugs real guests through
//! vkrun's stub (tests/programs/gdb_target.c, vpt-demo): breakpoints,
//! variables, steps, registers, memory writes, threads, signals, detach,
//! kill, and a gdb that dies while attached.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vkrun_tests::{
    DEADLINE, bin, compile_c, eventually, require, run, shell_code, text, vkrun, wait_output,
    workspace_root,
};

/// The test guest, built with symbols; None (after a skip) without gcc or gdb.
fn guest(dir: &Path) -> Option<PathBuf> {
    require("gdb")?;
    let source = workspace_root().join("tests/programs/gdb_target.c");
    compile_c(&source, dir, &["-O0", "-g", "-pthread"])
}

/// A vkrun serving gdb, and where it listens.
struct Served {
    vkrun: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
}

/// Start `vkrun --gdb ADDR [extra] -- program args` and wait for its
/// "listening on" line (with port 0, it names the port).
fn serve(addr: &str, extra: &[&str], program: &Path, args: &[&str]) -> Served {
    let mut vkrun = vkrun()
        .arg("--gdb")
        .arg(addr)
        .args(extra)
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vkrun");
    let (tx, rx) = mpsc::channel();
    let stderr = vkrun.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("vkrun says where it listens");
    let addr = first
        .strip_prefix("vkrun: gdb: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    Served {
        vkrun,
        addr,
        stderr: rx,
    }
}

impl Served {
    /// Run gdb in batch mode with `commands` against this vkrun (no file:
    /// the stub names the executable).
    fn gdb(&self, commands: &[&str]) -> Output {
        let mut cmd = Command::new("gdb");
        cmd.args(["-nx", "-batch", "-ex", "set confirm off"]);
        // Never ask the network for symbols.
        cmd.args(["-ex", "set debuginfod enabled off"]);
        cmd.args(["-ex", &format!("target remote {}", self.addr)]);
        for c in commands {
            cmd.args(["-ex", c]);
        }
        run(&mut cmd)
    }

    /// vkrun's end: its output, and the rest of its stderr.
    fn finish(self) -> (Output, String) {
        let Served { vkrun, stderr, .. } = self;
        let out = wait_output(vkrun, DEADLINE);
        let mut rest = Vec::new();
        while let Ok(line) = stderr.recv_timeout(Duration::from_secs(10)) {
            rest.push(line);
        }
        let err = rest.join("\n");
        (out, err)
    }
}

fn both(gdb: &Output) -> String {
    format!("{}{}", text(&gdb.stdout), text(&gdb.stderr))
}

#[test]
fn break_read_step_write_and_continue_to_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &[]);
    let gdb = served.gdb(&[
        "break bump",
        "continue",
        "print n",
        "print counter",
        "next",
        "next",
        "print twice",
        "print/x $fs_base != 0",
        "print/x $mxcsr",
        "print $rip == (long)&bump",
        "set var counter = 100",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("Breakpoint 1, bump (n=1)"), "{log}");
    assert!(log.contains("$1 = 1\n"), "n: {log}");
    assert!(log.contains("$2 = 0\n"), "counter: {log}");
    assert!(log.contains("$3 = 2\n"), "twice after two steps: {log}");
    assert!(log.contains("$4 = 0x1\n"), "fs_base: {log}");
    assert!(
        log.contains("$5 = 0x1f80\n"),
        "mxcsr, the x87/SSE state: {log}"
    );
    assert!(log.contains("$6 = 0\n"), "the pc left bump's entry: {log}");
    assert!(log.contains("exited with code 07"), "{log}");
    assert_eq!(shell_code(out.status), 7);
    // 100 written by gdb after bump(1) added its 2, then 4 + 6.
    assert!(
        text(&out.stdout).contains("counter 110 "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_hardware_watchpoint_stops_where_the_variable_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &[]);
    let gdb = served.gdb(&[
        "break main",
        "continue",
        "watch counter",
        "continue",
        "continue",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("Hardware watchpoint 2: counter"), "{log}");
    assert!(
        log.contains("Old value = 0\nNew value = 2\nbump (n=1)"),
        "{log}"
    );
    assert!(
        log.contains("Old value = 2\nNew value = 6\nbump (n=2)"),
        "{log}"
    );
    assert!(log.contains("exited with code 07"), "{log}");
    assert_eq!(shell_code(out.status), 7);
}

#[test]
fn stepping_over_a_hypercall_served_at_a_tracer_stop_stays_a_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    // 300 single steps from probe(): through vmspace_destroy's `syscall`
    // (served at a seccomp stop) and on; a lost step would let the guest
    // run to its end before the loop does.
    let script = dir.path().join("steps.gdb");
    std::fs::write(
        &script,
        "break probe\ncontinue\nset $i = 0\nwhile $i < 300\nstepi\nset $i = $i + 1\nend\nprint $i\ndelete\ncontinue\n",
    )
    .expect("write the script");
    let served = serve("127.0.0.1:0", &[], &prog, &["probe"]);
    let gdb = served.gdb(&[&format!("source {}", script.display())]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("$1 = 300\n"), "{log}");
    assert!(!log.contains("not being run"), "{log}");
    assert!(log.contains("exited with code 07"), "{log}");
    assert_eq!(shell_code(out.status), 7, "probe() got ENOENT");
}

#[test]
fn unix_socket_finds_the_executable_and_registers_agree_with_ptrace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let sock = dir.path().join("gdb.sock");
    let served = serve(sock.to_str().expect("utf-8"), &[], &prog, &[]);
    assert!(sock.exists());
    let gdb = served.gdb(&[
        "info inferiors",
        "print $pc == $rip",
        "stepi",
        "print $orig_rax",
        "break bump",
        "continue",
        "finish",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(
        log.contains(prog.to_str().expect("utf-8")),
        "exec-file: {log}"
    );
    assert!(log.contains("$1 = 1\n"), "{log}");
    // The thread is one instruction past its execve's return.
    assert!(log.contains("$2 = 59\n"), "orig_rax: {log}");
    assert!(log.contains("Value returned is $3 = 2"), "finish: {log}");
    assert!(log.contains("exited with code 07"), "{log}");
    assert_eq!(shell_code(out.status), 7);
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn info_threads_lists_every_guest_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &["threads"]);
    let gdb = served.gdb(&[
        "break bump",
        "continue",
        "info threads",
        "thread 3",
        "bt",
        "thread 1",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    // `info threads` rows: "* 1    Thread P.T ..." and "  2    Thread P.T ...".
    let rows = log
        .lines()
        .filter(|l| {
            let mut words = l.trim_start_matches(['*', ' ']).split_whitespace();
            words.next().is_some_and(|n| n.parse::<u32>().is_ok()) && words.next() == Some("Thread")
        })
        .count();
    assert!(log.contains("hit Breakpoint 1, bump (n=1)"), "{log}");
    assert_eq!(rows, 4, "main and three workers: {log}");
    assert!(
        log.contains("in worker (arg="),
        "a worker's backtrace: {log}"
    );
    assert!(log.contains("exited with code 07"), "{log}");
    assert_eq!(shell_code(out.status), 7);
    assert!(
        text(&out.stdout).contains("counter 14 "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_breakpoint_while_another_thread_runs_stops_it_and_its_run_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &["run"]);
    let gdb = served.gdb(&[
        "break bump",
        "continue",
        "thread 2",
        "bt 1",
        "print runs",
        "shell sleep 0.5",
        "print runs",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, err) = served.finish();
    assert!(log.contains("hit Breakpoint 1, bump (n=1)"), "{log}");
    // The runner sits in its RUN hypercall, stopped with everyone.
    assert!(log.contains("in vk_syscall6 ("), "{log}");
    let value = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("{name} in {log}"))
            .to_owned()
    };
    assert_eq!(
        value("$1"),
        value("$2"),
        "no RUN completes while stopped: {log}"
    );
    // Every RUN, the interrupted one included, returned what its user code did.
    assert!(
        text(&out.stdout).contains("runs ok"),
        "{}{err}",
        text(&out.stdout)
    );
    assert_eq!(shell_code(out.status), 7);
}

#[test]
fn monitor_commands_show_the_vmspaces_and_their_user_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &["run"]);
    let gdb = served.gdb(&[
        "break bump",
        "continue",
        "monitor vmspaces",
        "eval \"monitor vmspace %lu x 0x400000 7\", (unsigned long)&vmspace_token",
        "eval \"monitor vmspace %lu x 0x400ff8\", (unsigned long)&vmspace_token",
        "monitor vmspace 0x1 x 0",
        "monitor threads",
        "monitor frobnicate",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(
        log.contains(": stub pid ") && log.contains(", 1 execution context(s)"),
        "{log}"
    );
    // The runner's user code, read through the vmspace's mapping of RAM.
    assert!(log.contains("0x400000: 48 ff c9 75 fb 0f 05\n"), "{log}");
    assert!(
        log.contains("0x400ff8: 00 00 00 00 00 00 00 00\n0x401000: not readable by the user code"),
        "{log}"
    );
    assert!(
        log.contains("vmspace 0x1: No such file or directory"),
        "{log}"
    );
    assert!(
        log.contains("of process ") && log.contains(": stopped"),
        "{log}"
    );
    assert!(log.contains("vkrun: unknown command 'frobnicate'"), "{log}");
    assert!(text(&out.stdout).contains("runs ok"));
    assert_eq!(shell_code(out.status), 7);
}

#[test]
fn signals_stop_or_pass_as_gdb_is_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    // By default gdb stops at the guest's SIGSEGV and passes it on.
    let served = serve("127.0.0.1:0", &[], &prog, &["segv"]);
    let gdb = served.gdb(&["continue", "print i", "continue"]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("received signal SIGSEGV"), "{log}");
    assert!(log.contains("$1 = 0\n"), "the first fault: {log}");
    assert_eq!(shell_code(out.status), 7, "{log}");
    assert!(
        text(&out.stdout).contains("faults 8"),
        "{}",
        text(&out.stdout)
    );

    // With nostop noprint, the handler takes every fault and gdb says nothing.
    let served = serve("127.0.0.1:0", &[], &prog, &["segv"]);
    let gdb = served.gdb(&["handle SIGSEGV nostop noprint", "continue"]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(!log.contains("SIGSEGV,"), "{log}");
    assert!(log.contains("exited with code 07"), "{log}");
    assert!(
        text(&out.stdout).contains("faults 8"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_vkernel_taking_window_faults_by_design_runs_under_gdb() {
    if require("gdb").is_none() {
        return;
    }
    let served = serve("127.0.0.1:0", &[], &bin("vpt-demo"), &[]);
    let gdb = served.gdb(&["handle SIGSEGV nostop noprint", "continue"]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("exited normally"), "{log}");
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("vpt-demo: all"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn window_pages_read_and_write_once_installed_and_an_untouched_one_is_refused_harmlessly() {
    if require("gdb").is_none() {
        return;
    }
    // vpt-demo's `kernel` check, once its window is mapped and page 0 has
    // been read into: page 2 (RW|U, frame 2) is still untouched.
    let source = workspace_root().join("guest-samples/vpt-demo/src/checks/kernel.rs");
    let code = std::fs::read_to_string(&source).expect("kernel.rs");
    let line = code
        .lines()
        .position(|l| l.contains("let seen = env.read_bytes(GuestPhysAddr(target[0].0 + 64)"))
        .expect("the line after the first read(2)")
        + 1;
    let served = serve("127.0.0.1:0", &[], &bin("vpt-demo"), &["kernel"]);
    let gdb = served.gdb(&[
        &format!("break kernel.rs:{line}"),
        "continue",
        "set $b = w.base",
        "set language c",
        "x/4xb $b + 64",
        "set var *(char *)($b + 65) = 0x5a",
        "x/2xb $b + 64",
        "set var *(char *)($b + 65) = 0x0a",
        "x/4xb $b + 4096 * 2",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(
        log.contains(":\t0x03\t0x0a\t0x11\t0x18\n"),
        "what read(2) put there: {log}"
    );
    assert!(
        log.contains(":\t0x03\t0x5a\n"),
        "written through the alias: {log}"
    );
    // The kernel does not fault a userfaultfd page in for a remote access.
    assert!(log.contains("Cannot access memory at address"), "{log}");
    // ... and the refused look costs the vkernel nothing.
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stdout).matches(" ok").count(),
        3,
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn detach_lets_the_guest_run_on_and_kill_kills_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &[]);
    let gdb = served.gdb(&["break bump", "continue", "detach"]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("detached"), "{log}");
    assert_eq!(shell_code(out.status), 7);
    assert!(
        text(&out.stdout).contains("counter 12 "),
        "the breakpoint is gone"
    );

    let served = serve("127.0.0.1:0", &[], &prog, &[]);
    let gdb = served.gdb(&["break bump", "continue", "kill"]);
    let log = both(&gdb);
    let (out, err) = served.finish();
    assert!(log.contains("killed]"), "{log}");
    assert_eq!(shell_code(out.status), 128 + 9);
    assert!(err.contains("guest killed by SIGKILL"), "{err}");
}

#[test]
fn gdb_killed_while_attached_leaves_nothing_hung() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &[]);
    let flag = dir.path().join("stopped");
    let mut gdb = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "set debuginfod enabled off"])
        .args(["-ex", &format!("target remote {}", served.addr)])
        .args(["-ex", "break bump", "-ex", "continue"])
        .args(["-ex", &format!("shell touch {}", flag.display())])
        .args(["-ex", "shell sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gdb");
    assert!(
        eventually(Duration::from_secs(60), || flag.exists()),
        "gdb stopped the guest at the breakpoint"
    );
    gdb.kill().expect("kill gdb");
    let _ = gdb.wait();
    let (out, _) = served.finish();
    assert_eq!(shell_code(out.status), 7, "the guest ran on to its end");
    assert!(text(&out.stdout).contains("counter 12 "));
}

#[test]
fn gdb_wait_no_runs_the_guest_until_gdb_attaches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &["--gdb-wait=no"], &prog, &["spin"]);
    // It runs meanwhile: it spins in bump(0) for ever.
    std::thread::sleep(Duration::from_millis(300));
    let gdb = served.gdb(&["break bump", "continue", "print n", "kill"]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    assert!(log.contains("Breakpoint 1, bump (n=0)"), "{log}");
    assert!(log.contains("$1 = 0\n"), "{log}");
    assert_eq!(shell_code(out.status), 128 + 9);
}

#[test]
fn a_forked_child_runs_free_of_the_parents_breakpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &["fork"]);
    let gdb = served.gdb(&[
        "break bump",
        "continue",
        "continue",
        "print n",
        "delete",
        "continue",
    ]);
    let log = both(&gdb);
    let (out, _) = served.finish();
    // gdb follows the parent: the child's bump(100) does not stop, and
    // the child's memory has no int3 left in it (it checks its counter).
    assert!(!log.contains("bump (n=100)"), "{log}");
    assert!(log.contains("Breakpoint 1, bump (n=2)"), "{log}");
    assert!(
        text(&out.stdout).contains("child ok"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(shell_code(out.status), 7);
}

/// The guest's pid, once it has exec'd `prog`.
fn guest_pid(served: &Served, prog: &Path) -> i32 {
    let vkrun = served.vkrun.id();
    let children = format!("/proc/{vkrun}/task/{vkrun}/children");
    let mut pid = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            pid = std::fs::read_to_string(&children)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
                .find(|c| std::fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|e| e == prog));
            pid.is_some()
        }),
        "the guest started"
    );
    pid.expect("found above")
}

#[test]
fn a_guest_stopped_by_sigstop_is_shown_and_stays_stopped_after_detach() {
    use nix::sys::signal::{Signal, kill};
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &["--gdb-wait=no"], &prog, &["spin"]);
    let guest = nix::unistd::Pid::from_raw(guest_pid(&served, &prog));
    kill(guest, Signal::SIGSTOP).expect("SIGSTOP");
    let state = || {
        std::fs::read_to_string(format!("/proc/{guest}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.chars().next()))
            .flatten()
    };
    assert!(eventually(Duration::from_secs(10), || state() == Some('t')));
    let gdb = served.gdb(&["print counter", "detach"]);
    let log = both(&gdb);
    assert!(log.contains("$1 = 0\n"), "{log}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(state(), Some('t'), "still in its group-stop after detach");
    kill(guest, Signal::SIGCONT).expect("SIGCONT");
    assert!(eventually(Duration::from_secs(10), || state() == Some('R')));
    kill(guest, Signal::SIGKILL).expect("SIGKILL");
    let (out, _) = served.finish();
    assert_eq!(shell_code(out.status), 128 + 9);
}

#[test]
fn a_fatal_signal_without_gdb_waits_for_gdb_post_mortem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &["--gdb-wait=no"], &prog, &["crash"]);
    let line = served
        .stderr
        .recv_timeout(Duration::from_secs(30))
        .expect("vkrun says the guest waits");
    assert!(
        line.starts_with("vkrun: gdb: SIGSEGV in thread ") && line.contains("waiting for gdb"),
        "{line}"
    );
    let gdb = served.gdb(&["bt 1", "print page", "continue"]);
    let log = both(&gdb);
    let (out, err) = served.finish();
    assert!(log.contains("page is NULL"), "the faulting line: {log}");
    assert!(log.contains("$1 = 0x0"), "{log}");
    assert!(
        log.contains("Program terminated with signal SIGSEGV"),
        "{log}"
    );
    assert_eq!(shell_code(out.status), 128 + 11);
    assert!(err.contains("guest killed by SIGSEGV"), "{err}");
}

#[test]
fn a_guest_waiting_for_gdb_still_ends_on_a_signal_to_vkrun() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = guest(dir.path()) else {
        return;
    };
    let served = serve("127.0.0.1:0", &[], &prog, &["spin"]);
    let pid = nix::unistd::Pid::from_raw(served.vkrun.id() as i32);
    // Once the guest waits at its first instruction (it has exec'd).
    guest_pid(&served, &prog);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("kill vkrun");
    let (out, err) = served.finish();
    assert_eq!(shell_code(out.status), 128 + 15, "{err}");
    assert!(err.contains("no longer waiting for gdb"), "{err}");
}

#[test]
fn gdb_addresses_are_loopback_only() {
    let out = run(vkrun().args(["--gdb", "0.0.0.0:1234", "/bin/true"]));
    assert_eq!(shell_code(out.status), 2);
    assert!(
        text(&out.stderr).contains("loopback"),
        "{}",
        text(&out.stderr)
    );
    let out = run(vkrun().args(["--gdb-wait=no", "/bin/true"]));
    assert_eq!(shell_code(out.status), 2, "--gdb-wait needs --gdb");
    // Without --gdb, nothing listens and the guest just runs.
    let out = run(vkrun().arg("/bin/true"));
    assert!(out.status.success());
}
