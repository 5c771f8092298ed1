//! Programs nobody here wrote behave under vkrun exactly as they do natively:
//! same stdout, same exit status.

use std::process::Command;

use vkrun_tests::{assert_transparent, require, run, shell_code, text, vkrun};

#[test]
fn shell_scripts_with_pipes_and_subshells() {
    let script = r#"
        for i in 3 1 2; do echo "line $i"; done | sort | (read first; echo "first=$first"; cat)
        x=$( (echo inner; exit 3); echo "sub=$?" )
        echo "$x"
        echo abc | tr a-c x-z
        (exit 4) || echo "or-branch $?"
        seq 1 2000 | head -3
        yes | head -c 10000 | wc -c
        exit 7
    "#;
    let out = assert_transparent("/bin/sh", &["-c", script]);
    assert!(text(&out.stdout).contains("first=line 1"));
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn busybox_applets() {
    let Some(busybox) = require("busybox") else {
        return;
    };
    let bb = busybox.to_str().expect("utf-8 path").to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let numbers: String = (0..500)
        .map(|i| format!("{}\n", (i * 7919) % 1000))
        .collect();
    std::fs::write(&data, numbers).expect("write");
    let data = data.to_str().expect("utf-8").to_owned();
    for args in [
        vec!["echo", "hello", "world"],
        vec!["sha256sum", &data],
        vec!["sort", "-n", &data],
        vec!["wc", "-l", &data],
        vec!["expr", "6", "*", "7"],
        vec!["false"],
        vec![
            "sh",
            "-c",
            "i=0; while [ $i -lt 50 ]; do i=$((i+1)); done; echo $i | cat; exit 3",
        ],
        vec!["ls", "-R", "/usr/share/doc/busybox-static"],
    ] {
        assert_transparent(&bb, &args);
    }
}

#[test]
fn python_threads_and_subprocess() {
    let Some(python) = require("python3") else {
        return;
    };
    let code = r#"
import subprocess, sys, threading
results = []
lock = threading.Lock()
def work(n):
    s = sum(i * i for i in range(20000 * n))
    with lock:
        results.append((n, s))
threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 9)]
for t in threads: t.start()
for t in threads: t.join()
print(sorted(results))
out = subprocess.run(["sh", "-c", "echo from-child; exit 5"], capture_output=True, text=True)
print(out.stdout.strip(), out.returncode)
print(subprocess.check_output([sys.executable, "-c", "print(6 * 7)"]).decode().strip())
sys.exit(3)
"#;
    let out = assert_transparent(python.to_str().expect("utf-8"), &["-c", code]);
    assert!(text(&out.stdout).contains("from-child 5"));
}

const PTHREAD_PROGRAM: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
static long sums[8];
static void *work(void *arg) {
    long n = (long)arg, s = 0;
    for (long i = 0; i < 1000000; i++) s += i % (n + 2);
    sums[n] = s;
    return NULL;
}
int main(void) {
    pthread_t t[8];
    for (long i = 0; i < 8; i++) pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 8; i++) printf("%d %ld\n", i, sums[i]);
    pid_t child = fork();
    if (child == 0) { execlp("sh", "sh", "-c", "echo exec-ok; exit 9", (char *)0); _exit(99); }
    int st; waitpid(child, &st, 0);
    printf("child %d\n", WEXITSTATUS(st));
    return 12;
}
"#;

#[test]
fn gcc_compiles_and_runs_a_pthread_program_under_vkrun() {
    let Some(gcc) = require("gcc") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("prog.c");
    std::fs::write(&src, PTHREAD_PROGRAM).expect("write");
    let exe = dir.path().join("prog");
    // The compiler driver, cc1, as and ld all run as guests.
    let out = run(vkrun()
        .arg(&gcc)
        .arg("-O1")
        .arg("-pthread")
        .arg("-o")
        .arg(&exe)
        .arg(&src));
    assert!(
        out.status.success(),
        "gcc under vkrun: {}",
        text(&out.stderr)
    );
    let out = assert_transparent(exe.to_str().expect("utf-8"), &[] as &[&str]);
    assert!(
        text(&out.stdout).contains("exec-ok\nchild 9\n") || text(&out.stdout).contains("child 9")
    );
    assert_eq!(out.status.code(), Some(12));
}

#[test]
fn a_program_killed_by_sigsegv() {
    let Some(gcc) = require("gcc") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("segv.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void){ puts(\"before\"); fflush(stdout); *(volatile int*)8 = 1; return 0; }\n",
    )
    .expect("write");
    let exe = dir.path().join("segv");
    let out = run(Command::new(gcc).arg("-o").arg(&exe).arg(&src));
    assert!(out.status.success());
    // Keep core dumps out of the way of the comparison.
    let out = assert_transparent(
        "/bin/sh",
        &["-c", &format!("ulimit -c 0; exec {}", exe.display())],
    );
    assert_eq!(shell_code(out.status), 139);
    assert_eq!(text(&out.stdout), "before\n");
    let loud = run(vkrun()
        .arg("sh")
        .arg("-c")
        .arg(format!("ulimit -c 0; exec {}", exe.display())));
    assert_eq!(text(&loud.stderr), "vkrun: guest killed by SIGSEGV\n");
}
