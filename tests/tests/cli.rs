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
fn ram_the_supervisor_cannot_map_is_a_clear_125() {
    // 2^48 is a valid size, but the supervisor maps all of RAM and the user
    // address space is 2^47 bytes.
    let out = run(vkrun().args(["-m", "256T"]).arg(bin("vkinfo")));
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("vkrun: cannot map 281474976710656 bytes"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "the guest must not start");
}

#[test]
fn version_and_missing_guest() {
    let out = run(vkrun().arg("--version"));
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("vkrun "));
    let out = run(&mut vkrun());
    assert_eq!(out.status.code(), Some(2));
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
