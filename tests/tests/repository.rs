//! The repository is self-contained: no file refers to a path outside it,
//! every "ABI section N" cited exists in `docs/ABI.md`, relative links in
//! the Markdown files resolve, and the licence files the manifests promise
//! are present.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every text file of the repository, skipping build output and git's own
/// directory.
fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == "target" || name == ".git" {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if fs::read_to_string(&path).is_ok() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    assert!(
        out.len() > 50,
        "found only {} files under {:?}",
        out.len(),
        root()
    );
    out
}

/// What a reference to something outside the repository looks like. Built
/// from pieces so that this file does not match itself.
fn outside_patterns() -> Vec<String> {
    let shared = ["..", "/shared"].concat();
    vec![
        shared,
        ["shared", "/design"].concat(),
        ["shared", "/tools"].concat(),
        ["shared", "/prototypes"].concat(),
        ["STYLE", ".md"].concat(),
        ["MECHANISMS", ".md"].concat(),
        ["/work", "/"].concat(),
        ["/home", "/"].concat(),
    ]
}

#[test]
fn no_file_refers_outside_the_repository() {
    let patterns = outside_patterns();
    let mut bad = Vec::new();
    for path in files() {
        let text = fs::read_to_string(&path).expect("listed as text");
        for (n, line) in text.lines().enumerate() {
            for p in &patterns {
                if line.contains(p.as_str()) {
                    let rel = path.strip_prefix(root()).unwrap_or(&path);
                    bad.push(format!("{}:{}: {p}: {}", rel.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "references outside the repository:\n{}",
        bad.join("\n")
    );
}

/// The section numbers `docs/ABI.md` defines (`## N. Title`).
fn abi_sections() -> BTreeSet<u32> {
    let abi = fs::read_to_string(root().join("docs/ABI.md")).expect("docs/ABI.md exists");
    assert!(
        abi.starts_with("# vkrun guest ABI, version 1"),
        "ABI.md names its version"
    );
    abi.lines()
        .filter_map(|l| l.strip_prefix("## "))
        .filter_map(|l| l.split_once('.'))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

/// Section numbers cited as "ABI section N", "ABI sections N-M" or
/// "ABI section N, M" in `text`.
fn cited_sections(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let flat = text
        .replace(['\n', '\r'], " ")
        .replace("//!", " ")
        .replace("///", " ");
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    for (i, _) in flat.match_indices("ABI section") {
        let rest = flat[i + "ABI section".len()..]
            .trim_start_matches('s')
            .trim_start();
        let spec: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || matches!(c, '-' | ',' | ' '))
            .collect();
        for part in spec.split([',', ' ']).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                        out.extend(a..=b);
                    }
                }
                None => {
                    if let Ok(n) = part.parse() {
                        out.push(n);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn cited_abi_sections_exist() {
    let sections = abi_sections();
    assert_eq!(
        sections,
        (1..=9).collect::<BTreeSet<_>>(),
        "docs/ABI.md keeps sections 1-9"
    );
    let mut cited = 0;
    let mut bad = Vec::new();
    for path in files() {
        let text = fs::read_to_string(&path).expect("listed as text");
        for n in cited_sections(&text) {
            cited += 1;
            if !sections.contains(&n) {
                bad.push(format!("{}: ABI section {n}", path.display()));
            }
        }
    }
    assert!(
        cited >= 40,
        "only {cited} citations found: the scanner is broken"
    );
    assert!(
        bad.is_empty(),
        "citations of missing sections:\n{}",
        bad.join("\n")
    );
}

#[test]
fn citation_scanner_reads_ranges_and_lists() {
    assert_eq!(cited_sections("(ABI section 7)"), [7]);
    assert_eq!(cited_sections("ABI sections 3-6, x"), [3, 4, 5, 6]);
    assert_eq!(cited_sections("/// (ABI\n/// section 4)"), [4]);
    assert!(cited_sections("the ABI says").is_empty());
}

#[test]
fn markdown_links_resolve() {
    let mut bad = Vec::new();
    let mut links = 0;
    for path in files() {
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("listed as text");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links += 1;
            let dir = path.parent().expect("a file has a directory");
            let resolved = dir.join(target);
            let inside = resolved
                .canonicalize()
                .is_ok_and(|p| p.starts_with(root().canonicalize().expect("root exists")));
            if !inside {
                bad.push(format!("{}: {target}", path.display()));
            }
        }
    }
    assert!(links > 0, "no relative links found: the scanner is broken");
    assert!(
        bad.is_empty(),
        "links that do not resolve inside the repository:\n{}",
        bad.join("\n")
    );
}

#[test]
fn sample_paths_named_in_the_docs_exist() {
    let mut named = 0;
    let mut bad = Vec::new();
    for doc in ["README.md", "docs/guide.md", "docs/ABI.md"] {
        let text = fs::read_to_string(root().join(doc)).expect("doc exists");
        for piece in text.split('`').skip(1).step_by(2) {
            if !piece.starts_with("guest-samples/") || piece.contains(['*', '<', ' ']) {
                continue;
            }
            named += 1;
            if !root().join(piece).exists() {
                bad.push(format!("{doc}: {piece}"));
            }
        }
    }
    assert!(
        named >= 10,
        "only {named} sample paths found: the scanner is broken"
    );
    assert!(bad.is_empty(), "named but missing:\n{}", bad.join("\n"));
}

#[test]
fn release_profile_strips_debug_info() {
    let manifest = fs::read_to_string(root().join("Cargo.toml")).expect("workspace manifest");
    let release = manifest
        .split("[profile.release]")
        .nth(1)
        .expect("a release profile")
        .split("\n[")
        .next()
        .unwrap_or("");
    assert!(
        release.contains("strip = true") || release.contains("strip = \"debuginfo\""),
        "[profile.release] must strip: {release}"
    );
    assert!(
        !release.contains("debug = 1") && !release.contains("debug = 2"),
        "{release}"
    );
}

#[test]
fn vkabi_is_publishable_and_samples_are_not() {
    let abi = fs::read_to_string(root().join("guest-samples/abi/Cargo.toml")).expect("vkabi");
    assert!(
        !abi.contains("publish = false"),
        "vkabi is the crate guests depend on"
    );
    assert!(abi.contains("rust-version"), "vkabi states its MSRV");
    assert!(abi.contains("readme = \"README.md\""));
    let workspace = fs::read_to_string(root().join("Cargo.toml")).expect("workspace manifest");
    assert!(workspace.contains("rust-version = \"1."), "MSRV");
    for sample in [
        "guestlib",
        "vkinfo",
        "vkcall",
        "vpt-demo",
        "vmspace-demo",
        "vmspace-check",
        "minikernel",
        "hello-vmspace",
    ] {
        let path = root().join("guest-samples").join(sample).join("Cargo.toml");
        let m = fs::read_to_string(&path).expect("sample manifest");
        assert!(m.contains("publish = false"), "{}", path.display());
    }
    for path in files() {
        if path.file_name().is_some_and(|n| n == "Cargo.toml") {
            let m = fs::read_to_string(&path).expect("manifest");
            assert!(
                !m.contains(".invalid"),
                "placeholder metadata in {}",
                path.display()
            );
        }
    }
}

#[test]
fn licence_files_match_the_manifests() {
    let manifest = fs::read_to_string(root().join("Cargo.toml")).expect("workspace manifest");
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    let mit = fs::read_to_string(root().join("LICENSE-MIT")).expect("LICENSE-MIT exists");
    assert!(mit.contains("Permission is hereby granted, free of charge"));
    let apache = fs::read_to_string(root().join("LICENSE-APACHE")).expect("LICENSE-APACHE exists");
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"));
    assert!(apache.contains("END OF TERMS AND CONDITIONS"));
}
