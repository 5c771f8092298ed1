//! The vmspace sample guests end to end (ABI section 7): `vmspace-demo` and
//! its C twin `guest-samples/c/vmspace_demo.c` build page tables in guest
//! RAM, run a user program in a vmspace with `vmspace_ctl(RUN)`, serve its
//! page faults and system calls, and print what it computed; the tests check
//! the output exactly, the exit status, and vkrun's RUN counters. Also the
//! bench subcommands' output and the guest's behaviour without vkrun.
//!
//! The user program (`guest-samples/vmspace-demo/src/user.s`) is checked on
//! its own, natively, by `cargo test -p vmspace-demo`; that test pins the
//! figures used here (43 page faults: heap pages 0..=24 and 31..=32 and 16
//! stack pages; 3 writes and an exit).

use std::path::PathBuf;
use std::process::{Command, Output};

use vkrun_tests::{bin, compile_c, counter, run, text, vkrun, workspace_root};

/// What the demo program prints.
const PROGRAM_OUTPUT: &str = "primes below 100000: 9592, sum 454396537\n\
                              fib(90): 2880067194370816120\n\
                              sum(1..1000) by recursion: 500500\n";
/// First touches of heap and stack pages, each a `T_PAGEFLT` the vkernel serves.
const PAGE_FAULTS: u64 = 43;
/// Three writes and the exit.
const SYSCALLS: u64 = 4;

/// Run `guest ARGS` under `vkrun --stats`.
fn under_vkrun(guest: impl Into<PathBuf>, args: &[&str]) -> Output {
    under_vkrun_on("fast", guest, args)
}

/// The same with `vkrun --run=path`.
fn under_vkrun_on(path: &str, guest: impl Into<PathBuf>, args: &[&str]) -> Output {
    run(vkrun()
        .args(["--stats", &format!("--run={path}"), "--"])
        .arg(guest.into())
        .args(args))
}

/// Fast RUNs of the demo whose user code takes a page fault. A fast RUN
/// starts the program and follows each system call; three of them fault
/// before their next system call (counted for this program).
const FAULTS_IN_FAST_RUNS: u64 = 3;

/// The RUNs took the path asked for. The library's fast RUN asks vkrun
/// twice (the block, the listener); the retry of each page fault is a
/// hypercall (vkrun installs the page before the user code runs), and so is
/// the rest of a fast RUN whose user code faults (a window page is
/// `PROT_NONE` in the stub until installed: vkrun resolves the fault or
/// reports it); the system calls' RUNs are not. The hypercall path makes
/// one per RUN (and the library's one question).
fn assert_path(out: &Output, path: &str) {
    let stderr = text(&out.stderr);
    let calls = counter(&stderr, "vkrun.hypercalls.vmspace_ctl");
    let runs = counter(&stderr, "vkrun.runs");
    match path {
        "fast" => assert_eq!(calls, 2 + PAGE_FAULTS + FAULTS_IN_FAST_RUNS, "{stderr}"),
        _ => assert_eq!(calls, runs + 1, "{stderr}"),
    }
}

/// Check a demo run: the program's output then `NAME: ... exit 0`, status
/// 0, and one RUN per page fault and per system call.
fn assert_demo(out: &Output, name: &str) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let summary =
        format!("{name}: {PAGE_FAULTS} page faults served, {SYSCALLS} syscalls, exit 0\n");
    assert_eq!(
        stdout,
        format!("{PROGRAM_OUTPUT}{summary}"),
        "stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    // Each RUN comes back with exactly one event: a fault to serve or a
    // system call.
    assert_eq!(counter(&stderr, "vkrun.run_exits.pagefault"), PAGE_FAULTS);
    assert_eq!(counter(&stderr, "vkrun.run_exits.syscall"), SYSCALLS);
    assert_eq!(counter(&stderr, "vkrun.runs"), PAGE_FAULTS + SYSCALLS);
    assert_eq!(counter(&stderr, "vkrun.vmspaces_created"), 1);
}

#[test]
fn without_vkrun_vmspace_demo_fails_cleanly() {
    let out = run(&mut Command::new(bin("vmspace-demo")));
    assert_eq!(text(&out.stderr), "vk_info: Function not implemented\n");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_bad_command_line_is_status_2() {
    for args in [
        &["bench"][..],
        &["bench", "0"],
        &["bench-fault", "x"],
        &["demo"],
    ] {
        let out = run(Command::new(bin("vmspace-demo")).args(args));
        assert_eq!(
            text(&out.stderr),
            "usage: vmspace-demo [bench N | bench-fault N | bench-vpt N]\n",
            "{args:?}"
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn the_demo_runs_its_program_in_a_vmspace() {
    for path in ["fast", "hypercall"] {
        let out = under_vkrun_on(path, bin("vmspace-demo"), &[]);
        assert_demo(&out, "vmspace-demo");
        assert_path(&out, path);
    }
}

#[test]
fn the_c_demo_runs_the_same_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = workspace_root();
    let user = root.join("guest-samples/vmspace-demo/src/user.s");
    let user = user.to_str().expect("utf-8 path");
    let flags = [
        "-std=c11",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-Wconversion",
        "-Wsign-conversion",
        user,
    ];
    let src = root.join("guest-samples/c/vmspace_demo.c");
    let Some(exe) = compile_c(&src, dir.path(), &flags) else {
        return;
    };
    for path in ["fast", "hypercall"] {
        let out = under_vkrun_on(path, &exe, &[]);
        assert_demo(&out, "vmspace_demo.c");
        assert_path(&out, path);
    }
}

/// Run `vmspace-demo ARGS` under vkrun; assert status 0 and a single
/// `NAME <positive number>` line; return stderr (the counters).
fn bench(args: &[&str], name: &str) -> String {
    let out = under_vkrun(bin("vmspace-demo"), args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{args:?}:\n{stdout}{stderr}");
    let value = stdout
        .strip_prefix(&format!("{name} "))
        .and_then(|v| v.strip_suffix('\n'))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{args:?}: expected one `{name} <ns>` line:\n{stdout}"));
    assert!(value > 0.0, "{args:?}: {stdout}");
    stderr
}

#[test]
fn bench_times_run_round_trips() {
    let stderr = bench(&["bench", "200"], "run_ns_per_call");
    // The marker, 200 calls and the exit.
    assert_eq!(counter(&stderr, "vkrun.run_exits.syscall"), 202, "{stderr}");
    assert_eq!(counter(&stderr, "vkrun.run_exits.pagefault"), 0, "{stderr}");
}

#[test]
fn bench_fault_serves_one_page_fault_per_page() {
    let stderr = bench(&["bench-fault", "64"], "fault_ns_per_page");
    assert_eq!(
        counter(&stderr, "vkrun.run_exits.pagefault"),
        64,
        "{stderr}"
    );
}

#[test]
fn bench_vpt_faults_never_leave_the_host() {
    // The guest checks that each page holds what was stored and that the
    // host set A and M on its prefilled leaf.
    let stderr = bench(&["bench-vpt", "64"], "vpt_fault_ns_per_page");
    assert_eq!(counter(&stderr, "vkrun.run_exits.pagefault"), 0, "{stderr}");
    assert_eq!(counter(&stderr, "vkrun.run_exits.syscall"), 2, "{stderr}");
}

/// Fault lines of a vmspace name the guest thread whose RUN faulted, like
/// its RUN lines, never a thread of vkrun's stub.
#[test]
fn vmspace_fault_lines_name_the_guest_thread() {
    let out = run(vkrun()
        .args(["-e", "trace=faults,runs", "--"])
        .arg(bin("vmspace-demo")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let trace = text(&out.stderr);
    let pid = |line: &str| -> Option<String> {
        let rest = line.strip_prefix("[pid ")?;
        Some(rest.split(']').next()?.to_owned())
    };
    let runners: Vec<String> = trace
        .lines()
        .filter(|l| l.contains("vmspace_ctl("))
        .filter_map(pid)
        .collect();
    let faults: Vec<&str> = trace.lines().filter(|l| l.contains("] fault(")).collect();
    assert!(!runners.is_empty() && !faults.is_empty(), "{trace}");
    let strangers: Vec<&&str> = faults
        .iter()
        .filter(|l| pid(l).is_none_or(|p| !runners.contains(&p)))
        .collect();
    assert!(
        strangers.is_empty(),
        "fault lines naming another thread: {strangers:#?}"
    );
    assert!(
        faults.iter().any(|l| l.contains("= T_PAGEFLT (")),
        "no failed walk traced:\n{trace}"
    );
}
