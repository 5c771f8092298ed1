//! Process lifecycle: nothing survives vkrun, vkrun outlives nothing it
//! should not, and signals behave as without vkrun.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vkrun_tests::{DEADLINE, alive, eventually, run, shell_code, text, vkrun, wait_deadline};

/// Start `vkrun sh -c script` and read its first stdout line.
fn start(script: &str) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = vkrun()
        .args(["-q", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vkrun");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    reader.read_line(&mut first).expect("first line");
    (child, reader, first)
}

fn rest(reader: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut s = String::new();
    for line in reader.lines() {
        s.push_str(&line.expect("line"));
        s.push('\n');
    }
    s
}

#[test]
fn sigkill_of_vkrun_leaves_no_guest_process() {
    // The guest, a background grandchild and a thread-ish pipeline member.
    let (mut child, _reader, first) = start("sleep 300 & echo $$ $!; sleep 300 | sleep 300; wait");
    let pids: Vec<i32> = first
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2, "{first}");
    assert!(pids.iter().all(|p| alive(*p)));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill vkrun");
    wait_deadline(&mut child, DEADLINE);
    assert!(
        eventually(Duration::from_secs(5), || pids.iter().all(|p| !alive(*p))),
        "guest processes survived vkrun: {pids:?}"
    );
}

#[test]
fn sigterm_to_vkrun_is_forwarded_to_the_guest() {
    let (mut child, mut reader, first) =
        start("trap 'echo got-TERM; exit 9' TERM; echo ready; while :; do sleep 0.05; done");
    assert_eq!(first, "ready\n");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("kill");
    let out = rest(&mut reader);
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(out, "got-TERM\n");
    assert_eq!(status.code(), Some(9));
}

#[test]
fn sigint_and_sighup_to_vkrun_are_forwarded() {
    for (sig, name) in [(Signal::SIGINT, "INT"), (Signal::SIGHUP, "HUP")] {
        let (mut child, mut reader, first) = start(&format!(
            "trap 'echo got-{name}; exit 3' {name}; echo ready; while :; do sleep 0.05; done"
        ));
        assert_eq!(first, "ready\n");
        kill(Pid::from_raw(child.id() as i32), sig).expect("kill");
        assert_eq!(rest(&mut reader), format!("got-{name}\n"));
        assert_eq!(wait_deadline(&mut child, DEADLINE).code(), Some(3));
    }
}

#[test]
fn an_unhandled_forwarded_signal_kills_the_guest() {
    let (mut child, _reader, first) = start("echo ready; while :; do sleep 0.05; done");
    assert_eq!(first, "ready\n");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("kill");
    assert_eq!(shell_code(wait_deadline(&mut child, DEADLINE)), 128 + 15);
}

fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[test]
fn sigstop_and_sigcont_of_the_guest_behave_natively() {
    let (mut child, mut reader, first) =
        start("echo $$; i=0; while [ $i -lt 40 ]; do i=$((i+1)); sleep 0.01; done; echo done");
    let pid: i32 = first.trim().parse().expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("stop");
    // A traced task in group-stop shows 't' (tracing stop) instead of 'T'.
    let stopped = || matches!(state(pid), Some('T' | 't'));
    assert!(
        eventually(Duration::from_secs(5), stopped),
        "guest did not stop"
    );
    // It must stay stopped (vkrun must not resume a group-stop).
    std::thread::sleep(Duration::from_millis(700));
    assert!(stopped(), "guest was resumed while stopped");
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("cont");
    assert_eq!(rest(&mut reader), "done\n");
    assert_eq!(wait_deadline(&mut child, DEADLINE).code(), Some(0));
}

#[test]
fn vkrun_waits_for_descendants_after_main_exits() {
    let out = run(vkrun().args(["sh", "-c", "(sleep 0.3; echo late) & echo early; exit 4"]));
    assert_eq!(text(&out.stdout), "early\nlate\n");
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn a_guest_killed_from_outside_does_not_hang_vkrun() {
    let (mut child, _reader, first) = start("echo $$; exec sleep 300");
    let pid: i32 = first.trim().parse().expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill guest");
    assert_eq!(shell_code(wait_deadline(&mut child, DEADLINE)), 128 + 9);
}

#[test]
fn many_short_lived_processes_and_threads() {
    let script = "for i in $(seq 1 100); do (true) & done; wait; echo $(seq 1 100 | wc -l)";
    let out = run(vkrun().args(["sh", "-c", script]));
    assert_eq!(text(&out.stdout), "100\n");
    assert!(out.status.success());
}

/// A minimal job-control shell in a pseudo-terminal: runs vkrun as the
/// foreground job, reports when the job stops, waits, then resumes it (`fg`).
/// The test side types ^Z once the guest is running.
const CTRL_Z_SCRIPT: &str = r#"
import os, pty, time, signal, sys, select
vkrun = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    # A minimal job-control shell: run vkrun as a foreground job.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        while os.tcgetpgrp(0) != os.getpid():
            time.sleep(0.001)
        os.execv(vkrun, [vkrun, "sh", "-c", "echo ready; i=0; while [ $i -lt 40 ]; do i=$((i+1)); sleep 0.02; done; echo done; exit 5"])
    os.setpgid(job, job)
    os.tcsetpgrp(0, job)
    _, st = os.waitpid(job, os.WUNTRACED)
    os.tcsetpgrp(0, os.getpgrp())
    print("JOB-STOPPED" if os.WIFSTOPPED(st) else "JOB-NOT-STOPPED", flush=True)
    time.sleep(1.2)
    print("FG", flush=True)
    os.tcsetpgrp(0, job)
    os.killpg(job, signal.SIGCONT)
    _, st = os.waitpid(job, 0)
    os.tcsetpgrp(0, os.getpgrp())
    print("JOB-EXIT", os.waitstatus_to_exitcode(st), flush=True)
    os._exit(0)
buf = b""
while b"ready" not in buf:
    buf += os.read(fd, 100)
os.write(fd, b"\x1a")
out = b""
while True:
    try:
        d = os.read(fd, 1000)
    except OSError:
        break
    if not d: break
    out += d
os.waitpid(pid, 0)
print(out.decode().replace("\r", ""))
"#;

#[test]
fn ctrl_z_from_a_terminal_stops_and_fg_resumes() {
    let Some(python) = vkrun_tests::require("python3") else {
        return;
    };
    let out = run(std::process::Command::new(python)
        .arg("-c")
        .arg(CTRL_Z_SCRIPT)
        .arg(vkrun_tests::bin("vkrun")));
    let text = text(&out.stdout);
    let stopped = text.find("JOB-STOPPED").expect("the job stopped on ^Z");
    let fg = text.find("FG").expect("fg");
    let done = text.find("done").expect("the guest finished");
    assert!(
        stopped < fg && fg < done,
        "the guest ran while stopped: {text}"
    );
    assert!(text.contains("JOB-EXIT 5"), "{text}");
}
