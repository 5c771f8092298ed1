//! vmspace RUN and the rest of ABI section 7, end to end: each test runs
//! `vkrun -q -- vmspace-check AREA` and expects exit 0, every `ok AREA.CHECK`
//! line listed here, and no `FAIL` line (the guest checks itself; see
//! `guest-samples/vmspace-check`). Then: no `vkrun-vmspace` stub outlives a
//! guest killed (or exiting) while its threads are inside RUN, or a killed
//! vkrun; and the trace and `--stats` show the RUNs.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vkrun_tests::{DEADLINE, alive, bin, counter, eventually, run, text, vkrun, wait_deadline};

/// How RUN reaches the context: `vkrun --run=PATH`.
const PATHS: [&str; 2] = ["fast", "hypercall"];

/// Run `vmspace-check area` under vkrun with `--run=path`.
fn vmspace_check(area: &str, path: &str) -> Output {
    run(vkrun()
        .arg("-q")
        .arg(format!("--run={path}"))
        .arg("--")
        .arg(bin("vmspace-check"))
        .arg(area))
}

/// `vmspace-check area` passes on both paths of RUN (the guest library's
/// fast RUN and the hypercall): exit 0, no FAIL line, and `ok area.NAME`
/// for every name in `expected`.
fn check(area: &str, expected: &[&str]) {
    for path in PATHS {
        check_path(area, path, expected);
    }
}

fn check_path(area: &str, path: &str, expected: &[&str]) {
    let area_path = format!("{area} (--run={path})");
    let out = vmspace_check(area, path);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let fails: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.is_empty(),
        "vmspace-check {area_path} failed:\n{}\nstderr:\n{stderr}",
        fails.join("\n")
    );
    let missing: Vec<String> = expected
        .iter()
        .map(|name| format!("ok {area}.{name}"))
        .filter(|line| !stdout.lines().any(|l| l == line))
        .collect();
    assert!(
        missing.is_empty(),
        "vmspace-check {area_path}: missing lines:\n{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        missing.join("\n")
    );
    let prefix = format!("ok {area}.");
    let extra: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|n| !expected.contains(&n))
        })
        .collect();
    assert!(
        extra.is_empty(),
        "vmspace-check {area_path}: lines this test does not know:\n{}",
        extra.join("\n")
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "vmspace-check {area_path} exit status; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

#[test]
fn errors_follow_section_7() {
    check(
        "errors",
        &[
            "enoent.vmspace_destroy",
            "enoent.vmspace_ctl",
            "enoent.vmspace_mmap",
            "enoent.vmspace_munmap",
            "enoent.vmspace_mcontrol",
            "enoent.vmspace_pread",
            "enoent.vmspace_pwrite",
            "enoent.destroyed",
            "null-id.vmspace_create",
            "null-id.vmspace_destroy",
            "null-id.vmspace_ctl",
            "null-id.vmspace_mmap",
            "null-id.vmspace_munmap",
            "null-id.vmspace_mcontrol",
            "null-id.vmspace_pread",
            "null-id.vmspace_pwrite",
            "eexist",
            "ctl-cmd.0",
            "ctl-cmd.2",
            "ctl-cmd.-1",
            "ctl-cmd.256",
            "efault.tf-null",
            "efault.tf-8",
            "efault.tf-unmapped",
            "efault.tf-into-unmapped",
            "efault.tf-kernel",
            "efault.tf-partial-untouched",
            "efault.vf-null",
            "efault.vf-8",
            "efault.vf-unmapped",
            "efault.vf-into-unmapped",
            "efault.tf-untouched",
            "efault.caller-intact",
            "prw-flags.pread-0x1",
            "prw-flags.pwrite-0x1",
            "prw-flags.pread-0xffffffff",
            "prw-flags.pwrite-0xffffffff",
            "prw-flags.pread-0x100",
            "prw-flags.pwrite-0x100",
            "munmap.zero-length",
            "munmap.wrap",
            "munmap.wrap-high",
            "munmap.end-beyond-user-max",
            "munmap.at-user-max",
            "munmap.not-entirely-mapped",
            "munmap.nothing-mapped",
            "munmap.failed-call-unmaps-nothing",
            "munmap.page-offset-folded",
            "munmap.ok",
            "mmap.vpt-private",
            "mmap.vpt-other-fd",
            "mmap.vpt-no-fd",
            "mmap.vpt-read-only",
            "mmap.vpt-write-only",
            "mmap.vpt-prot-none",
            "mmap.vpt-map-stack",
            "mmap.vpt-zero-length",
            "mmap.linear-zero-length",
            "mmap.anon-zero-length",
            "mmap.end-beyond-user-max",
            "mmap.at-user-max",
            "mmap.wrap",
            "mmap.linear-fixed",
            "mmap.linear-anywhere",
            "mmap.anon-fixed",
            "mmap.anon-anywhere",
            "mmap.vpt-big-offset",
            "mmap.last-user-page",
            "mcontrol.setmap-linear",
            "mcontrol.setmap-mixed",
            "mcontrol.behav.0-9",
            "mcontrol.behav.12",
            "mcontrol.behav.13",
            "mcontrol.behav.100",
            "mcontrol.behav.-1",
            "mcontrol.wrap",
            "mcontrol.end-beyond-user-max",
            "mcontrol.unmapped-skipped",
            "mcontrol.inval-window",
            "ebusy",
            "ebusy.signal-ends-run",
            "ebusy.destroy-after",
        ],
    );
}

#[test]
fn run_round_trips_registers_and_sanitises_the_frame() {
    check(
        "regs",
        &[
            "syscall.trapno",
            "syscall.err",
            "syscall.rip",
            "syscall.rcx",
            "syscall.r11",
            "gprs",
            "rflags.sanitised",
            "rflags.frame",
            "rflags.zero",
            "selectors.0x23-0x2b",
            "selectors.0x8-0x10",
            "selectors.0x0-0x0",
            "selectors.0xffff-0xffff",
            "tls.fs-base",
            "tls.gs-base",
            "tls.per-run",
            "tls.non-canonical",
            "fpu.xmm0-kept",
        ],
    );
}

#[test]
fn every_trap_kind_comes_back_to_the_vkernel() {
    check(
        "traps",
        &[
            "syscall",
            "syscall-335",
            "int3",
            "int3.resume",
            "ud2",
            "hlt",
            "cli",
            "mov-from-cr0",
            "divide",
            "int80",
            "int80.resume",
            "pagefault.read",
            "pagefault.write",
            "pagefault.fetch",
            "pagefault.write-readonly",
            "pagefault.read-restarts",
            "pagefault.write-restarts",
            "pagefault.fetch-restarts",
        ],
    );
}

#[test]
fn user_code_demand_pages_through_a_vpagetable_window() {
    check(
        "paging",
        &[
            "demand.faults",
            "demand.sum",
            "demand.writes",
            "demand.accessed-modified",
            "readonly.read",
            "readonly.accessed-not-modified",
            "readonly.write-faults",
            "readonly.no-m-on-failed-write",
            "readonly.upgrade-restarts",
            "nx.fetch-faults",
            "nx.exec-after-clear",
            "inval.writes-no-vpte",
            "inval.new-frame-visible",
            "setmap.new-master",
            "beyond-ram",
        ],
    );
}

#[test]
fn user_code_never_reaches_the_host() {
    check(
        "isolation",
        &[
            "open.trapped",
            "open.no-file",
            "openat.no-file",
            "int80-open.no-file",
            "exit_group.trapped",
            "exit_group.alive",
            "int80-exit.trapped",
            "int80-exit.alive",
            "hypercall.trapped",
            "guest-memory-invisible",
            "above-user-max.syscalls-trapped",
        ],
    );
    // The guest removes a file it finds; none of its name may be left.
    let left: Vec<String> = std::fs::read_dir("/tmp")
        .expect("/tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vkrun-isolation-"))
        .collect();
    assert!(left.is_empty(), "files created by user code: {left:?}");
}

#[test]
fn a_signal_ends_run_and_run_continues() {
    let mut names = Vec::new();
    for kind in ["sa-restart", "no-sa-restart"] {
        for check in [
            "returns-0",
            "trapno-0",
            "progress",
            "handler-once",
            "rerun-continues",
            "second-signal",
            "handler-once-again",
            "no-extra-handler",
        ] {
            names.push(format!("{kind}.{check}"));
        }
    }
    // A signal without a handler (SIGCHLD, SIGWINCH) leaves RUN running.
    names.push("ignored.keeps-running".to_owned());
    // A signal storm against back-to-back RUNs: each RUN returns its own
    // frame or EINTR, never an earlier call's.
    names.push("storm.consistent".to_owned());
    names.push("storm.interrupted".to_owned());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    check("signals", &names);
}

#[test]
fn threads_have_their_own_contexts_and_vmspaces_are_isolated() {
    check(
        "threads",
        &[
            "same-vmspace.concurrent",
            "same-vmspace.counters",
            "same-vmspace.own-registers",
            "fpu-per-thread",
            "vmspaces.linear",
            "vmspaces.anon",
            "vmspaces.pread",
            "vmspaces.mapping-absent",
            "calls-beside-run",
        ],
    );
}

#[test]
fn pread_and_pwrite_walk_mappings_and_tables() {
    check(
        "prw",
        &[
            "linear.pread",
            "linear.pwrite",
            "linear.short-read",
            "linear.short-write",
            "linear.readonly-pwrite",
            "unmapped",
            "zero-length",
            "window.pread",
            "window.pread-sets-a",
            "window.pwrite",
            "window.pwrite-sets-a-m",
            "window.readonly-pwrite",
            "window.short-read",
            "window.short-write",
        ],
    );
}

#[test]
fn a_forked_guest_shares_the_registry() {
    check(
        "fork",
        &[
            "child.exit",
            "child.sees-parent-vmspace",
            "child.shares-registry",
            "child.runs-parent-vmspace",
            "child.creates",
            "child-vmspace-survives-child",
            "parent-destroys-child-vmspace",
            "parent-runs-after-child",
        ],
    );
}

#[test]
fn all_areas_pass_in_one_guest() {
    for path in PATHS {
        all_areas_pass_on(path);
    }
}

fn all_areas_pass_on(path: &str) {
    let out = vmspace_check("all", path);
    let stdout = text(&out.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("vmspace-check: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    let oks: u32 = summary
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(oks > 0, "no check ran: {summary}");
    assert!(
        summary.ends_with(" ok, 0 failed"),
        "--run={path}: {summary}\n{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn without_vkrun_it_says_it_is_not_supervised() {
    let out = run(std::process::Command::new(bin("vmspace-check")).arg("traps"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "vk_info: Function not implemented\n");
    assert_eq!(text(&out.stdout), "");
    let out = run(std::process::Command::new(bin("vmspace-check")).arg("bogus"));
    assert_eq!(out.status.code(), Some(2));
}

// Cleanup: guests killed or exiting while their threads are inside RUN.

/// The comm of process `pid`, if it exists.
fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// vkrun's children named `vkrun-vmspace`: the stubs.
fn stubs(vkrun_pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{vkrun_pid}/task")) else {
        return out;
    };
    for task in tasks.filter_map(|t| t.ok()) {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|p| comm(*p).as_deref() == Some("vkrun-vmspace")),
        );
    }
    out
}

/// Whether stub `pid` still exists as a `vkrun-vmspace` process (a pid
/// reused by something else does not count).
fn stub_alive(pid: i32) -> bool {
    alive(pid) && comm(pid).as_deref() == Some("vkrun-vmspace")
}

/// Every process on the machine named `vkrun-vmspace` (for the messages).
fn all_stubs() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| stub_alive(*p))
        .collect()
}

/// Start `vkrun vmspace-check sub` (hold-run or exit-running) and wait for
/// `running PID`: the child, the guest's pid and its stubs.
fn hold(sub: &str) -> (Child, i32, Vec<i32>) {
    let mut child = vkrun()
        .arg("-q")
        .arg("--")
        .arg(bin("vmspace-check"))
        .arg(sub)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vkrun");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmspace-check {sub} did not start running within 30 s");
        }
    };
    let guest = line
        .strip_prefix("running ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmspace-check {sub}: unexpected first line: {line}")
        });
    let stubs = stubs(child.id());
    (child, guest, stubs)
}

fn assert_stubs_gone(stubs: &[i32], what: &str) {
    assert!(
        eventually(Duration::from_secs(5), || !stubs
            .iter()
            .any(|s| stub_alive(*s))),
        "vkrun-vmspace stubs {stubs:?} outlived {what}; vkrun-vmspace processes now: {:?}",
        all_stubs()
    );
}

/// The host mappings of `[va, va + len)` in process `pid`: `(start, end,
/// perms)` per line of `/proc/PID/maps`, clipped to the range.
fn maps_in(pid: i32, va: u64, len: u64) -> Vec<(u64, u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("stub maps");
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let (s, e) = (
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            );
            let (s, e) = (s.max(va), e.min(va + len));
            (s < e).then(|| (s, e, f.next().unwrap_or_default().to_owned()))
        })
        .collect()
}

/// A vmspace's window pages are `PROT_NONE` in its stub until installed,
/// so that a first touch raises `SIGSEGV` in the execution context itself
/// (which reports it, as it reports a system call) instead of waiting in a
/// userfaultfd for another vkrun thread: the page whose VPTE was valid is
/// a shared mapping of RAM, the one whose walk failed (RUN returned
/// `T_PAGEFLT`) and the untouched ones are inaccessible.
#[test]
fn a_vmspace_window_is_inaccessible_in_its_stub_until_installed() {
    let mut child = vkrun()
        .args(["-q", "--"])
        .arg(bin("vmspace-check"))
        .arg("hold-window")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vkrun");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let stubs = stubs(child.id());
    let seen = line
        .strip_prefix("window ")
        .and_then(|w| w.trim().split_once(' '))
        .and_then(|(va, pages)| {
            let va = u64::from_str_radix(va.strip_prefix("0x")?, 16).ok()?;
            Some((va, pages.parse::<u64>().ok()? * 4096))
        })
        .zip(stubs.first())
        .map(|((va, len), stub)| (va, maps_in(*stub, va, len)));
    drop(child.stdin.take());
    let status = wait_deadline(&mut child, DEADLINE);
    let (va, maps) = seen.unwrap_or_else(|| panic!("hold-window: {line:?}, stubs {stubs:?}"));
    assert_eq!(status.code(), Some(0), "vmspace-check hold-window");
    let installed = (va + 0x2000, va + 0x3000);
    for (s, e, perms) in &maps {
        if (*s, *e) == installed {
            assert_eq!(perms, "rwxs", "the page installed (RW, no NX): {maps:x?}");
        } else {
            assert!(
                *e <= installed.0 || *s >= installed.1,
                "the installed page is one mapping: {maps:x?}"
            );
            assert_eq!(perms, "---p", "pages not installed: {maps:x?}");
        }
    }
    let covered: u64 = maps.iter().map(|(s, e, _)| e - s).sum();
    assert_eq!(covered, 8 * 4096, "the whole window is mapped: {maps:x?}");
    assert!(
        maps.iter().any(|m| (m.0, m.1) == installed),
        "page 2 installed: {maps:x?}"
    );
}

#[test]
fn sigkill_of_the_guest_inside_run_leaves_no_stub() {
    let (mut child, guest, stubs) = hold("hold-run");
    assert_eq!(stubs.len(), 2, "one stub per vmspace: {stubs:?}");
    kill(Pid::from_raw(guest), Signal::SIGKILL).expect("kill guest");
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(status.code(), Some(128 + 9), "vkrun reports the SIGKILL");
    assert_stubs_gone(&stubs, "the guest killed inside RUN");
}

#[test]
fn sigkill_of_vkrun_inside_run_leaves_no_stub() {
    let (mut child, guest, stubs) = hold("hold-run");
    assert_eq!(stubs.len(), 2, "one stub per vmspace: {stubs:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill vkrun");
    wait_deadline(&mut child, DEADLINE);
    assert_stubs_gone(&stubs, "vkrun killed while the guest was inside RUN");
    assert!(
        eventually(Duration::from_secs(5), || !alive(guest)),
        "the guest {guest} outlived vkrun"
    );
}

#[test]
fn a_guest_exiting_inside_run_leaves_no_stub() {
    let (mut child, _guest, stubs) = hold("exit-running");
    assert_eq!(stubs.len(), 2, "one stub per vmspace: {stubs:?}");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("tell the guest to exit");
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(status.code(), Some(0), "the guest's exit status");
    assert_stubs_gone(
        &stubs,
        "the guest exiting while its threads were inside RUN",
    );
}

#[test]
fn a_stub_killed_inside_run_makes_run_fail_with_eio() {
    let mut child = vkrun()
        .arg("-q")
        .arg("--")
        .arg(bin("vmspace-check"))
        .arg("stub-death")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vkrun");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the guest starts running");
    assert!(first.starts_with("running "), "{first}");
    let stubs = stubs(child.id());
    assert_eq!(stubs.len(), 1, "one vmspace: {stubs:?}");
    kill(Pid::from_raw(stubs[0]), Signal::SIGKILL).expect("kill the stub");
    let ended = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("RUN returns after its stub died");
    assert_eq!(ended, "run ended: EIO 5 (Input/output error)");
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(status.code(), Some(0), "the guest goes on and exits");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("died"), "vkrun says why: {err}");
}

#[test]
fn a_guest_process_dying_inside_run_ends_its_contexts() {
    // The guest lives on (the shell), so the vmspaces stay; the contexts
    // of the killed process must stop running its user code.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let check = bin("vmspace-check");
    let script = format!(
        r#"{check} hold-run > {out} &
victim=$!
for i in $(seq 100); do grep -q running {out} && break; sleep 0.1; done
kill -9 $victim
stubs=$(pgrep -P $PPID -x vkrun-vmspace)
echo "stubs $(echo $stubs | wc -w)"
for i in $(seq 50); do
  busy=0
  for p in $stubs; do [ "$(ls /proc/$p/task | wc -l)" -gt 1 ] && busy=1; done
  [ $busy = 0 ] && break
  sleep 0.1
done
echo "busy $busy""#,
        check = check.display(),
        out = out.display()
    );
    let res = run(vkrun().args(["-q", "--", "sh", "-c", &script]));
    assert_eq!(
        text(&res.stdout),
        "stubs 2\nbusy 0\n",
        "{}",
        text(&res.stderr)
    );
}

#[test]
fn sigkill_of_the_guest_while_faults_are_in_flight_leaves_no_stub() {
    // vmspace-demo bench-vpt touches pages whose VPTEs it prefilled: every
    // touch is a fault the host resolves (walk, install through the stub's
    // agent) while the RUN is in flight.
    let mut child = vkrun()
        .args(["-q", "-m", "2G", "--"])
        .arg(bin("vmspace-demo"))
        .args(["bench-vpt", "400000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vkrun");
    let vkrun_pid = child.id();
    assert!(
        eventually(Duration::from_secs(20), || stubs(vkrun_pid).len() == 1),
        "the vmspace's stub appears"
    );
    let stubs_now = stubs(vkrun_pid);
    // Faults are flowing once the stub maps RAM pages (its RSS grows).
    let rss = |pid: i32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let start = rss(stubs_now[0]);
    assert!(
        eventually(Duration::from_secs(30), || rss(stubs_now[0]) > start + 1024),
        "the stub's RSS grows as faults install pages"
    );
    let guest = std::fs::read_to_string(format!("/proc/{vkrun_pid}/task/{vkrun_pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| comm(*p).as_deref() == Some("vmspace-demo"))
        .expect("the guest is running");
    kill(Pid::from_raw(guest), Signal::SIGKILL).expect("kill the guest");
    let status = wait_deadline(&mut child, DEADLINE);
    assert_eq!(status.code(), Some(128 + 9), "vkrun reports the SIGKILL");
    assert_stubs_gone(&stubs_now, "the guest killed while faults were in flight");
}

// The trace and the counters.

#[test]
fn trace_shows_each_run_and_how_it_ended() {
    let out = run(vkrun()
        .args(["-e", "trace=runs", "--"])
        .arg(bin("vmspace-check"))
        .arg("traps"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    // The traps area uses vmspace id 0x7e577a95.
    let runs: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vmspace_ctl(0x7e577a95"))
        .collect();
    assert!(!runs.is_empty(), "no vmspace_ctl line with the id:\n{err}");
    // A system call exit names the call the user code asked for.
    assert!(
        runs.iter()
            .any(|l| l.contains("T_FAST_SYSCALL rax=0 (read) rip=0x")),
        "no T_FAST_SYSCALL exit with rax and its name:\n{err}"
    );
    assert!(
        runs.iter().any(|l| l
            .split_once("T_PAGEFLT addr=0x")
            .is_some_and(|(_, rest)| rest.contains(" err="))),
        "no T_PAGEFLT exit with addr and err:\n{err}"
    );
    for trap in [
        "T_BPTFLT",
        "T_PRIVINFLT",
        "T_PROTFLT",
        "T_DIVIDE",
        "T_SYSCALL80",
    ] {
        assert!(
            runs.iter().any(|l| l.contains(trap)),
            "no {trap} exit:\n{err}"
        );
    }
}

/// A walk that fails in a vmspace window is traced as what it becomes, a
/// `T_PAGEFLT` exit of RUN, not as a signal nobody gets.
#[test]
fn failed_walks_in_a_vmspace_trace_as_t_pageflt() {
    let out = run(vkrun()
        .args(["-e", "trace=faults", "--"])
        .arg(bin("vmspace-check"))
        .arg("paging"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    let faults: Vec<&str> = err.lines().filter(|l| l.contains("] fault(0x")).collect();
    assert!(
        faults.iter().any(|l| l.contains(") = T_PAGEFLT (")),
        "no failed walk traced as T_PAGEFLT:\n{err}"
    );
    assert!(
        !faults.iter().any(|l| l.contains("= SIGSEGV")),
        "a vmspace fault traced as SIGSEGV:\n{err}"
    );
}

/// A RUN whose user code faults is traced as strace traces a call that other
/// lines interrupt: `vmspace_ctl(... <unfinished ...>`, the fault lines,
/// then `<... vmspace_ctl resumed>) = 0 (T_...)`, each unfinished call
/// resumed exactly once, by its own task.
#[test]
fn runs_with_faults_inside_trace_as_unfinished_and_resumed() {
    let out = run(vkrun()
        .args(["-e", "trace=runs,faults", "--"])
        .arg(bin("vmspace-check"))
        .arg("paging"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    let mut open: std::collections::HashMap<String, usize> = Default::default();
    let (mut unfinished, mut resumed) = (0, 0);
    for line in err.lines() {
        let Some((pid, rest)) = line.split_once("] ") else {
            continue;
        };
        if rest.starts_with("vmspace_ctl(") && rest.ends_with(" <unfinished ...>") {
            *open.entry(pid.to_owned()).or_default() += 1;
            unfinished += 1;
        } else if let Some(result) = rest.strip_prefix("<... vmspace_ctl resumed>) ") {
            let n = open.entry(pid.to_owned()).or_default();
            assert!(*n > 0, "resumed without an unfinished call: {line}\n{err}");
            *n -= 1;
            resumed += 1;
            assert!(result.starts_with("= "), "{line}");
        }
    }
    assert!(unfinished > 0, "no RUN with a fault inside:\n{err}");
    assert_eq!(unfinished, resumed, "{err}");
}

#[test]
fn stats_count_runs_and_their_exits() {
    let out = run(vkrun()
        .args(["-q", "--stats", "--"])
        .arg(bin("vmspace-check"))
        .arg("traps"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stats = text(&out.stderr);
    let runs = counter(&stats, "vkrun.runs");
    let syscall = counter(&stats, "vkrun.run_exits.syscall");
    let pagefault = counter(&stats, "vkrun.run_exits.pagefault");
    let trap = counter(&stats, "vkrun.run_exits.trap");
    assert!(
        runs > 0 && syscall > 0 && pagefault > 0 && trap > 0,
        "{stats}"
    );
    assert!(
        syscall + pagefault + trap + counter(&stats, "vkrun.run_exits.signal") <= runs,
        "more exits than RUNs:\n{stats}"
    );

    let out = run(vkrun()
        .args(["-q", "--stats", "--"])
        .arg(bin("vmspace-check"))
        .arg("signals"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let stats = text(&out.stderr);
    assert!(counter(&stats, "vkrun.run_exits.signal") >= 4, "{stats}");
}

/// With `--run=fast` the library's `vmspace_ctl()` takes the fast RUN
/// (vkrun is asked once per thread and vmspace, and only a fault's retry is
/// a hypercall, so the RUNs outnumber the `vmspace_ctl` hypercalls), and
/// the RUNs it makes are still counted, with their exits; the default
/// (`--run=hypercall`) and a trace of RUNs make every RUN a hypercall (one
/// more `vmspace_ctl` per process: the library's question, refused).
#[test]
fn the_fast_run_is_taken_unless_runs_are_traced_or_refused() {
    let stats_of = |options: &[&str]| {
        let out = run(vkrun()
            .args(["-q", "--stats"])
            .args(options)
            .arg("--")
            .arg(bin("vmspace-check"))
            .arg("traps"));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
        let stats = text(&out.stderr);
        let runs = counter(&stats, "vkrun.runs");
        let exits: u64 = ["syscall", "pagefault", "trap", "signal"]
            .iter()
            .map(|k| counter(&stats, &format!("vkrun.run_exits.{k}")))
            .sum();
        (
            runs,
            exits,
            counter(&stats, "vkrun.hypercalls.vmspace_ctl"),
            stats,
        )
    };
    let (fast_runs, fast_exits, fast_calls, stats) = stats_of(&["--run=fast"]);
    assert!(
        fast_runs >= 10 && fast_calls < fast_runs,
        "the fast RUN was not taken: {fast_runs} RUNs, {fast_calls} vmspace_ctl hypercalls\n{stats}"
    );
    assert_eq!(
        fast_exits, fast_runs,
        "every fast RUN's exit counted:\n{stats}"
    );
    for options in [
        &[][..],
        &["--run=hypercall"][..],
        &["--run=fast", "-e", "trace=runs"][..],
    ] {
        let (runs, exits, calls, stats) = stats_of(options);
        assert_eq!(runs, fast_runs, "{options:?}: the same RUNs\n{stats}");
        assert_eq!(exits, runs, "{options:?}\n{stats}");
        assert!(
            calls > runs,
            "{options:?}: every RUN a hypercall: {runs} RUNs, {calls} vmspace_ctl\n{stats}"
        );
    }
}

/// Under a signal storm every RUN's trace line says how the call ended, in
/// strace's words: a trap, `-1 EINTR` (taken back before the user code
/// started), or `? ERESTARTSYS` (withdrawn before vkrun posted it).
#[test]
fn interrupted_runs_are_traced_as_strace_would() {
    let out = run(vkrun()
        .args(["-q", "-e", "trace=runs", "--"])
        .arg(bin("vmspace-check"))
        .arg("signals"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let trace = text(&out.stderr);
    let runs: Vec<&str> = trace
        .lines()
        // A RUN that other threads' lines interrupt ends in its resumed
        // half (`<... vmspace_ctl resumed>) = ...`).
        .filter(|l| {
            l.contains("vmspace_ctl(") && !l.ends_with(" <unfinished ...>")
                || l.contains("<... vmspace_ctl resumed>) ")
        })
        .collect();
    let odd: Vec<&&str> = runs
        .iter()
        .filter(|l| {
            !(l.contains(") = 0 (T_")
                || l.ends_with(") = -1 EINTR (Interrupted system call)")
                || l.ends_with(") = ? ERESTARTSYS (To be restarted if SA_RESTART is set)"))
        })
        .collect();
    assert!(odd.is_empty(), "unexpected RUN lines: {odd:#?}");
    // The rounds end spinning RUNs by signals, the storm's RUNs mostly end
    // at their `syscall`: both exits must be there, each named.
    for exit in [") = 0 (T_SIGNAL", ") = 0 (T_FAST_SYSCALL"] {
        assert!(
            runs.iter().any(|l| l.contains(exit)),
            "no RUN line with {exit:?} among {}",
            runs.len()
        );
    }
    let interrupted = runs.iter().filter(|l| !l.contains(") = 0 (T_")).count();
    assert!(
        interrupted > 0,
        "no interrupted RUN among {} traced",
        runs.len()
    );
}

/// User code scribbles random and crafted values over every page vkrun
/// keeps above `USER_MAX` in its stub (seeded), while another thread RUNs
/// and demand-pages another vmspace: every RUN returns within 7 s, as a
/// store, a fault, a trap or `EIO`; the other vmspace and the guest's own
/// hypercalls are untouched.
#[test]
fn user_code_scribbling_over_its_stub_breaks_nothing_else() {
    check(
        "hostile-scribble",
        &["bounded", "outcomes", "bystander", "guest"],
    );
}

/// User code that ignores vkrun's kick (a forged `rt_sigreturn` blocking
/// it, a loop clearing every kick word, a jump into the handler's wait
/// loop): a signal still ends the RUN within vkrun's bound (5 s, then
/// `EIO`), and meanwhile another guest thread forks and RUNs another
/// vmspace in under 100 ms each: the tracer thread never waits on a
/// context.
#[test]
fn user_code_ignoring_the_kick_stalls_nothing_else() {
    let mut names = Vec::new();
    for attack in ["blocked", "cleared", "wait-loop"] {
        for check in ["started", "bounded", "others-go-on"] {
            names.push(format!("{attack}.{check}"));
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    check("kick-ignore", &names);
}

/// User code that keeps storing 0 over the word by which its stub's agent
/// says a batch is done, while another context touches window pages vkrun
/// must install: vkrun asks the kernel whether the agent waits for the next
/// batch, so every install still comes back within 1 s (before: 10 s, then
/// the stub was killed).
#[test]
fn user_code_forging_the_agents_answer_delays_installs_by_one_poll_at_most() {
    check("agent-forge", &["attacking", "installs"]);
}

/// A hostile guest: thousands of hypercalls with random hostile arguments
/// from two threads at once, under a rain of signals (`vmspace-check fuzz`,
/// three seeds). Every call returns an expected
/// error or succeeds, no stub dies (that would show as `EIO` and a warning),
/// some RUNs do run user code, and vkrun exits with the guest's status.
#[test]
fn random_hostile_hypercalls_leave_vkrun_standing() {
    for seed in ["1", "2", "3"] {
        let out = run(vkrun()
            .args(["--stats", "--"])
            .arg(bin("vmspace-check"))
            .args(["fuzz", seed, "3000"]));
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "fuzz seed {seed}:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("fuzz: 6000 calls"),
            "fuzz seed {seed}: no summary:\n{stdout}"
        );
        // RUNs that returned 0 were checked against the ABI's trap rules;
        // some must have done so (else the checks saw nothing).
        assert!(
            stdout.contains("fuzz: RUN exits by tf_trapno: 0x"),
            "fuzz seed {seed}: no RUN returned 0 with its frame:\n{stdout}"
        );
        assert!(
            !stderr.contains("WARN"),
            "fuzz seed {seed}: vkrun warned:\n{stderr}"
        );
        assert!(
            counter(&stderr, "vkrun.runs") > 0,
            "fuzz seed {seed}: no RUN ran user code:\n{stderr}"
        );
    }
}
