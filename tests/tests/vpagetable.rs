//! MAP_VPAGETABLE end to end (ABI sections 2-6): the `vpt-demo` guest checks
//! one area per subcommand from the inside and prints `AREA: CHECK ok` per
//! passing check; each test runs it under vkrun and demands exit 0, no FAIL
//! line and exactly the expected `ok` lines. Also the C guest, the demo,
//! the counters and the fault trace, and the guest's behaviour without vkrun.

use std::path::Path;
use std::process::Command;

use vkrun_tests::{bin, compile_c, counter, run, text, vkrun, workspace_root};

/// Run `vpt-demo ARGS` under `vkrun -m MEM`; assert exit 0 and no FAIL line;
/// return stdout.
fn vpt_demo(mem: &str, args: &[&str]) -> String {
    let out = run(vkrun()
        .args(["-m", mem, "--"])
        .arg(bin("vpt-demo"))
        .args(args));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        !stdout.contains("FAIL"),
        "vpt-demo {args:?} failed:\n{stdout}{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "vpt-demo {args:?}:\n{stdout}{stderr}"
    );
    stdout
}

/// Assert that stdout has `AREA: CHECK ok` for every check, and no other
/// `ok` line of that area (so the lists here follow the guest).
fn assert_oks<S: AsRef<str>>(stdout: &str, area: &str, checks: &[S]) {
    let prefix = format!("{area}: ");
    let oks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.ends_with(" ok"))
        .collect();
    for check in checks {
        let line = format!("{area}: {} ok", check.as_ref());
        assert!(
            oks.contains(&line.as_str()),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert_eq!(oks.len(), checks.len(), "unexpected ok lines in:\n{stdout}");
}

/// Run one area at 64 MiB and check its lines.
fn area(name: &str, checks: &[&str]) {
    let stdout = vpt_demo("64M", &[name]);
    assert_oks(&stdout, name, checks);
}

#[test]
fn without_vkrun_vpt_demo_fails_cleanly() {
    let out = run(Command::new(bin("vpt-demo")).arg("args"));
    assert_eq!(text(&out.stderr), "vk_info: Function not implemented\n");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(out.status.code(), Some(1));
}

#[test]

fn args_follow_abi_sections_4_and_5() {
    area(
        "args",
        &[
            "vk_mmap MAP_PRIVATE EINVAL",
            "vk_mmap other fd EINVAL",
            "vk_mmap without PROT_WRITE EINVAL",
            "vk_mmap MAP_STACK EINVAL",
            "vk_mmap len 0 EINVAL",
            "vk_mmap MAP_FIXED beyond user_max EINVAL",
            "vk_mmap MAP_FIXED address",
            "vk_mmap chosen address",
            "mcontrol behav 12 and -1 EINVAL",
            "mcontrol behav 0..9",
            "mcontrol wrapping range EINVAL",
            "mcontrol end beyond user_max EINVAL",
            "mcontrol unmapped range",
            "mcontrol SETMAP on a window",
            "mcontrol SETMAP on anonymous memory EINVAL",
        ],
    );
}

const ALIAS: [&str; 6] = [
    "dmap -> window",
    "A set at every level after a read",
    "M clear after a read",
    "window -> dmap",
    "M set at every level after a write",
    "two pages of one frame alias each other",
];

#[test]

fn window_pages_alias_ram_and_a_m_are_exact() {
    area("alias", &ALIAS);
}

/// The lines of `vpt-demo dirperm`: per directory level, RW and NX there.
fn dirperm_checks() -> Vec<String> {
    let mut checks = Vec::new();
    for level in ["L4", "L3", "L2"] {
        for what in [
            "RW clear: read",
            "RW clear: write raises SIGSEGV",
            "RW clear: the write lands once RW is set",
            "NX set: a call raises SIGSEGV",
            "NX set: the call runs once NX is clear",
            "RW clear: a first write by read(2) is EFAULT and sets no M",
        ] {
            checks.push(format!("{level} {what}"));
        }
    }
    checks
}

#[test]
fn directory_rw_and_nx_count_on_the_resolver_path() {
    // Untraced: the in-guest resolver walks (its own code, not vpte's).
    let checks = dirperm_checks();
    let names: Vec<&str> = checks.iter().map(String::as_str).collect();
    area("dirperm", &names);
}

#[test]
fn directory_rw_and_nx_count_on_the_supervisor_path() {
    // Traced faults go through the supervisor's walker.
    let out = run(vkrun()
        .args(["-m", "64M", "-e", "trace=faults", "-o", "/dev/null", "--"])
        .arg(bin("vpt-demo"))
        .arg("dirperm"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let checks = dirperm_checks();
    let names: Vec<&str> = checks.iter().map(String::as_str).collect();
    assert_oks(&stdout, "dirperm", &names);
}

#[test]

fn reads_map_read_only_until_the_first_write() {
    area(
        "readonly",
        &[
            "read through an RW leaf without M",
            "the read leaves M clear",
            "the first write sets M",
            "read through a leaf without RW",
            "write through a leaf without RW raises SIGSEGV",
            "the write lands once the handler sets RW",
        ],
    );
}

#[test]

fn failed_walks_deliver_sigsegv_with_abi_details() {
    let mut checks = Vec::new();
    for case in [
        "maperr read",
        "maperr write",
        "accerr write",
        "beyond-RAM read",
    ] {
        for field in [
            "signal", "si_addr", "si_code", "trapno", "cr2", "err bits", "retry",
        ] {
            checks.push(format!("{case} {field}"));
        }
    }
    let stdout = vpt_demo("64M", &["segv"]);
    assert_oks(&stdout, "segv", &checks);
}

#[test]

fn superpages_and_a_linear_master() {
    area(
        "superpage",
        &[
            "2 MiB leaf",
            "2 MiB leaf A and M",
            "unaligned 2 MiB frame is not masked",
            "1 GiB leaf",
            "linear master PDE",
        ],
    );
}

#[test]

fn inval_and_setmap_make_changes_visible() {
    area(
        "inval",
        &[
            "MADV_INVAL writes no VPTE",
            "a new frame shows after MADV_INVAL",
            "a cleared RW faults after MADV_INVAL",
            "a cleared V faults after MADV_INVAL",
            "SETMAP with a new master drops translations",
        ],
    );
}

#[test]

fn system_calls_fault_window_pages_in() {
    area(
        "kernel",
        &[
            "read(2) into an untouched page",
            "write(2) from an untouched page",
            "read(2) across two pages",
        ],
    );
}

#[test]

fn a_1_tib_kernel_space_window_at_offset_512_gib() {
    area("kva", &["1 TiB window mapped", "scattered pages"]);
}

#[test]

fn scattered_pages_default_count() {
    area(
        "scatter",
        &["2000 scattered pages", "A set on all 2000 leaves"],
    );
}

#[test]

fn two_hundred_thousand_scattered_pages() {
    let out = run(vkrun()
        .args(["-m", "1G", "--"])
        .arg(bin("vpt-demo"))
        .args(["scatter", "200000"]));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_oks(
        &stdout,
        "scatter",
        &["200000 scattered pages", "A set on all 200000 leaves"],
    );
    // More scattered pages than vm.max_map_count allows: vkrun evicts, and
    // says so once, with the budget and how to raise it.
    let told: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("VMA budget"))
        .collect();
    assert_eq!(told.len(), 1, "{stderr}");
    assert!(
        told[0].contains("vm.max_map_count = ") && told[0].contains("sysctl -w vm.max_map_count="),
        "{stderr}"
    );
}

#[test]

fn threads_fault_concurrently_and_race_inval() {
    area(
        "threads",
        &[
            "4 threads fault concurrently",
            "reads stay right under MADV_INVAL",
            "no write lost under MADV_INVAL",
        ],
    );
}

#[test]

fn c_guest_builds_tables_by_hand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = workspace_root().join("guest-samples/c/vpt_demo.c");
    let strict = [
        "-std=c11",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-Wconversion",
        "-Wsign-conversion",
    ];
    let Some(exe) = compile_c(&src, dir.path(), &strict) else {
        return;
    };
    let out = run(vkrun().args(["-m", "64M", "--"]).arg(&exe));
    assert_eq!(
        text(&out.stdout),
        "vpt_demo.c: ok\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]

fn the_demo_runs_every_area() {
    let stdout = vpt_demo("64M", &[]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("vpt-demo: 64 MiB of guest RAM")),
        "{stdout}"
    );
    let areas = [
        "args",
        "dirperm",
        "alias",
        "readonly",
        "segv",
        "superpage",
        "inval",
        "kernel",
        "kva",
        "scatter",
        "threads",
    ];
    for name in areas {
        let prefix = format!("  {name} ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(" ok  ")),
            "no line for {name} in:\n{stdout}"
        );
    }
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("vpt-demo: all 11 areas pass (")),
        "{stdout}"
    );
}

/// Every `0x...` number in `line`.
fn hex_numbers(line: &str) -> impl Iterator<Item = u64> + '_ {
    line.match_indices("0x").filter_map(|(i, _)| {
        let digits: String = line[i + 2..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&digits, 16).ok()
    })
}

#[test]

fn alias_counts_and_traces_its_faults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("trace");
    let out = run(vkrun()
        .args(["--stats", "-e", "trace=faults", "-o"])
        .arg(&log_path)
        .args(["-m", "64M", "--"])
        .arg(bin("vpt-demo"))
        .arg("alias"));
    let stdout = text(&out.stdout);
    assert!(out.status.success() && !stdout.contains("FAIL"), "{stdout}");
    assert_oks(&stdout, "alias", &ALIAS);
    let base = stdout
        .lines()
        .find_map(|l| l.strip_prefix("alias: window at 0x"))
        .and_then(|rest| rest.split(',').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no window address in:\n{stdout}"));
    let log = std::fs::read_to_string(Path::new(&log_path)).expect("trace file");

    assert!(counter(&log, "vm.vpagetable_mmap") >= 1, "{log}");
    assert!(counter(&log, "vm.vpagetable_setmap") >= 1, "{log}");
    let faults = counter(&log, "vm.vpagetable_faults");
    assert!(faults >= 16, "16 pages, each touched: {log}");

    // One trace line per fault, naming the faulting address.
    let page = |a: u64| (a >= base && a < base + 16 * 4096).then(|| (a - base) / 4096);
    let fault_lines: Vec<&str> = log
        .lines()
        .filter(|l| hex_numbers(l).any(|a| page(a).is_some()))
        .collect();
    assert_eq!(fault_lines.len() as u64, faults, "{log}");
    for p in 0..16 {
        assert!(
            fault_lines
                .iter()
                .any(|l| hex_numbers(l).any(|a| page(a) == Some(p))),
            "no fault line for page {p} ({:#x}):\n{log}",
            base + p * 4096
        );
    }
}

/// The resolver threads of a guest process (blocked reading the agent's
/// userfaultfd, numbered 768 and up) and the CPUs each may run on.
fn resolvers(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let path = task.expect("task").path();
        let syscall = std::fs::read_to_string(path.join("syscall")).unwrap_or_default();
        let mut f = syscall.split_whitespace();
        let reads_agent_fd = f.next() == Some("0")
            && f.next()
                .and_then(|fd| u64::from_str_radix(fd.trim_start_matches("0x"), 16).ok())
                .is_some_and(|fd| fd >= 768);
        if !reads_agent_fd {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let tid = path
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .unwrap_or(0);
        out.push((tid, cpus));
    }
    out
}

/// A first-touch fault wakes every reader of the uffd; the resolver on the
/// faulting thread's CPU takes it, so no wake-up crosses CPUs: a guest
/// process with a window has one resolver kept on each CPU it may use
/// (`taskset -c 0`: one, on CPU 0).
#[test]
fn one_resolver_per_cpu_each_kept_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = workspace_root().join("tests/programs/window_hold.c");
    let Some(exe) = compile_c(&src, dir.path(), &[]) else {
        return;
    };
    // vkrun inherits this process's CPUs: one resolver each, or, beyond
    // eight, eight that the scheduler places.
    let ours = std::fs::read_to_string("/proc/self/status").expect("status");
    let ours = ours
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_owned();
    let cpus: Vec<String> = ours
        .split(',')
        .flat_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
            (a..=b).map(|c| c.to_string())
        })
        .collect();
    let all = if cpus.len() <= 8 { cpus } else { vec![ours; 8] };
    let pinned = vkrun_tests::require("taskset").map(|taskset| {
        let mut c = Command::new(taskset);
        c.args(["-c", "0"]).arg(bin("vkrun"));
        c
    });
    for (mut cmd, want) in [(vkrun(), all)]
        .into_iter()
        .chain(pinned.map(|c| (c, vec!["0".to_owned()])))
    {
        let mut child = cmd
            .arg("--")
            .arg(&exe)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn vkrun");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("read");
        let pid: i32 = line
            .strip_prefix("held ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("window_hold: {line:?}"));
        let found = resolvers(pid);
        drop(child.stdin.take());
        let status = child.wait().expect("wait");
        assert!(status.success(), "window_hold: {status}");
        let mut cpus: Vec<String> = found.iter().map(|(_, c)| c.clone()).collect();
        cpus.sort();
        let mut want = want;
        want.sort();
        assert_eq!(cpus, want, "resolvers (tid, CPUs): {found:?}");
    }
}
