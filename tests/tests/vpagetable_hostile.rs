//! Hostile guests against MAP_VPAGETABLE (`guest-samples/c/vpt_hostile.c`):
//! page-table cycles, frames beyond RAM, windows unmapped and remapped while
//! another thread faults, every descriptor closed, exit with faults in
//! flight. The guest gets the documented fault or error; vkrun neither
//! crashes nor hangs (every run has a deadline) and reports the guest's
//! status.

use std::path::PathBuf;
use std::sync::OnceLock;

use vkrun_tests::{compile_c, run, text, vkrun, workspace_root};

fn guest() -> Option<&'static PathBuf> {
    static GUEST: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let src = workspace_root().join("guest-samples/c/vpt_hostile.c");
            let exe = compile_c(&src, dir.path(), &["-pthread"])?;
            Some((dir, exe))
        })
        .as_ref()
        .map(|(_, exe)| exe)
}

fn hostile(mode: &str) -> Option<(i32, String, String)> {
    let exe = guest()?;
    let out = run(vkrun().args(["-m", "64M", "--"]).arg(exe).arg(mode));
    Some((
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    ))
}

fn expect_ok(mode: &str) {
    let Some((code, stdout, stderr)) = hostile(mode) else {
        return;
    };
    assert_eq!(code, 0, "{mode}: {stdout}{stderr}");
    assert_eq!(stdout, format!("{mode}: ok\n"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[test]
fn page_table_cycles_and_recursive_slots_are_bounded() {
    expect_ok("cycle");
}

#[test]
fn frames_and_tables_beyond_ram_fault() {
    expect_ok("beyond");
}

#[test]
fn windows_unmapped_and_remapped_while_faulting() {
    for _ in 0..3 {
        expect_ok("munmap");
    }
}

#[test]
fn closing_every_descriptor_keeps_windows_working() {
    expect_ok("closefd");
}

#[test]
fn exit_with_faults_in_flight_ends_cleanly() {
    let Some((code, stdout, stderr)) = hostile("exit") else {
        return;
    };
    assert_eq!(code, 7, "{stdout}{stderr}");
    assert_eq!(stdout, "exit: ok\n");
}

#[test]
fn nx_entries_are_not_executable() {
    expect_ok("nx");
}

#[test]
fn a_forked_child_has_no_windows() {
    expect_ok("fork");
}

/// The guest replaces the descriptors vkrun installed for its agent (768
/// and up: the RAM memfd and the userfaultfd). Closed, they are repaired and
/// the windows go on working; replaced with a pipe of forged userfaultfd
/// messages (which used to hang the guest for ever) or with /dev/null, vkrun
/// ends the guest with one line naming the descriptor and status 125, or
/// goes on serving the faults. Never a hang (the run has a deadline) and
/// never a process left behind.
#[test]
fn replaced_descriptors_end_the_guest_clearly_or_keep_working() {
    for (how, must) in [("pipe", Some(125)), ("null", None), ("close", Some(0))] {
        let mode = format!("replace-{how}");
        let started = std::time::Instant::now();
        let Some((code, stdout, stderr)) = hostile(&mode) else {
            return;
        };
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(5),
            "{mode}: took {took:?}"
        );
        if let Some(want) = must {
            assert_eq!(code, want, "{mode}: {stdout}{stderr}");
        }
        match code {
            0 => assert!(
                stdout.starts_with("replace: ok"),
                "{mode}: {stdout}{stderr}"
            ),
            125 => {
                let lines: Vec<&str> = stderr.lines().collect();
                assert_eq!(lines.len(), 1, "{mode}: one line:\n{stderr}");
                assert!(
                    lines[0].starts_with("vkrun: guest process ")
                        && lines[0].contains(" replaced descriptor 76"),
                    "{mode}: {stderr}"
                );
            }
            other => panic!("{mode}: status {other}: {stdout}{stderr}"),
        }
    }
}

/// A guest holding the lock vkrun shares with its resolver stalls its own
/// `vk_mmap` and its write to a read-only page (both wait for the lock on
/// the process's stop worker), never the tracer: forks go on meanwhile.
/// Before the stop worker, the tracer waited in the lock, the forks froze,
/// and the guest was killed after 10 s.
#[test]
fn a_guest_holding_its_resolver_lock_stalls_only_itself() {
    let Some((code, stdout, stderr)) = hostile("hold-lock") else {
        return;
    };
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, "hold-lock: ok\n", "{stderr}");
    assert!(stderr.contains("forks while held"), "{stderr}");
}
