//! The strace-like trace and `--stats`: line shapes, filters, `-o`, `-tt`, `-T`.

use vkrun_tests::{bin, run, text, vkrun};

fn is_pid_prefix(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("[pid ")?;
    let (pid, rest) = rest.split_once("] ")?;
    pid.trim().parse::<u32>().ok()?;
    Some(rest)
}

#[test]
fn trace_shows_hypercalls_and_exits_in_strace_grammar() {
    let out = run(vkrun()
        .arg("--trace")
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    assert!(out.status.success());
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let exec = is_pid_prefix(lines[0]).expect("[pid N] prefix");
    assert!(
        exec.starts_with("execve(\"") && exec.ends_with(r#", "info", "48"], ...) = 0"#),
        "{exec}"
    );
    let call = is_pid_prefix(lines[1]).expect("[pid N] prefix");
    let args = call
        .strip_prefix("vk_info(0x")
        .and_then(|r| r.strip_suffix(", 48) = 0"))
        .unwrap_or_else(|| panic!("bad line {call}"));
    assert!(args.chars().all(|c| c.is_ascii_hexdigit()), "{call}");
    assert_eq!(is_pid_prefix(lines[2]), Some("+++ exited with 0 +++"));
}

#[test]
fn errors_render_as_minus_one_errno_and_description() {
    let out = run(vkrun()
        .args(["-e", "trace=%vkernel"])
        .arg(bin("vkcall"))
        .args(["raw", "0xdf00000", "0x8", "48"]));
    let err = text(&out.stderr);
    assert!(
        err.lines()
            .filter_map(is_pid_prefix)
            .any(|l| l == "vk_info(0x8, 48) = -1 EFAULT (Bad address)"),
        "{err}"
    );
    // Decoded flags, on a call the supervisor refuses (MAP_PRIVATE).
    let out = run(vkrun().args(["-e", "trace=all"]).arg(bin("vkcall")).args([
        "raw",
        "0xdf000c5",
        "0",
        "8192",
        "3",
        "0x2002",
        "3",
        "0",
    ]));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "vk_mmap(NULL, 0x2000, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_VPAGETABLE, 3, 0x0) = -1 EINVAL (Invalid argument)"
        ),
        "{err}"
    );
    // A vmspace call on an unknown id: traced, answered ENOENT.
    let out = run(vkrun()
        .args(["-e", "trace=vmspace_pread"])
        .arg(bin("vkcall"))
        .args(["raw", "0xdf001ec", "0x1", "0", "0", "0", "0"]));
    let err = text(&out.stderr);
    assert!(
        err.contains("vmspace_pread(0x1, NULL, 0, 0, 0x0) = -1 ENOENT (No such file or directory)"),
        "{err}"
    );
}

#[test]
fn trace_set_filters_events() {
    // Only faults: no hypercall line, but the exit line stays.
    let out = run(vkrun()
        .args(["-e", "trace=faults"])
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    let err = text(&out.stderr);
    assert!(!err.contains("vk_info("), "{err}");
    assert!(err.contains("+++ exited with 0 +++"), "{err}");
    // Negation.
    let out = run(vkrun()
        .args(["-e", "!vk_info"])
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    let err = text(&out.stderr);
    assert!(!err.contains("vk_info("), "{err}");
    // Not an empty trace: the rest of the set (process exits) is traced.
    assert!(err.contains("+++ exited with 0 +++"), "{err}");
    // No trace at all without --trace / -e.
    let out = run(vkrun().arg(bin("vkcall")).args(["info", "48"]));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn timestamps_and_durations() {
    let out = run(vkrun()
        .args(["--trace", "-tt", "-T"])
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("vk_info("))
        .expect("call line");
    let rest = is_pid_prefix(line).expect("prefix");
    let (time, call) = rest.split_once(' ').expect("time prefix");
    let b = time.as_bytes();
    assert_eq!(b.len(), 15, "HH:MM:SS.uuuuuu: {time}");
    assert!(b[2] == b':' && b[5] == b':' && b[8] == b'.', "{time}");
    let took = call.rsplit_once(" <").expect("duration suffix").1;
    let took = took.strip_suffix('>').expect(">");
    let (secs, micros) = took.split_once('.').expect("seconds.micros");
    assert!(secs.parse::<u64>().is_ok() && micros.len() == 6, "{took}");
}

#[test]
fn output_file_holds_trace_and_stats_and_diagnostics_stay_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trace.txt");
    let out = run(vkrun()
        .args(["--trace", "--stats", "-vv", "-o"])
        .arg(&file)
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    assert!(out.status.success());
    let written = std::fs::read_to_string(&file).expect("trace file");
    assert!(written.contains("vk_info("), "{written}");
    assert!(
        written.contains("vkrun.hypercalls.vk_info: 1\n"),
        "{written}"
    );
    let err = text(&out.stderr);
    assert!(!err.contains("vk_info("), "trace leaked to stderr: {err}");
    assert!(
        !err.contains("vkrun.hypercalls"),
        "stats leaked to stderr: {err}"
    );
    for line in written.lines() {
        assert!(
            is_pid_prefix(line).is_some() || line.split_once(": ").is_some(),
            "diagnostic in the trace file: {line}"
        );
    }
}

#[test]
fn stats_list_every_counter() {
    let out =
        run(vkrun()
            .arg("--stats")
            .arg(bin("vkcall"))
            .args(["raw", "0xdf00000", "0x8", "48"]));
    let err = text(&out.stderr);
    for name in [
        "vm.vpagetable_mmap",
        "vm.vpagetable_setmap",
        "vm.vpagetable_inval",
        "vm.vpagetable_faults",
        "vkrun.hypercalls",
        "vkrun.hypercall_errors",
        "vkrun.vmspaces_created",
        "vkrun.runs",
        "vkrun.host_mappings_installed",
        "vkrun.host_mappings_evicted",
    ] {
        let line = err
            .lines()
            .find(|l| l.split_once(": ").map(|(n, _)| n) == Some(name))
            .unwrap_or_else(|| panic!("{name} missing: {err}"));
        assert!(
            line.split_once(": ")
                .expect("pair")
                .1
                .parse::<u64>()
                .is_ok()
        );
    }
    assert!(err.contains("vkrun.hypercalls.vk_info: 1\n"), "{err}");
    assert!(err.contains("vkrun.hypercall_errors: 1\n"), "{err}");
}

#[test]
fn killed_by_signal_line() {
    let out = run(vkrun().args(["--trace", "-q", "sh", "-c", "kill -SEGV $$"]));
    let err = text(&out.stderr);
    assert!(
        err.lines()
            .filter_map(is_pid_prefix)
            .any(|l| l.starts_with("+++ killed by SIGSEGV") && l.ends_with(" +++")),
        "{err}"
    );
    // The delivery itself, in strace's grammar, before the exit line.
    let delivered = err
        .lines()
        .filter_map(is_pid_prefix)
        .position(|l| {
            l.starts_with("--- SIGSEGV {si_signo=SIGSEGV, si_code=SI_USER, si_pid=")
                && l.ends_with(", si_uid=0} ---")
        })
        .expect("a --- SIGSEGV {...} --- line");
    let killed = err
        .lines()
        .filter_map(is_pid_prefix)
        .position(|l| l.starts_with("+++ killed by SIGSEGV"))
        .expect("exit line");
    assert!(delivered < killed, "{err}");
}

/// `-e trace=process` shows each process as `strace -f` does: the exec of
/// every program with its argv, the fork (vfork, clone) that made each
/// child with the child's pid, and `SIGCHLD` with `si_status`; other
/// classes leave them out.
#[test]
fn process_events_show_forks_execs_and_exit_statuses() {
    let out = run(vkrun()
        .args(["-e", "trace=process", "--", "/bin/sh", "-c"])
        .arg("/bin/true one; exit 3"));
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter_map(is_pid_prefix).collect();
    let child: i32 = lines
        .iter()
        .find_map(|l| {
            let (call, pid) = l.rsplit_once(") = ")?;
            (call.starts_with("fork(") || call.starts_with("vfork(") || call.starts_with("clone"))
                .then(|| pid.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no fork line:\n{err}"));
    assert!(
        lines[0].starts_with("execve(\"")
            && lines[0].contains(r#"["/bin/sh", "-c", "/bin/true one; exit 3"]"#),
        "{err}"
    );
    let true_exec = format!("[pid {child:>5}] execve(\"");
    assert!(
        err.lines()
            .any(|l| l.starts_with(&true_exec) && l.ends_with(r#"["/bin/true", "one"], ...) = 0"#)),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "si_code=CLD_EXITED, si_pid={child}, si_uid=0, si_status=0}}"
        )),
        "{err}"
    );
    let quiet = run(vkrun().args(["-e", "trace=vk_info", "--", "/bin/sh", "-c", "/bin/true"]));
    let quiet = text(&quiet.stderr);
    assert!(
        !quiet.contains("execve(") && !quiet.contains("fork()"),
        "{quiet}"
    );
}
