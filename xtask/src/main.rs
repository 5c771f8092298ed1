//! Project tasks that produce files from vkrun's command-line definition:
//!
//! - `cargo run -p xtask -- man OUTDIR`: the man page `OUTDIR/vkrun.1`;
//! - `cargo run -p xtask -- completions OUTDIR`: bash, zsh and fish
//!   completions;
//! - `cargo run -p xtask -- install-header PREFIX`: the C header as
//!   `PREFIX/include/vkernel.h` and a pkg-config file
//!   `PREFIX/lib/pkgconfig/vkernel.pc` (`pkg-config --cflags vkernel`).
//!
//! Both come from `vkrun::cli::command()`, the definition the binary parses,
//! so they cannot drift from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

const USAGE: &str =
    "usage: cargo run -p xtask -- man OUTDIR | completions OUTDIR | install-header PREFIX";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [task, dir] if task == "man" => man(Path::new(dir)),
        [task, dir] if task == "completions" => completions(Path::new(dir)),
        [task, prefix] if task == "install-header" => install_header(Path::new(prefix)),
        _ => {
            eprintln!("xtask: {USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The paragraphs of the help's closing text as man-page sections:
/// `Exit status: ...` becomes section `EXIT STATUS`.
fn after_help_sections() -> Vec<(String, String)> {
    vkrun::cli::AFTER_HELP
        .split("\n\n")
        .filter_map(|para| {
            let (head, body) = para.split_once(": ")?;
            let body = body.split_whitespace().collect::<Vec<_>>().join(" ");
            Some((head.to_uppercase(), body))
        })
        .collect()
}

/// Render `vkrun.1` into `out`.
fn render_man(out: &mut dyn Write) -> std::io::Result<()> {
    let man = Man::new(vkrun::cli::command())
        .section("1")
        .manual("vkrun manual")
        .source(format!("vkrun {}", env!("CARGO_PKG_VERSION")));
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    let mut roff = Roff::default();
    for (head, body) in after_help_sections() {
        roff.control("SH", [head.as_str()]);
        roff.text([roman(body)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("strace"),
        roman("(1), "),
        bold("gdb"),
        roman("(1), "),
        bold("seccomp_unotify"),
        roman("(2), "),
        bold("userfaultfd"),
        roman("(2); the guest ABI, docs/ABI.md in the vkrun sources."),
    ]);
    roff.to_writer(out)?;
    man.render_version_section(out)
}

fn man(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("vkrun.1");
    let mut page = Vec::new();
    render_man(&mut page)?;
    std::fs::write(&path, page)?;
    Ok(vec![path])
}

fn completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = vkrun::cli::command();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| clap_complete::generate_to(shell, &mut cmd, "vkrun", dir))
        .collect()
}

/// The header's source, in this repository.
fn header_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-samples/include/vkernel.h")
}

/// The pkg-config file for a header installed under `prefix`.
fn pkg_config(prefix: &Path) -> String {
    format!(
        "prefix={}\nincludedir=${{prefix}}/include\n\n\
         Name: vkernel\n\
         Description: vkrun guest ABI {} for C guests (header only)\n\
         Version: {}\n\
         Cflags: -I${{includedir}}\n",
        prefix.display(),
        vkabi::VK_ABI_VERSION,
        env!("CARGO_PKG_VERSION")
    )
}

fn install_header(prefix: &Path) -> std::io::Result<Vec<PathBuf>> {
    let include = prefix.join("include");
    let pkgconfig = prefix.join("lib/pkgconfig");
    std::fs::create_dir_all(&include)?;
    std::fs::create_dir_all(&pkgconfig)?;
    let header = include.join("vkernel.h");
    std::fs::copy(header_source(), &header)?;
    let pc = pkgconfig.join("vkernel.pc");
    std::fs::write(&pc, pkg_config(prefix))?;
    Ok(vec![header, pc])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        let mut out = Vec::new();
        render_man(&mut out).expect("render");
        String::from_utf8(out).expect("roff is text")
    }

    #[test]
    fn man_page_has_every_option_and_section() {
        let page = page();
        assert!(page.contains(".TH vkrun 1"), "{page}");
        for arg in vkrun::cli::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                // roff escapes '-' as '\-'.
                assert!(
                    page.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
                    "--{long}"
                );
            }
            if let Some(short) = arg.get_short() {
                assert!(page.contains(&format!("\\-{short}")), "-{short}");
            }
        }
        for section in [
            "EXIT STATUS",
            "TRACE SETS",
            "DEBUGGING",
            "ENVIRONMENT",
            "FILES",
            "LIMITS",
            "SEE ALSO",
        ] {
            assert!(
                page.contains(&format!(".SH \"{section}\""))
                    || page.contains(&format!(".SH {section}")),
                "{section}: {page}"
            );
        }
        assert!(page.contains("126"), "exit statuses");
        assert!(page.contains("max_map_count"), "files");
    }

    #[test]
    fn after_help_has_the_man_sections() {
        let heads: Vec<String> = after_help_sections().into_iter().map(|(h, _)| h).collect();
        assert_eq!(
            heads,
            [
                "EXIT STATUS",
                "TRACE SETS",
                "DEBUGGING",
                "ENVIRONMENT",
                "FILES",
                "LIMITS",
                "DIAGNOSTICS"
            ]
        );
    }

    #[test]
    fn header_installs_with_a_pkg_config_file() {
        let prefix = std::env::temp_dir().join(format!("vkrun-xtask-hdr-{}", std::process::id()));
        let paths = install_header(&prefix).expect("install");
        let header = std::fs::read_to_string(&paths[0]).expect("header");
        assert!(header.contains("VK_SYS_BASE"), "the real header");
        let pc = std::fs::read_to_string(&paths[1]).expect("pc");
        assert!(
            pc.starts_with(&format!("prefix={}\n", prefix.display())),
            "{pc}"
        );
        assert!(pc.contains("Cflags: -I${includedir}\n"), "{pc}");
        assert!(
            pc.contains("Name: vkernel\n") && pc.contains("Version: "),
            "{pc}"
        );
        let _ = std::fs::remove_dir_all(&prefix);
    }

    #[test]
    fn completions_name_the_options() {
        let dir = std::env::temp_dir().join(format!("vkrun-xtask-{}", std::process::id()));
        let paths = completions(&dir).expect("generate");
        assert_eq!(paths.len(), 3);
        for p in &paths {
            let text = std::fs::read_to_string(p).expect("read");
            assert!(
                text.contains("memory") && text.contains("stats") && text.contains("verbose"),
                "{}",
                p.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
