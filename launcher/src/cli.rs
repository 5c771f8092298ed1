//! vkrun's command line, defined once: `vkrun` parses it, and the man page
//! and shell completions (`cargo run -p xtask -- man|completions`) are
//! generated from it.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser};

use crate::size;

/// Text after the options in `--help`: exit status, trace sets,
/// environment, files and limits.
pub const AFTER_HELP: &str = "\
Exit status: the guest's exit code; 128+N if it was killed by signal N;
125 if vkrun itself failed; 126 if GUEST cannot be executed; 127 if it is
not found; 2 for a bad command line.

Trace sets: -e trace=SET takes hypercall names (vk_info, vk_mmap,
mcontrol, vmspace_create, ...), %vkernel (every hypercall), faults, runs,
process (fork, vfork, clone, execve),
all, none; comma-separated; a leading ! inverts the set.

Debugging: --gdb 127.0.0.1:1234 (or a socket path) serves gdb's remote
protocol; the guest waits at its first instruction for
`gdb -ex 'target remote :1234'`. All guest threads and processes are
shown; when one stops, all stop. Quitting gdb detaches. Loopback only.
`monitor vmspaces` and `monitor vmspace ID x ADDR [LEN]` show the vmspaces
and their user memory; `monitor help` lists the commands.

Environment: RUST_LOG (diagnostics filter, e.g. vkrun_runtime=debug);
PATH (where a GUEST without a / is looked up).

Files: /proc/sys/vm/max_map_count (bounds the host mappings of windows);
/proc/sys/vm/unprivileged_userfaultfd (kernel-mode faults without root).

Limits: RAM is a multiple of 4096 bytes up to 256T and must fit the host's
address space (checked as the command line is read: 128T of user addresses
on a 48-bit CPU, less what is mapped already); vmspaces need FSGSBASE; at most 56 threads RUN one vmspace.
The ABI is docs/ABI.md; `vkrun --version` shows what this host offers.

Diagnostics: -v, -vv, or RUST_LOG=vkrun_runtime=debug.";

/// Run GUEST as a virtual kernel under the vkrun supervisor.
#[derive(Debug, Parser)]
#[command(
    name = "vkrun",
    version,
    about,
    long_about = "Run GUEST, a virtual kernel written to the DragonFly BSD vkernel host \
                  interface (vkrun ABI version 1), as an ordinary Linux process. The \
                  supervisor owns the guest's RAM, serves its hypercalls, resolves faults in \
                  its MAP_VPAGETABLE mappings and runs its user code in vmspaces; every \
                  ordinary system call of the guest runs natively.",
    after_help = AFTER_HELP,
    disable_version_flag = true,
    override_usage = "vkrun [OPTIONS] [-m SIZE] [--] GUEST [ARGS...]"
)]
pub struct Cli {
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
    pub memory: u64,

    /// Trace every hypercall, fault and RUN (same as -e trace=all).
    #[arg(long)]
    pub trace: bool,

    /// Trace expression, as in strace: trace=SET (or just SET).
    #[arg(short = 'e', value_name = "EXPR")]
    pub expr: Vec<String>,

    /// Write the trace and --stats to FILE instead of stderr.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Prefix trace lines with the time of day (-tt: with microseconds;
    /// -ttt: seconds since the epoch, with microseconds).
    #[arg(short = 't', action = ArgAction::Count)]
    pub timestamps: u8,

    /// Prefix trace lines with the time since the previous line.
    #[arg(short = 'r')]
    pub relative: bool,

    /// Follow forks and threads (always on, as strace -f); -ff with -o
    /// FILE writes each task's trace to FILE.TID.
    #[arg(short = 'f', action = ArgAction::Count)]
    pub follow: u8,

    /// Show the time spent in each traced call.
    #[arg(short = 'T')]
    pub durations: bool,

    /// Print the counters (vm.vpagetable_*, vkrun.*) when the guest ends;
    /// those that stayed zero only with -v.
    #[arg(long)]
    pub stats: bool,

    /// How vmspace_ctl(RUN) reaches the execution context: hypercall
    /// (every RUN through vkrun, as a raw hypercall; the default) or fast
    /// (the guest's vmspace_ctl() in vkernel.h and vkabi hands off to it
    /// directly: about 2.3x faster, but under heavy concurrency a fast RUN
    /// can stall, see the README's Known limits; opt-in until that is
    /// fixed).
    /// Traced RUNs (-e trace=runs, all) always take the hypercall.
    #[arg(long = "run", value_name = "PATH", value_enum, default_value_t = RunPath::Hypercall)]
    pub run: RunPath,

    /// Do not report a guest killed by a signal on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// More diagnostics on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long, action = ArgAction::Count)]
    pub verbose: u8,

    /// Serve gdb on ADDR: 127.0.0.1:PORT, :PORT or PORT (loopback only;
    /// port 0 picks a free one), or a Unix socket path (anything with a
    /// /). The guest waits at its first instruction until gdb attaches
    /// (`target remote ADDR`); vkrun prints where it listens.
    #[arg(long = "gdb", value_name = "ADDR", value_parser = parse_gdb_addr)]
    pub gdb: Option<vkrun_runtime::GdbAddr>,

    /// With --gdb: yes (the default) holds the guest at its start until gdb
    /// attaches; no lets it run, and gdb stops it when it attaches. With no
    /// gdb attached, a thread about to crash (SIGSEGV, SIGABRT, ...) waits
    /// for gdb; ^C or a kill of vkrun ends any wait.
    #[arg(
        long = "gdb-wait",
        value_name = "WHEN",
        default_value = "yes",
        hide_default_value = true,
        value_parser = ["yes", "no"],
        requires = "gdb"
    )]
    pub gdb_wait: String,

    /// Print the version, the git commit, the ABI version and what this
    /// host offers vkrun (FSGSBASE, SYNC_WAKE_UP, userfaultfd kernel
    /// faults, vm.max_map_count), then exit.
    #[arg(short = 'V', long = "version")]
    pub version: bool,

    /// The guest program and its arguments.
    #[arg(
        value_name = "GUEST",
        required_unless_present = "version",
        num_args = 1..,
        trailing_var_arg = true
    )]
    pub command: Vec<OsString>,
}

fn parse_gdb_addr(text: &str) -> Result<vkrun_runtime::GdbAddr, String> {
    vkrun_runtime::GdbAddr::parse(text)
}

/// `--run`: the path of a RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunPath {
    /// The guest library hands off to the context itself.
    Fast,
    /// Every RUN is a hypercall served by vkrun.
    Hypercall,
}

/// A RAM size as `size::parse_size` reads it that this host can also map
/// (checked now, so a size too large fails as a bad command line, not
/// after the guest was set up).
fn parse_ram_size(text: &str) -> Result<u64, size::SizeError> {
    let size = size::parse_size(text)?;
    vkrun_runtime::host::ram_fits(size).map_err(size::SizeError::Host)?;
    Ok(size)
}

/// The clap definition, for the man page and completions.
pub fn command() -> clap::Command {
    Cli::command()
}
