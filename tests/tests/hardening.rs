//! vkrun never hangs on its own failures: a closed trace output ends the
//! trace, not vkrun; a panic in any vkrun thread ends the guest with status
//! 125 and one line; nothing is left behind.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use vkrun_tests::{alive, bin, eventually, text, vkrun, wait_output};

/// How long vkrun may take to end after its output closed or it failed.
const BOUND: Duration = Duration::from_secs(15);

/// The guest's pid, from the first line `sh` printed (`echo $$`).
fn first_pid(out: &[u8]) -> i32 {
    text(out)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid line in {:?}", text(out)))
}

#[test]
fn a_panic_in_any_vkrun_thread_ends_the_guest_with_125() {
    let vkinfo = bin("vkinfo").display().to_string();
    let vpt_demo = bin("vpt-demo").display().to_string();
    let cases: [(&str, &[&str], String); 4] = [
        ("tracer", &[], "echo $$; exec sleep 60".to_owned()),
        (
            "hypercall",
            &[],
            format!("echo $$; {vkinfo} >/dev/null; sleep 60"),
        ),
        // Traced faults take the supervisor's path (no in-guest resolver).
        (
            "faults",
            &["-e", "trace=faults", "-o", "/dev/null"],
            format!("echo $$; {vpt_demo} segv >/dev/null; sleep 60"),
        ),
        (
            "trace",
            &["--trace", "-o", "/dev/null"],
            format!("echo $$; {vkinfo} >/dev/null; sleep 60"),
        ),
    ];
    for (kind, options, script) in cases {
        let child = vkrun()
            .env("VKRUN_TEST_PANIC", kind)
            .args(options)
            .args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vkrun");
        let out = wait_output(child, BOUND);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{kind}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("vkrun: internal error"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{kind}: one line says what failed: {stderr}"
        );
        assert!(
            lines[0].contains(&format!("VKRUN_TEST_PANIC={kind}")),
            "{kind}: {stderr}"
        );
        // The tracer panics before `sh` can print; otherwise the guest's
        // pid is there, and the guest must be gone.
        if kind != "tracer" {
            let pid = first_pid(&out.stdout);
            assert!(
                eventually(Duration::from_secs(5), || !alive(pid)),
                "{kind}: guest {pid} outlived vkrun"
            );
        }
    }
}

/// `sh -c "vkrun ARGS REDIRECTIONS | head -N"`: vkrun ends once the pipe
/// is closed (the trace stops; the guest goes on or dies of its own EPIPE).
fn ends_when_the_pipe_closes(vkrun_args: &[&str], redirections: &str, lines: usize) {
    let vkrun_path = bin("vkrun").display().to_string();
    let args = vkrun_args.join(" ");
    let script =
        format!("{vkrun_path} {args} {redirections} | head -{lines} >/dev/null; echo done");
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let out = wait_output(child, BOUND);
    assert_eq!(
        text(&out.stdout).trim(),
        "done",
        "{script}: {}",
        text(&out.stderr)
    );
}

#[test]
fn a_trace_piped_into_head_does_not_hang_vkrun() {
    let minikernel = bin("minikernel").display().to_string();
    let busybox = match vkrun_tests::require("busybox") {
        Some(b) => b.display().to_string(),
        None => return,
    };
    let script = "'echo hi | wc -c; i=0; while [ $i -lt 200 ]; do echo $i; i=$((i+1)); done'";
    let args = ["--trace", "--", &minikernel, &busybox, "sh", "-c", script];
    ends_when_the_pipe_closes(&args, "2>&1", 5);
}

#[test]
fn a_fault_trace_piped_into_head_does_not_hang_vkrun() {
    // Before: hung every time. Only stderr (the trace) goes into the pipe.
    let vpt_demo = bin("vpt-demo").display().to_string();
    let args = ["-e", "trace=faults", "--", &vpt_demo, "segv"];
    ends_when_the_pipe_closes(&args, "2>&1 >/dev/null", 3);
}

#[test]
fn a_full_trace_output_ends_the_trace_not_the_guest() {
    let vpt_demo = bin("vpt-demo").display().to_string();
    let mut child = vkrun()
        .args([
            "-e",
            "trace=faults",
            "-o",
            "/dev/full",
            "--",
            &vpt_demo,
            "segv",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vkrun");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    let out = wait_output(child, BOUND);
    // The guest ran to its end, its checks passing, untraced.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.lines().count() > 10, "{stdout}");
    assert!(stdout.lines().all(|l| l.ends_with(" ok")), "{stdout}");
    assert!(
        text(&out.stderr).contains("trace output failed"),
        "vkrun says the trace ended: {}",
        text(&out.stderr)
    );
}

#[test]
fn user_code_scribbling_on_its_stubs_resolver_page_changes_nothing() {
    // Before: the forged lock word stalled every fault of the stub for 10 s,
    // then vkrun killed the stub and RUN failed with EIO.
    let out = vkrun_tests::run(vkrun().args([
        "--",
        &bin("vmspace-check").display().to_string(),
        "hostile-stub",
    ]));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for name in ["writes", "fault", "mcontrol", "run"] {
        assert!(
            stdout
                .lines()
                .any(|l| l == format!("ok hostile-stub.{name}")),
            "{name}: {stdout}"
        );
    }
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
}
