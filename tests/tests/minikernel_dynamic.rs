//! Dynamically linked programs in the minikernel (issue 18, part 2): the
//! host's own `/usr/bin` programs, unmodified, loaded with the interpreter
//! their `PT_INTERP` names, must print the same stdout and end with the
//! same status as natively; `execve` of one from a static shell works; a
//! missing interpreter is `ENOENT`, as on Linux.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vkrun_tests::{
    assert_same_output, bin, compile_c, require, run, shell_code, skip, text, vkrun,
};

/// Run `program args` under vkrun and the minikernel.
fn inside(program: &Path, args: &[&str]) -> Output {
    run(vkrun()
        .args(["-q", "-m", "512M", "--"])
        .arg(bin("minikernel"))
        .arg(program)
        .args(args))
}

/// Run `program args` natively and inside the minikernel; assert equal
/// stdout and exit status; return the inside run's output.
fn same(program: &Path, args: &[&str]) -> Output {
    let native = run(Command::new(program).args(args));
    let under = inside(program, args);
    assert_same_output(program, args, &under, &native);
    under
}

/// Whether the ELF file at `path` names an interpreter (`PT_INTERP`).
fn is_dynamic(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |at: usize| b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u64_at = |at: usize| {
        b.get(at..at + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    b.starts_with(b"\x7fELF")
        && (0..usize::from(phnum)).any(|i| {
            let at = phoff as usize + i * usize::from(phentsize);
            b.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
        })
}

/// The dynamically linked host program `name` (skipped when absent or
/// static).
fn dynamic(name: &str) -> Option<PathBuf> {
    let path = if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        require(name)?
    };
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    if !is_dynamic(&path) {
        skip(&format!("{} is not dynamically linked", path.display()));
        return None;
    }
    Some(path)
}

/// A fixed tree: files of known sizes and modes, a directory, a symlink.
fn fixed_tree(dir: &Path) {
    let body: String = (0..500)
        .map(|i| format!("{}\n", (i * 7919) % 1000))
        .collect();
    std::fs::write(dir.join("numbers"), body).expect("write numbers");
    std::fs::create_dir_all(dir.join("sub/deeper")).expect("mkdir");
    std::fs::write(dir.join("sub/deeper/leaf"), "leaf\n").expect("write leaf");
    std::os::unix::fs::symlink("numbers", dir.join("link")).expect("symlink");
}

#[test]
fn dynamically_linked_usr_bin_programs_behave_as_natively() {
    // The tree one level down: its ".." is this test's own directory,
    // which nothing else changes.
    let top = tempfile::tempdir().expect("tempdir");
    let tree = top.path().join("tree");
    std::fs::create_dir(&tree).expect("mkdir");
    fixed_tree(&tree);
    let d = tree.to_str().expect("utf-8 path");
    let numbers = tree.join("numbers");
    let n = numbers.to_str().expect("utf-8 path");
    let cases: [(&str, Vec<&str>); 8] = [
        ("ls", vec!["-la", d]),
        ("ls", vec!["-laR", "--time-style=+%s", d]),
        ("cat", vec![n]),
        ("sort", vec!["-n", n]),
        ("sort", vec!["-r", n]),
        ("sha256sum", vec![n]),
        ("cat", vec!["/nonexistent"]),
        ("true", vec![]),
    ];
    for (name, args) in &cases {
        let Some(prog) = dynamic(name) else { return };
        same(&prog, args);
    }
    // The host's python3, not a wrapper PATH may find first.
    let Some(python) = dynamic("/usr/bin/python3") else {
        return;
    };
    let under = same(&python, &["-c", "print(sum(range(10)))"]);
    assert_eq!(text(&under.stdout), "45\n");
    same(
        &python,
        &[
            "-c",
            "import sys, hashlib; print(hashlib.sha256(b'x').hexdigest()); sys.exit(3)",
        ],
    );
}

/// A dynamically linked program that prints its auxv entries as the
/// interpreter left them (getauxval) and checks them against what it can
/// see itself.
const AUXV: &str = r#"
#include <elf.h>
#include <stdio.h>
#include <sys/auxv.h>
extern char __ehdr_start;
int main(void) {
    unsigned long phdr = getauxval(AT_PHDR), entry = getauxval(AT_ENTRY);
    unsigned long base = getauxval(AT_BASE), phent = getauxval(AT_PHENT);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)&__ehdr_start;
    printf("phdr at ehdr+phoff: %d\n", phdr == (unsigned long)eh + eh->e_phoff);
    printf("entry is e_entry: %d\n", entry == (unsigned long)eh + eh->e_entry);
    printf("phnum: %d\n", getauxval(AT_PHNUM) == eh->e_phnum);
    printf("phent: %lu\n", phent);
    Elf64_Ehdr *ld = (Elf64_Ehdr *)base;
    printf("base is an ELF shared object: %d\n",
           base != 0 && ld->e_ident[0] == 0x7f && ld->e_ident[1] == 'E' && ld->e_type == ET_DYN);
    return 0;
}
"#;

/// A static program that execs its argument and prints the errno.
const EXEC_ERRNO: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char *args[] = {argv[1], "from-exec", NULL};
    execv(argv[1], args);
    printf("execv: %s\n", errno == ENOENT ? "ENOENT" : strerror(errno));
    return 1;
}
"#;

/// Build `source` as `name` with `flags` in `dir`, or `None` (skipped).
fn build(dir: &Path, name: &str, source: &str, flags: &[&str]) -> Option<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write source");
    compile_c(&src, dir, flags)
}

#[test]
fn the_interpreter_gets_at_base_at_phdr_and_at_entry_as_linux_sets_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(prog) = build(dir.path(), "auxv", AUXV, &[]) else {
        return;
    };
    let under = same(&prog, &[]);
    assert_eq!(
        text(&under.stdout),
        "phdr at ehdr+phoff: 1\nentry is e_entry: 1\nphnum: 1\nphent: 56\n\
         base is an ELF shared object: 1\n"
    );
    // The same as a non-PIE executable (ET_EXEC at its link addresses).
    let Some(nopie) = build(dir.path(), "auxv_nopie", AUXV, &["-no-pie"]) else {
        return;
    };
    same(&nopie, &[]);
}

#[test]
fn a_missing_interpreter_is_enoent_and_a_static_shell_execs_dynamic_programs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(missing) = build(
        dir.path(),
        "missing",
        "int main(void) { return 0; }\n",
        &["-Wl,--dynamic-linker=/nonexistent/ld.so"],
    ) else {
        return;
    };
    let Some(exec) = build(dir.path(), "exec", EXEC_ERRNO, &["-static"]) else {
        return;
    };
    let m = missing.to_str().expect("utf-8 path");
    let under = same(&exec, &[m]);
    assert_eq!(text(&under.stdout), "execv: ENOENT\n");
    // Loaded directly, it fails as a program that cannot be loaded.
    let direct = inside(&missing, &[]);
    assert_eq!(shell_code(direct.status), 127);
    assert!(
        text(&direct.stderr).contains("/nonexistent/ld.so"),
        "{}",
        text(&direct.stderr)
    );
    // execve of a dynamic program from a static program and shell.
    let Some(echo) = dynamic("echo") else { return };
    let e = echo.to_str().expect("utf-8 path");
    let under = same(&exec, &[e]);
    assert_eq!(text(&under.stdout), "from-exec\n");
    let Some(bb) = require("busybox") else { return };
    let script = format!(
        "{m}; echo missing $?; {e} dynamic from static; ls {d} | sort | head -3",
        d = dir.path().display()
    );
    let under = same(&bb, &["sh", "-c", &script]);
    assert!(
        text(&under.stdout).starts_with("missing 127\ndynamic from static\n"),
        "{}",
        text(&under.stdout)
    );
}
