//! User-Mode Linux as a benchmark baseline: Debian's `user-mode-linux`
//! (`/usr/bin/linux`, skas mode) booted with the host's root over hostfs and
//! `init=` a script that runs one workload and powers off. The workload's
//! standard output is written to a file on the host (hostfs makes the
//! host's `/tmp` UML's), so the caller reads what the program printed,
//! e.g. its own "ns per call" figure, exactly as from a native run.
//!
//! Boot and shutdown are outside the workload: a figure the program prints
//! about itself is comparable with its native and minikernel runs; a
//! wall-clock figure of the whole boot is not, so none is offered.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::wait_output;

/// UML's kernel binary, if Debian's `user-mode-linux` is installed.
pub fn binary() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/linux");
    path.exists().then_some(path)
}

/// One User-Mode Linux machine to run workloads in.
#[derive(Debug)]
pub struct Uml {
    kernel: PathBuf,
    dir: tempfile::TempDir,
    mem: String,
}

impl Uml {
    /// A UML with `mem` of RAM (a size as UML's `mem=` takes it, e.g.
    /// "512M"), or `None` when `user-mode-linux` is not installed.
    pub fn new(mem: &str) -> Option<Self> {
        let kernel = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("vkrun-uml-")
            .tempdir()
            .expect("temporary directory for UML");
        Some(Uml {
            kernel,
            dir,
            mem: mem.to_string(),
        })
    }

    /// Boot, run `program args` as the only process (with `/proc` mounted),
    /// power off, and return what it printed on standard output. UML's
    /// threads inherit the caller's CPU affinity, so a pinned bench pins
    /// it too. Panics, naming the console's last lines, if the workload
    /// did not exit 0 or UML did not finish within `deadline`.
    pub fn run(&self, program: &Path, args: &[&str], deadline: Duration) -> String {
        let out = self.dir.path().join("out");
        let status = self.dir.path().join("status");
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(&status);
        let mut script = String::from("#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\n");
        let mut line = shell_quote(&program.to_string_lossy());
        for arg in args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        writeln!(
            script,
            "{line} > {} 2>&1\necho $? > {}\nexec /bin/busybox poweroff -f",
            shell_quote(&out.to_string_lossy()),
            shell_quote(&status.to_string_lossy())
        )
        .expect("formatting to a string");
        let init = self.dir.path().join("init");
        std::fs::write(&init, script).expect("write UML init script");
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod UML init script");

        let mut cmd = Command::new(&self.kernel);
        cmd.arg(format!("mem={}", self.mem))
            .args(["root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw"])
            .arg(format!("init={}", init.display()))
            .args(["con=null", "con0=null,fd:2"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start User-Mode Linux");
        let console = wait_output(child, deadline);
        let code = std::fs::read_to_string(&status).unwrap_or_default();
        let printed = std::fs::read_to_string(&out).unwrap_or_default();
        if code.trim() != "0" {
            let console = String::from_utf8_lossy(&console.stderr);
            let tail: Vec<&str> = console.lines().rev().take(8).collect();
            panic!(
                "{} {args:?} in UML: exit status {:?}, printed {printed:?}; console ends: {:?}",
                program.display(),
                code.trim(),
                tail.into_iter().rev().collect::<Vec<_>>()
            );
        }
        printed
    }
}

/// `s` quoted for `/bin/sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
