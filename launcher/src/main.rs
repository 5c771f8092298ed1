//! `vkrun`: run a guest program (a virtual kernel) under the vkrun
//! supervisor. Parses the command line, installs the diagnostics subscriber,
//! and turns the supervisor's outcome into vkrun's exit status.
#![forbid(unsafe_code)]

mod exit;
mod size;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{ArgAction, Parser};
use vkrun_runtime::trace::{Timestamps, TraceOptions, TraceSet};
use vkrun_runtime::{Config, Outcome};

use crate::exit::ExitStatus;

const AFTER_HELP: &str = "\
Exit status: the guest's exit code; 128+N if it was killed by signal N;
125 if vkrun itself failed; 126 if GUEST cannot be executed; 127 if it is
not found; 2 for a bad command line.

Trace sets (-e trace=SET): hypercall names (vk_info, vk_mmap, mcontrol,
vmspace_create, ...), %vkernel (every hypercall), faults, runs, all, none;
comma-separated; a leading ! inverts the set.

Diagnostics: -v, -vv, or RUST_LOG=vkrun_runtime=debug.";

/// Run GUEST as a virtual kernel under the vkrun supervisor.
#[derive(Debug, Parser)]
#[command(
    name = "vkrun",
    version,
    about,
    after_help = AFTER_HELP,
    override_usage = "vkrun [OPTIONS] [-m SIZE] [--] GUEST [ARGS...]"
)]
struct Cli {
    /// Guest RAM size: bytes, or with a K, M, G or T suffix; hex allowed
    /// (0x4000000). Default 256M.
    #[arg(
        short = 'm',
        long = "memory",
        value_name = "SIZE",
        default_value = "256M",
        hide_default_value = true,
        value_parser = parse_ram_size,
        allow_hyphen_values = true
    )]
    memory: u64,

    /// Trace every hypercall, fault and RUN (same as -e trace=all).
    #[arg(long)]
    trace: bool,

    /// Trace expression, as in strace: trace=SET (or just SET).
    #[arg(short = 'e', value_name = "EXPR")]
    expr: Vec<String>,

    /// Write the trace and --stats to FILE instead of stderr.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,

    /// Prefix trace lines with the time of day (-tt: with microseconds).
    #[arg(short = 't', action = ArgAction::Count)]
    timestamps: u8,

    /// Show the time spent in each traced call.
    #[arg(short = 'T')]
    durations: bool,

    /// Print the counters (vm.vpagetable_*, vkrun.*) when the guest ends.
    #[arg(long)]
    stats: bool,

    /// Do not report a guest killed by a signal on stderr.
    #[arg(short = 'q', long)]
    quiet: bool,

    /// More diagnostics on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long, action = ArgAction::Count)]
    verbose: u8,

    /// The guest program and its arguments.
    #[arg(
        value_name = "GUEST",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

fn parse_ram_size(text: &str) -> Result<u64, size::SizeError> {
    size::parse_size(text)
}

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
    let cli = Cli::parse();
    init_diagnostics(cli.verbose);
    std::process::exit(run(cli).code());
}

fn run(cli: Cli) -> ExitStatus {
    let set = match trace_set(&cli) {
        Ok(set) => set,
        Err(msg) => {
            say!("{msg}");
            return ExitStatus::Usage;
        }
    };
    let output: Box<dyn Write + Send> = match &cli.output {
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
        _ => Timestamps::Micros,
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
            durations: cli.durations,
        },
        output,
        stats: cli.stats,
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
