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
            // Not the process class: its first line (sh's exec) would come
            // before sh prints its pid.
            &["-e", "trace=vk_info", "-o", "/dev/null"],
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

// Killing vkrun at random moments, and many vkruns at once.

/// Every descendant of `pid` (children of all its threads, recursively),
/// with its comm, so that a reused pid is not taken for a survivor.
fn descendants(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.filter_map(|t| t.ok()) {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if let Some(comm) = comm(c) {
                    out.push((c, comm));
                    todo.push(c);
                }
            }
        }
    }
    out
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// Whether `pid` still runs as the process `comm` named (not a zombie, not
/// a reused pid).
fn still_there(pid: i32, was: &str) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = state
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    alive(pid) && !zombie && comm(pid).as_deref() == Some(was)
}

/// `Shmem:` of /proc/meminfo in KiB (guest RAM memfds are counted there).
fn shmem_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// xorshift64*, seeded: the moments can be replayed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// SIGKILL of vkrun at 100 random moments (seeded) while its guest runs a
/// RUN and fault storm (`vmspace-check all`: RUNs from several threads,
/// demand paging, forks, signals) or faults in its own windows
/// (`vpt-demo`, every area): each time, every process vkrun had made (the guest, its
/// children, the vmspace stubs) is gone within 5 s, and the shared memory
/// of the machine has not grown once all are gone.
#[test]
fn sigkill_of_vkrun_at_random_moments_leaves_nothing_behind() {
    let shmem_before = shmem_kib();
    let mut rng = 0x5eed_0000_0000_0001u64;
    let mut left = Vec::new();
    for round in 0..100 {
        let guest: (_, &[&str]) = if round % 3 == 2 {
            (bin("vpt-demo"), &[])
        } else {
            (bin("vmspace-check"), &["all"])
        };
        let mut child = vkrun()
            .args(["-q", "--"])
            .arg(&guest.0)
            .args(guest.1)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vkrun");
        let delay = Duration::from_millis(5 + next(&mut rng) % 400);
        std::thread::sleep(delay);
        let made = descendants(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        let gone = eventually(Duration::from_secs(5), || {
            !made.iter().any(|(p, c)| still_there(*p, c))
        });
        if !gone {
            let survivors: Vec<_> = made.iter().filter(|(p, c)| still_there(*p, c)).collect();
            left.push(format!("round {round} ({delay:?}): {survivors:?}"));
            for (p, _) in survivors {
                let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
            }
        }
    }
    assert!(left.is_empty(), "processes outlived vkrun: {left:#?}");
    // Other tests may run meanwhile: allow them their RAM, not 100 leaks.
    let grown = eventually(Duration::from_secs(5), || {
        shmem_kib() <= shmem_before + 64 * 1024
    });
    assert!(
        grown,
        "shared memory grew from {shmem_before} KiB to {} KiB",
        shmem_kib()
    );
}

/// Eight vkruns at once for 30 s, each running RUN and fault storms over
/// and over (`vmspace-check all`, `vpt-demo` with every area): every run is
/// correct.
#[test]
fn eight_vkruns_at_once_for_30_s_all_correct() {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let workers: Vec<_> = (0..8)
        .map(|k| {
            std::thread::spawn(move || {
                let mut runs = 0u32;
                let mut bad = Vec::new();
                while std::time::Instant::now() < until {
                    let (guest, args, want): (_, &[&str], _) = if (runs + k).is_multiple_of(2) {
                        (bin("vmspace-check"), &["all"], " ok, 0 failed")
                    } else {
                        (bin("vpt-demo"), &[], "vpt-demo: all 11 areas pass")
                    };
                    let child = vkrun()
                        .args(["-q", "--"])
                        .arg(&guest)
                        .args(args)
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("spawn vkrun");
                    let out = wait_output(child, Duration::from_secs(120));
                    let stdout = text(&out.stdout);
                    if out.status.code() != Some(0)
                        || !stdout.contains(want)
                        || stdout.lines().any(|l| l.starts_with("FAIL"))
                    {
                        bad.push(format!(
                            "{} all: {:?}\n{stdout}{}",
                            guest.display(),
                            out.status,
                            text(&out.stderr)
                        ));
                    }
                    runs += 1;
                }
                (runs, bad)
            })
        })
        .collect();
    let mut total = 0;
    let mut bad = Vec::new();
    for w in workers {
        let (runs, b) = w.join().expect("worker");
        total += runs;
        bad.extend(b);
    }
    assert!(
        bad.is_empty(),
        "{} of {total} runs failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(total >= 8, "only {total} runs in 30 s");
}
