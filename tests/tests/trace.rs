//! The strace-like trace and `--stats`: line shapes, filters, `-o`, `-ff`, `-t`/`-tt`/`-ttt`, `-r`, `-T`.

use vkrun_tests::{bin, counter, counter_names, run, text, vkrun};

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
    // As strace shows a call that filled a struct: the struct written.
    let call = is_pid_prefix(lines[1]).expect("[pid N] prefix");
    let fields = call
        .strip_prefix("vk_info({")
        .and_then(|r| r.strip_suffix("}, 48) = 0"))
        .unwrap_or_else(|| panic!("bad line {call}"));
    assert!(
        fields.starts_with("abi_version=1, page_size=4096, ram_fd=")
            && fields.contains(", vpte_levels=4, ram_size=0x10000000, user_max=0x")
            && fields.ends_with(", reserved=[0, 0]"),
        "{call}"
    );
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

/// A short `vk_info` shows the fields it wrote and `...` for the rest.
#[test]
fn a_partial_vk_info_shows_what_it_wrote() {
    let out = run(vkrun()
        .arg("--trace")
        .arg(bin("vkcall"))
        .args(["info", "16"]));
    let err = text(&out.stderr);
    assert!(
        err.lines().filter_map(is_pid_prefix).any(|l| l
            .starts_with("vk_info({abi_version=1, page_size=4096, ram_fd=")
            && l.ends_with(", vpte_levels=4, ...}, 16) = 0")),
        "{err}"
    );
}

/// strace's `-ttt` (seconds.micros since the epoch) and `-r` (the time since
/// the previous line, first 0): `[pid N] REL EPOCH call`.
#[test]
fn epoch_and_relative_timestamps() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let out = run(vkrun()
        .args(["--trace", "-ttt", "-r"])
        .arg(bin("vkcall"))
        .args(["info", "48"]));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter_map(is_pid_prefix).collect();
    assert_eq!(lines.len(), 3, "{err}");
    for (i, line) in lines.iter().enumerate() {
        let mut parts = line.trim_start().splitn(3, ' ');
        let rel = parts.next().expect("relative");
        let epoch = parts.next().expect("epoch");
        let (rs, ru) = rel.split_once('.').expect("secs.micros");
        assert!(rs.parse::<u64>().is_ok() && ru.len() == 6, "{line}");
        if i == 0 {
            assert_eq!(rel, "0.000000", "the first line is 0: {line}");
        }
        let (es, eu) = epoch.split_once('.').expect("secs.micros");
        let es: u64 = es.parse().expect("epoch seconds");
        assert!(es >= before && es < before + 60 && eu.len() == 6, "{line}");
    }
    // -r pads the seconds to 6 columns, as strace does.
    assert!(lines[0].starts_with("     0.000000 "), "{}", lines[0]);
}

/// `-ff -o FILE`: each task's lines in FILE.TID without the `[pid N]`
/// prefix; FILE itself is not made (it would only hold --stats).
#[test]
fn ff_writes_one_trace_file_per_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("t");
    let vkcall = bin("vkcall");
    let script = format!(
        "{0} info 48 >/dev/null; {0} info 48 >/dev/null",
        vkcall.display()
    );
    let out = run(vkrun()
        .args(["-ff", "-e", "trace=all,process", "-o"])
        .arg(&base)
        .args(["/bin/sh", "-c", &script]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!base.exists(), "FILE itself holds nothing with -ff");
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("trace file"))
        .collect();
    let with_info: Vec<&String> = texts.iter().filter(|t| t.contains("vk_info({")).collect();
    assert_eq!(
        with_info.len(),
        2,
        "one file per vk_info-calling task: {texts:?}"
    );
    for (f, t) in files.iter().zip(&texts) {
        let tid = f.extension().and_then(|e| e.to_str()).expect("FILE.TID");
        assert!(tid.parse::<u32>().is_ok(), "{}", f.display());
        assert!(
            !t.contains("[pid"),
            "no [pid N] prefix in {}: {t}",
            f.display()
        );
        assert!(t.lines().all(|l| !l.is_empty()), "{t}");
    }
    for t in with_info {
        assert!(
            t.starts_with("execve(") && t.ends_with("+++ exited with 0 +++\n"),
            "{t}"
        );
    }
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

/// `--stats -v` lists every counter, in order, zeros included; plain
/// `--stats` only those that moved (after the one-line summary).
#[test]
fn stats_list_every_counter_with_v_and_the_nonzero_ones_without() {
    let stats = |verbose: bool| {
        let mut cmd = vkrun();
        cmd.arg("--stats");
        if verbose {
            cmd.arg("-v");
        }
        let out = run(cmd
            .arg(bin("vkcall"))
            .args(["raw", "0xdf00000", "0x8", "48"]));
        let err = text(&out.stderr);
        let listed: Vec<(String, u64)> = err
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.starts_with("vm.") || n.starts_with("vkrun."))
            .map(|(n, v)| (n.to_owned(), v.parse().expect("a number")))
            .collect();
        (err, listed)
    };
    let (err, all) = stats(true);
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, counter_names(), "{err}");
    assert_eq!(counter(&err, "vkrun.hypercalls.vk_info"), 1, "{err}");
    assert_eq!(counter(&err, "vkrun.hypercall_errors"), 1, "{err}");
    assert!(all.iter().any(|(_, v)| *v == 0), "zeros are listed with -v");

    let (err, moved) = stats(false);
    assert!(
        err.starts_with("vkrun: 1 hypercall"),
        "summary first: {err}"
    );
    let nonzero: Vec<(String, u64)> = all.into_iter().filter(|(_, v)| *v != 0).collect();
    assert_eq!(moved, nonzero, "{err}");
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
