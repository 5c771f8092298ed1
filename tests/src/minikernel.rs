//! Running programs in the sample vkernel for the corpora that compare it
//! with Linux: a program under `vkrun -- minikernel`, the same program
//! natively and inside with their outputs compared, and building the
//! corpus's C programs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{assert_same_output, bin, compile_c, require, run, text, vkrun, workspace_root};

/// Run `program args` under vkrun and the minikernel (512 MiB of RAM).
pub fn inside(program: &Path, args: &[&str]) -> Output {
    inside_env(program, args, &[])
}

/// [`inside`] with environment variables `env` set.
pub fn inside_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    run(vkrun()
        .args(["-q", "-m", "512M", "--"])
        .arg(bin("minikernel"))
        .arg(program)
        .args(args)
        .envs(env.iter().copied()))
}

/// Run `program args` natively and inside the minikernel; assert equal
/// stdout and exit status; return the inside run's output.
pub fn same(program: &Path, args: &[&str]) -> Output {
    same_env(program, args, &[])
}

/// [`same`] with environment variables `env` set for both runs.
pub fn same_env(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let native = run(Command::new(program).args(args).envs(env.iter().copied()));
    let under = inside_env(program, args, env);
    assert_same_output(program, args, &under, &native);
    under
}

/// Whether the ELF file at `path` names an interpreter (`PT_INTERP`):
/// `None` if it is no readable ELF file.
pub fn has_interpreter(path: &Path) -> Option<bool> {
    let b = std::fs::read(path).ok()?;
    let u16_at = |at: usize| b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u64_at = |at: usize| {
        b.get(at..at + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    };
    if !b.starts_with(b"\x7fELF") {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(32)?, u16_at(54)?, u16_at(56)?);
    Some((0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        b.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    }))
}

/// Build `tests/programs/<name>.c` with `compiler` (`gcc`, `musl-gcc`) and
/// `flags` into `dir`, or `None` after a skip.
pub fn build_program(compiler: &str, dir: &Path, name: &str, flags: &[&str]) -> Option<PathBuf> {
    let cc = require(compiler)?;
    let src = workspace_root().join(format!("tests/programs/{name}.c"));
    let out = dir.join(format!("{name}-{compiler}{}", flags.join("")));
    let r = run(Command::new(cc)
        .args(["-O1", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .args(flags));
    assert!(
        r.status.success(),
        "{compiler} {name}.c failed: {}",
        text(&r.stderr)
    );
    Some(out)
}

/// Write `source` to `dir/<name>.c` and build it with gcc and `flags`, or
/// `None` after a skip.
pub fn build_source(dir: &Path, name: &str, source: &str, flags: &[&str]) -> Option<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write source");
    compile_c(&src, dir, flags)
}
