//! Builds the `hello-vmspace` executable: `$RUSTC` on src/program.rs with
//! `-C panic=abort` (no `eh_personality` needed without std), optimised,
//! non-PIE, linked static without libc or start files; then copies it next
//! to the workspace's other binaries, `target/<profile>/hello-vmspace`, where
//! README and the tests run it. (A cargo `[[bin]]` cannot be this program:
//! the workspace profiles use `panic = "unwind"`, which stable Rust refuses
//! for a `no_std` executable, and `panic` cannot be overridden per package.)

use std::path::PathBuf;
use std::process::Command;

/// What the executable is built from.
const SOURCES: [&str; 3] = ["src/program.rs", "src/app.rs", "build.rs"];

fn main() {
    for source in SOURCES {
        println!("cargo::rerun-if-changed={source}");
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let rustc = std::env::var_os("RUSTC").expect("RUSTC is set by cargo");
    let target = std::env::var("TARGET").expect("TARGET is set by cargo");
    let exe = out_dir.join("hello-vmspace");
    let output = Command::new(rustc)
        .args(["--edition", "2024", "--crate-type", "bin", "--crate-name"])
        .arg("hello_vmspace")
        .args(["--target", &target])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "relocation-model=static", "-C", "strip=symbols"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .args(["--cap-lints", "allow"])
        .arg("-o")
        .arg(&exe)
        .arg("src/program.rs")
        .output()
        .expect("run rustc");
    assert!(
        output.status.success(),
        "rustc src/program.rs failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // OUT_DIR is target/[<triple>/]<profile>/build/hello-vmspace-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR lies three levels below the profile directory");
    let dest = profile_dir.join("hello-vmspace");
    // Replace rather than overwrite: a running copy stays intact.
    let tmp = profile_dir.join(".hello-vmspace.tmp");
    std::fs::copy(&exe, &tmp).expect("copy hello-vmspace into the target directory");
    // Date the copy like its newest source, which predates this run, so
    // that the rerun-if-changed below fires only when the copy is deleted
    // or replaced, not on every build.
    let newest = SOURCES
        .iter()
        .map(|s| {
            std::fs::metadata(s)
                .and_then(|m| m.modified())
                .expect("source mtime")
        })
        .max()
        .expect("at least one source");
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(newest))
        .expect("date the copy");
    std::fs::rename(&tmp, &dest).expect("rename hello-vmspace into place");
    println!("cargo::rerun-if-changed={}", dest.display());
}
