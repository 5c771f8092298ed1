//! `vkrun`: run a guest program (a virtual kernel) under the vkrun
//! supervisor. Parses the command line, installs the diagnostics subscriber,
//! and turns the supervisor's outcome into vkrun's exit status.
#![forbid(unsafe_code)]

mod exit;

use std::io::Write;

use clap::Parser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use vkrun::cli::Cli;
use vkrun_runtime::trace::{Timestamps, TraceOptions, TraceSet};
use vkrun_runtime::{Config, Outcome};

use crate::exit::ExitStatus;

/// Parse the `-e` expressions into one trace set.
fn trace_set(cli: &Cli) -> Result<TraceSet, String> {
    let mut set = if cli.trace {
        TraceSet::ALL
    } else {
        TraceSet::NONE
    };
    for expr in &cli.expr {
        let spec = match expr.split_once('=') {
            Some(("trace", spec)) => spec,
            Some((qualifier, _)) => {
                return Err(format!(
                    "invalid -e qualifier '{qualifier}' in '{expr}' (only trace= is supported)"
                ));
            }
            None => expr.as_str(),
        };
        set = TraceSet::parse(spec).map_err(|e| format!("invalid -e '{expr}': {e}"))?;
    }
    Ok(set)
}

/// stderr for messages and diagnostics: a closed or full stderr (vkrun's
/// output piped into `head`) loses the message and nothing else. (`eprintln!`
/// panics there, and a panicking thread would end vkrun.)
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Print `vkrun: MESSAGE` on stderr, if it is still there.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(QuietStderr, "vkrun: {}", format_args!($($arg)*));
    }};
}

fn init_diagnostics(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        .with_target(false)
        .try_init();
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => std::process::exit(usage_error(&err)),
    };
    if cli.version {
        print_version();
        return;
    }
    init_diagnostics(cli.verbose);
    std::process::exit(run(cli).code());
}

/// Report a command line clap refused, as strace does: one `vkrun: ...`
/// line and a hint, exit status 2. `--help` is printed and exits 0.
fn usage_error(err: &clap::Error) -> i32 {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return 0;
    }
    let invalid = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    match (err.kind(), invalid) {
        (ErrorKind::UnknownArgument, Some(arg)) => {
            say!("unrecognized option '{arg}'");
        }
        _ => {
            // clap's message up to its first blank line, on one line.
            let text = err.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = msg.join(" ");
            say!("{}", msg.strip_prefix("error: ").unwrap_or(&msg));
        }
    }
    let _ = writeln!(QuietStderr, "Try 'vkrun --help' for more information.");
    ExitStatus::Usage.code()
}

/// `vkrun --version`: what vkrun is and what it found on this host, as
/// `strace -V` does.
fn print_version() {
    let host = vkrun_runtime::host::probe();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "vkrun {} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("VKRUN_GIT_COMMIT")
    );
    let _ = writeln!(out, "ABI version {}", vkabi::VK_ABI_VERSION);
    let _ = writeln!(out, "License: {}", env!("CARGO_PKG_LICENSE"));
    let _ = writeln!(
        out,
        "Kernel: Linux {}",
        host.kernel.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "FSGSBASE: {}{}",
        yes_no(host.fsgsbase),
        if host.fsgsbase {
            ""
        } else {
            " (vmspace_create fails with EOPNOTSUPP)"
        }
    );
    let _ = writeln!(
        out,
        "seccomp SYNC_WAKE_UP: {}{}",
        yes_no(host.sync_wake_up),
        if host.sync_wake_up {
            ""
        } else {
            " (Linux 6.6+; hypercalls are slower without it)"
        }
    );
    let _ = writeln!(
        out,
        "userfaultfd kernel faults: {}{}",
        yes_no(host.uffd_kernel_faults),
        if host.uffd_kernel_faults {
            ""
        } else {
            " (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
        }
    );
    let _ = match host.max_map_count {
        Some(n) => writeln!(out, "vm.max_map_count: {n}"),
        None => writeln!(out, "vm.max_map_count: unknown"),
    };
}

fn run(cli: Cli) -> ExitStatus {
    let set = match trace_set(&cli) {
        Ok(set) => set,
        Err(msg) => {
            say!("{msg}");
            return ExitStatus::Usage;
        }
    };
    // strace -ff: each task's trace in FILE.TID, and FILE itself unused
    // (here it still takes --stats, so nothing is lost).
    let per_task = (cli.follow >= 2).then(|| cli.output.clone()).flatten();
    let output: Box<dyn Write + Send> = match &cli.output {
        Some(_) if per_task.is_some() && !cli.stats => Box::new(std::io::sink()),
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Box::new(f),
            Err(e) => {
                say!("cannot open {}: {e}", path.display());
                return ExitStatus::VkrunFailure;
            }
        },
        None => Box::new(std::io::stderr()),
    };
    let timestamps = match cli.timestamps {
        0 => Timestamps::None,
        1 => Timestamps::Seconds,
        2 => Timestamps::Micros,
        _ => Timestamps::Epoch,
    };
    let mut command = cli.command.into_iter();
    let program = command.next().expect("clap requires GUEST");
    let config = Config {
        program,
        args: command.collect(),
        ram_size: cli.memory,
        trace: TraceOptions {
            set,
            timestamps,
            relative: cli.relative,
            durations: cli.durations,
            per_task,
        },
        output,
        stats: cli.stats,
        stats_zeros: cli.verbose > 0,
        gdb: cli.gdb.map(|addr| vkrun_runtime::GdbOptions {
            addr,
            wait: cli.gdb_wait == "yes",
        }),
        fast_run: cli.run == vkrun::cli::RunPath::Fast,
    };
    match vkrun_runtime::run(config) {
        Ok(outcome) => {
            if let (
                Outcome::Signaled {
                    signal,
                    core_dumped,
                },
                false,
            ) = (outcome, cli.quiet)
            {
                say!(
                    "guest killed by {}{}",
                    signal.as_str(),
                    if core_dumped { " (core dumped)" } else { "" }
                );
            }
            ExitStatus::from(&outcome)
        }
        Err(err) => {
            say!("{err}");
            ExitStatus::from(&err)
        }
    }
}
