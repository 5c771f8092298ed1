//! The guest's view: `vk_info` from the Rust and C guests, partial copies,
//! bad pointers, unknown and not-yet-implemented hypercalls, sealed RAM.

use std::process::Command;

use vkrun_tests::{bin, compile_c, run, text, vkrun, workspace_root};

fn vkcall(args: &[&str]) -> String {
    let out = run(vkrun().arg("-q").arg(bin("vkcall")).args(args));
    assert!(
        out.status.success(),
        "vkcall {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn rust_guest_vk_info() {
    let out = run(vkrun().args(["-m", "64M"]).arg(bin("vkinfo")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "abi_version: 1\n",
        "page_size: 4096\n",
        "vpte_levels: 4\n",
        "ram_size: 67108864\n",
        "user_max: 0x7fffffe00000\n",
        "pattern: ok\n",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in {stdout}");
    }
    assert!(stdout.contains("ram_fd: "));
}

#[test]
fn c_guest_vk_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = workspace_root().join("guest-samples/c/vkinfo.c");
    let Some(exe) = compile_c(&src, dir.path(), &[]) else {
        return;
    };
    let out = run(vkrun().args(["-m", "32M"]).arg(&exe));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ram_size: 33554432\n"), "{stdout}");
    assert!(stdout.contains("abi_version: 1\n"), "{stdout}");
    assert!(stdout.contains("pattern: ok\n"), "{stdout}");
    // Without vkrun the hypercall is an unknown Linux syscall.
    let native = run(&mut Command::new(&exe));
    assert_eq!(native.status.code(), Some(1));
    assert_eq!(text(&native.stderr), "vk_info: Function not implemented\n");
}

#[test]
fn without_vkrun_hypercalls_are_enosys() {
    let out = run(Command::new(bin("vkcall")).args(["raw", "0xdf00000", "0", "0"]));
    assert_eq!(text(&out.stdout), "-38\n");
    let out = run(&mut Command::new(bin("vkinfo")));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "vk_info: Function not implemented\n");
}

fn info_bytes(size: &str) -> (String, Vec<u8>) {
    let out = vkcall(&["info", size]);
    let mut lines = out.lines();
    let ret = lines.next().expect("ret line").to_owned();
    let hex = lines.next().expect("bytes line");
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    (ret, bytes)
}

#[test]
fn vk_info_copies_at_most_the_struct_and_at_most_size() {
    let (ret, full) = info_bytes("48");
    assert_eq!(ret, "ret 0");
    assert_eq!(u32::from_le_bytes(full[0..4].try_into().expect("4")), 1);
    assert_eq!(u32::from_le_bytes(full[4..8].try_into().expect("4")), 4096);
    assert_eq!(
        u64::from_le_bytes(full[24..32].try_into().expect("8")),
        vkabi::USER_MAX
    );
    assert!(full[32..48].iter().all(|b| *b == 0), "reserved is zero");
    assert!(full[48..].iter().all(|b| *b == 0xee));

    let (ret, big) = info_bytes("1000");
    assert_eq!(ret, "ret 0");
    assert_eq!(big, full, "a larger size copies only the 48-byte struct");

    let (ret, part) = info_bytes("5");
    assert_eq!(ret, "ret 0");
    assert_eq!(part[..5], full[..5]);
    assert!(part[5..].iter().all(|b| *b == 0xee), "nothing past size");

    let (ret, none) = info_bytes("0");
    assert_eq!(ret, "ret 0");
    assert!(none.iter().all(|b| *b == 0xee));
}

#[test]
fn vk_info_bad_pointer_is_efault() {
    assert_eq!(vkcall(&["raw", "0xdf00000", "0x8", "48"]), "-14\n");
    assert_eq!(
        vkcall(&["raw", "0xdf00000", "0xffffffffffff0000", "48"]),
        "-14\n"
    );
    // A read-only page (the program's own text) cannot be written either.
    assert_eq!(vkcall(&["info-readonly"]), "err 14\n");
    // A zero size writes nothing, so any pointer does.
    assert_eq!(vkcall(&["raw", "0xdf00000", "0x0", "0"]), "0\n");
}

#[test]
fn unknown_and_unimplemented_hypercalls_are_enosys() {
    for nr in ["0xdf00001", "0xdf00fff", "0xdf000c4"] {
        assert_eq!(vkcall(&["raw", nr, "1", "2"]), "-38\n", "{nr}");
    }
    // Above the range: Linux's own answer (also ENOSYS), not the supervisor's.
    assert_eq!(vkcall(&["raw", "0xdf01000"]), "-38\n");
}

#[test]
fn ram_is_sealed_and_survives_abuse() {
    let out = vkcall(&["ram-abuse"]);
    let eperm = libc::EPERM.to_string();
    assert!(out.contains(&format!("grow -1 {eperm}\n")), "{out}");
    assert!(out.contains(&format!("shrink -1 {eperm}\n")), "{out}");
    assert!(out.contains(&format!("seal -1 {eperm}\n")), "{out}");
    assert!(out.contains("pwrite-last 1\n"), "{out}");
    assert!(
        out.contains(&format!("pwrite-beyond -1 {eperm}\n")),
        "{out}"
    );
    // The fd number was reused for /dev/null; vk_info finds (or installs)
    // the real RAM again.
    assert!(out.contains("refound true true\n"), "{out}");
}
