//! The command line: `-m` values, `--help`/`--version`, and every exit status.

use std::os::unix::fs::PermissionsExt;

use vkrun_tests::{bin, run, text, vkrun};

fn ram_size_seen(m: &str) -> String {
    let out = run(vkrun().args(["-m", m, "--"]).arg(bin("vkinfo")));
    assert!(out.status.success(), "-m {m}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ram_size: ").map(str::to_owned))
        .expect("vkinfo prints ram_size")
}

#[test]
fn valid_sizes_reach_the_guest() {
    for (m, bytes) in [
        ("4096", 4096u64),
        ("8k", 8192),
        ("16M", 16 << 20),
        ("16m", 16 << 20),
        ("0x4000000", 0x400_0000),
        ("1G", 1 << 30),
        ("1t", 1 << 40),
    ] {
        assert_eq!(ram_size_seen(m), bytes.to_string(), "-m {m}");
    }
}

#[test]
fn default_size_is_256m_and_documented() {
    let out = run(vkrun().arg(bin("vkinfo")));
    assert!(text(&out.stdout).contains("ram_size: 268435456\n"));
    let help = run(vkrun().arg("--help"));
    assert!(help.status.success());
    let help = text(&help.stdout);
    assert!(help.contains("Default 256M"), "{help}");
    assert!(help.contains("Exit status"), "{help}");
}

#[test]
fn invalid_sizes_exit_2_naming_the_value() {
    for m in [
        "0",
        "12x",
        "4097",
        "-1",
        "1P",
        "99999999999999999999",
        "18446744073709551615T",
        "257T",
        "",
    ] {
        let out = run(vkrun().args(["-m", m, "--", "/bin/true"]));
        assert_eq!(out.status.code(), Some(2), "-m {m:?}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("'{m}'")), "-m {m:?}: {err}");
    }
}

#[test]
fn ram_the_machine_cannot_map_is_refused_at_parse_time_with_the_reason() {
    // 2^48 and 200T are valid sizes, but the supervisor maps all of RAM
    // and the user address space is 2^47 bytes: a bad command line (2),
    // refused before anything starts, saying why. 1T fits (sparse).
    for m in ["256T", "200T"] {
        let out = run(vkrun().args(["-m", m]).arg(bin("vkinfo")));
        assert_eq!(out.status.code(), Some(2), "{m}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "vkrun: invalid value '{m}' for '--memory <SIZE>': more than this machine can map"
            )),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "the guest must not start");
    }
    let out = run(vkrun().args(["-m", "1T"]).arg(bin("vkinfo")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// `git rev-parse --short HEAD` of this checkout, if git can tell.
fn git_head() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let head = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !head.is_empty()).then_some(head)
}

#[test]
fn version_and_missing_guest() {
    for flag in ["--version", "-V"] {
        let out = run(vkrun().arg(flag));
        assert!(out.status.success(), "{flag}");
        let v = text(&out.stdout);
        let first = v.lines().next().unwrap_or("");
        assert!(first.starts_with("vkrun 0."), "{flag}: {v}");
        // The commit is what git says about this checkout ("unknown" only
        // where git cannot say).
        let commit = first
            .split_once("(commit ")
            .and_then(|(_, c)| c.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{flag}: no commit in {first:?}"));
        match git_head() {
            Some(head) => assert_eq!(commit, head, "{flag}"),
            None => assert_eq!(commit, "unknown", "{flag}"),
        }
        assert!(v.contains("\nABI version 1\n"), "{v}");
        for probe in [
            "FSGSBASE: ",
            "seccomp SYNC_WAKE_UP: ",
            "userfaultfd kernel faults: ",
        ] {
            let line = v
                .lines()
                .find(|l| l.starts_with(probe))
                .unwrap_or_else(|| panic!("{flag}: no {probe:?} line in {v}"));
            let answer = &line[probe.len()..];
            assert!(
                answer.starts_with("yes") || answer.starts_with("no"),
                "{line}"
            );
        }
        let host_max = std::fs::read_to_string("/proc/sys/vm/max_map_count").expect("sysctl");
        assert!(
            v.contains(&format!("vm.max_map_count: {}\n", host_max.trim())),
            "{v}"
        );
    }
    let out = run(&mut vkrun());
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("vkrun: "), "{err}");
    assert!(err.contains("GUEST"), "{err}");
}

#[test]
fn unknown_options_are_refused_strace_style() {
    for (args, bad) in [
        (&["--foo", "--", "/bin/true"][..], "--foo"),
        (&["--stat", "--", "prog"][..], "--stat"),
        (&["-Z", "/bin/true"][..], "-Z"),
    ] {
        let out = run(vkrun().args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            text(&out.stderr),
            format!(
                "vkrun: unrecognized option '{bad}'\nTry 'vkrun --help' for more information.\n"
            ),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn after_the_separator_a_dash_name_is_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prog = dir.path().join("--weird-name");
    std::fs::write(&prog, "#!/bin/sh\necho weird \"$@\"\n").expect("write");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(vkrun()
        .env("PATH", &path)
        .args(["--", "--weird-name", "--foo"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "weird --foo\n");
}

#[test]
fn guest_path_errors_name_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(vkrun().arg(dir.path()));
    assert_eq!(out.status.code(), Some(126));
    let err = text(&out.stderr);
    assert!(err.starts_with("vkrun: "), "{err}");
    assert!(err.contains("Is a directory"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = run(vkrun().arg("/nonexistent/guest"));
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "vkrun: /nonexistent/guest: No such file or directory\n"
    );
}

#[test]
fn unknown_size_suffix_is_named() {
    for (m, c) in [("1P", 'P'), ("12x", 'x')] {
        let out = run(vkrun().args(["-m", m, "--", "/bin/true"]));
        assert_eq!(out.status.code(), Some(2));
        let err = text(&out.stderr);
        assert!(err.starts_with("vkrun: "), "{err}");
        assert!(
            err.contains(&format!("unknown suffix {c}")),
            "-m {m}: {err}"
        );
    }
}

#[test]
fn guest_arguments_pass_through_with_and_without_separator() {
    let out = run(vkrun().args(["/bin/echo", "-n", "--stats", "x"]));
    assert_eq!(text(&out.stdout), "--stats x");
    let out = run(vkrun().args(["-q", "--", "/bin/echo", "-e", "a"]));
    assert_eq!(text(&out.stdout), "a\n");
}

#[test]
fn exit_status_is_the_guest_code() {
    for code in [0, 1, 42, 255] {
        let out = run(vkrun().args(["sh", "-c", &format!("exit {code}")]));
        assert_eq!(out.status.code(), Some(code));
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    }
}

#[test]
fn exit_status_128_plus_signal_with_one_line() {
    let out = run(vkrun().args(["sh", "-c", "kill -TERM $$"]));
    assert_eq!(out.status.code(), Some(128 + 15));
    assert_eq!(text(&out.stderr), "vkrun: guest killed by SIGTERM\n");
    let out = run(vkrun().args(["-q", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(out.status.code(), Some(128 + 9));
    assert!(
        out.stderr.is_empty(),
        "-q must silence: {}",
        text(&out.stderr)
    );
}

#[test]
fn exit_status_125_for_vkrun_failure() {
    let out = run(vkrun().args(["-o", "/nonexistent/dir/trace", "/bin/true"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/nonexistent/dir/trace"));
}

#[test]
fn exit_status_126_when_not_executable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    // Root may execute any file with an x bit; without one, nobody can.
    let out = run(vkrun().arg(&file));
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not-executable"));
    let out = run(vkrun().arg(dir.path()));
    assert_eq!(out.status.code(), Some(126), "a directory");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, [0u8, 1, 2, 3, 4, 5, 6, 7]).expect("write");
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(vkrun().arg(&garbage));
    assert_eq!(out.status.code(), Some(126), "no executable format");
}

#[test]
fn exit_status_127_when_not_found() {
    let out = run(vkrun().arg("/nonexistent/guest"));
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("/nonexistent/guest"));
    let out = run(vkrun().arg("no-such-command-vkrun-test"));
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("no-such-command-vkrun-test: command not found"));
}

#[test]
fn bad_trace_expressions_exit_2() {
    for e in ["trace=bogus", "signal=all", "trace="] {
        let out = run(vkrun().args(["-e", e, "/bin/true"]));
        assert_eq!(out.status.code(), Some(2), "-e {e}");
        assert!(
            text(&out.stderr).contains(e),
            "-e {e}: {}",
            text(&out.stderr)
        );
    }
}
