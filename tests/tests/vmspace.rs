//! vmspaces (ABI section 7), as far as they exist: the registry and its
//! errors, one stub process per vmspace with nothing of vkrun mapped below
//! `USER_MAX`, and no stub outliving the guest or vkrun.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vkrun_tests::{DEADLINE, alive, bin, eventually, run, text, vkrun, wait_deadline};

fn raw(nr: &str, args: &[&str]) -> String {
    let out = run(vkrun()
        .arg("-q")
        .arg(bin("vkcall"))
        .arg("raw")
        .arg(nr)
        .args(args));
    text(&out.stdout)
}

#[test]
fn create_and_destroy_follow_the_abi_errors() {
    // One guest process per call: the registry is shared by the whole guest,
    // so use a shell to make several calls in one vkrun run.
    let c = bin("vkcall");
    let c = c.to_str().expect("utf-8");
    let script = format!(
        "{c} raw 0xdf001e6 0x1234 0 0; {c} raw 0xdf001e6 0x1234 0 0; \
         {c} raw 0xdf001e6 0 0 0; {c} raw 0xdf001e7 0x1234; \
         {c} raw 0xdf001e7 0x1234; {c} raw 0xdf001e7 0"
    );
    let out = run(vkrun().args(["--stats", "sh", "-c", &script]));
    assert_eq!(text(&out.stdout), "0\n-17\n-22\n0\n-2\n-22\n");
    let err = text(&out.stderr);
    assert!(err.contains("vkrun.vmspaces_created: 1\n"), "{err}");
    assert!(err.contains("vkrun.vmspaces_destroyed: 1\n"), "{err}");
    // A lone create in its own run succeeds (and is destroyed at exit).
    assert_eq!(raw("0xdf001e6", &["0x1", "0", "0"]), "0\n");
}

/// Start `vkrun vkcall hold-vmspaces n`; returns the child and the guest pid.
fn hold(n: u32) -> (Child, i32) {
    let mut child = vkrun()
        .arg(bin("vkcall"))
        .args(["hold-vmspaces", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vkrun");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let guest = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected: {line}"));
    (child, guest)
}

/// vkrun's children other than the guest: the stubs.
fn stubs(vkrun_pid: u32, guest: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{vkrun_pid}/task")).expect("tasks") {
        let path = task.expect("task").path().join("children");
        let children = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|p| *p != guest),
        );
    }
    out
}

#[test]
fn one_stub_per_vmspace_with_nothing_below_user_max() {
    let (mut child, guest) = hold(3);
    let stubs = stubs(child.id(), guest);
    assert_eq!(stubs.len(), 3, "{stubs:?}");
    for stub in &stubs {
        let maps = std::fs::read_to_string(format!("/proc/{stub}/maps")).expect("maps");
        for line in maps.lines() {
            let start =
                u64::from_str_radix(line.split('-').next().expect("range"), 16).expect("hex");
            assert!(
                start >= vkabi::USER_MAX,
                "stub {stub} maps below USER_MAX: {line}"
            );
        }
    }
    drop(child.stdin.take());
    assert_eq!(wait_deadline(&mut child, DEADLINE).code(), Some(0));
    assert!(
        eventually(Duration::from_secs(5), || stubs.iter().all(|s| !alive(*s))),
        "stubs outlived the guest: {stubs:?}"
    );
}

#[test]
fn sigkill_of_vkrun_leaves_no_stub() {
    let (mut child, guest) = hold(2);
    let stubs = stubs(child.id(), guest);
    assert_eq!(stubs.len(), 2);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill vkrun");
    wait_deadline(&mut child, DEADLINE);
    assert!(
        eventually(Duration::from_secs(5), || stubs
            .iter()
            .chain([&guest])
            .all(|s| !alive(*s))),
        "processes outlived vkrun: {stubs:?}"
    );
}

#[test]
fn a_guest_killed_with_vmspaces_ends_cleanly() {
    let (mut child, guest) = hold(2);
    let stubs = stubs(child.id(), guest);
    kill(Pid::from_raw(guest), Signal::SIGKILL).expect("kill guest");
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(status.code(), Some(128 + 9));
    assert!(eventually(Duration::from_secs(5), || stubs
        .iter()
        .all(|s| !alive(*s))));
    let _ = child.stdin.take().map(|mut s| s.write_all(b"\n"));
}
