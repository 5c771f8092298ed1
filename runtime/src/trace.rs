//! The strace-like trace: which events to show (`-e trace=SET`) and the
//! writer that prints them in strace's line grammar.
//!
//! This is product output with its own writer, not a log: diagnostics go
//! through `tracing`.

use std::fmt::Write as _;
use std::io::{LineWriter, Write};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use vkabi::Hypercall;

/// A `-e trace=` expression that names nothing vkrun knows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceSpecError {
    /// a name in the set is not a hypercall or a class
    #[error("invalid trace name '{0}' (hypercall names, %vkernel, faults, runs, all, none)")]
    UnknownName(String),
    /// the set is empty
    #[error("empty trace set")]
    Empty,
}

/// The set of traced events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceSet {
    /// Bit `i` set: trace `Hypercall::ALL[i]`.
    hypercalls: u32,
    /// Numbers in the hypercall range that name no hypercall.
    unknown: bool,
    /// VPAGETABLE faults (`vm.debug_vpagetable`).
    pub faults: bool,
    /// vmspace RUN entries and exits.
    pub runs: bool,
}

const ALL_HYPERCALLS: u32 = (1 << Hypercall::ALL.len()) - 1;

impl TraceSet {
    /// Nothing traced.
    pub const NONE: TraceSet = TraceSet {
        hypercalls: 0,
        unknown: false,
        faults: false,
        runs: false,
    };

    /// Everything traced (`--trace`, `-e trace=all`).
    pub const ALL: TraceSet = TraceSet {
        hypercalls: ALL_HYPERCALLS,
        unknown: true,
        faults: true,
        runs: true,
    };

    /// Parse strace's grammar: a comma-separated list of hypercall names,
    /// `%vkernel` (every hypercall), `faults`, `runs`, `all` or `none`; a
    /// leading `!` traces everything except the list.
    pub fn parse(spec: &str) -> Result<TraceSet, TraceSpecError> {
        let (negate, list) = match spec.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        if list.trim().is_empty() {
            return Err(TraceSpecError::Empty);
        }
        let mut set = TraceSet::NONE;
        for name in list.split(',').map(str::trim) {
            match name {
                "all" => set = set.union(TraceSet::ALL),
                "none" => {}
                "%vkernel" | "%hypercall" => {
                    set.hypercalls = ALL_HYPERCALLS;
                    set.unknown = true;
                }
                "faults" => set.faults = true,
                "runs" => set.runs = true,
                _ => match Hypercall::ALL.iter().position(|h| h.name() == name) {
                    Some(i) => set.hypercalls |= 1 << i,
                    None => return Err(TraceSpecError::UnknownName(name.to_owned())),
                },
            }
        }
        Ok(if negate { set.complement() } else { set })
    }

    fn union(self, other: TraceSet) -> TraceSet {
        TraceSet {
            hypercalls: self.hypercalls | other.hypercalls,
            unknown: self.unknown || other.unknown,
            faults: self.faults || other.faults,
            runs: self.runs || other.runs,
        }
    }

    fn complement(self) -> TraceSet {
        TraceSet {
            hypercalls: !self.hypercalls & ALL_HYPERCALLS,
            unknown: !self.unknown,
            faults: !self.faults,
            runs: !self.runs,
        }
    }

    /// Whether anything at all is traced (then process exits are shown too).
    pub fn is_empty(&self) -> bool {
        *self == TraceSet::NONE
    }

    /// Whether hypercall `h` (`None`: an unknown number) is traced.
    pub fn hypercall(&self, h: Option<Hypercall>) -> bool {
        match h {
            Some(h) => {
                let i = Hypercall::ALL
                    .iter()
                    .position(|x| *x == h)
                    .expect("every hypercall is in Hypercall::ALL");
                self.hypercalls & (1 << i) != 0
            }
            None => self.unknown,
        }
    }
}

/// strace's `-t` (seconds) and `-tt` (microseconds) time prefixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timestamps {
    /// No prefix.
    #[default]
    None,
    /// `HH:MM:SS`.
    Seconds,
    /// `HH:MM:SS.uuuuuu`.
    Micros,
}

/// Trace options from the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceOptions {
    /// What to trace.
    pub set: TraceSet,
    /// `-t`/`-tt`: prefix each line with the wall-clock time.
    pub timestamps: Timestamps,
    /// `-T`: append the time spent in each call.
    pub durations: bool,
}

/// Prints trace lines: `[pid N] [time ]text[ <secs>]`.
pub struct TraceWriter {
    out: LineWriter<Box<dyn Write + Send>>,
    options: TraceOptions,
    failed: bool,
}

impl std::fmt::Debug for TraceWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceWriter")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl TraceWriter {
    /// A writer printing to `out`.
    pub fn new(out: Box<dyn Write + Send>, options: TraceOptions) -> Self {
        Self {
            out: LineWriter::new(out),
            options,
            failed: false,
        }
    }

    /// The traced set.
    pub fn set(&self) -> &TraceSet {
        &self.options.set
    }

    /// Whether `-T` durations are wanted (so callers time their work).
    pub fn wants_durations(&self) -> bool {
        self.options.durations
    }

    /// Print one event of task `tid` that happened at `when`.
    pub fn line(&mut self, tid: i32, when: SystemTime, text: &str, took: Option<Duration>) {
        let mut line = format!("[pid {tid:>5}] ");
        match self.options.timestamps {
            Timestamps::None => {}
            Timestamps::Seconds => {
                let t = crate::sys::time::local_hms_micros(when);
                line.push_str(&t[..8]);
                line.push(' ');
            }
            Timestamps::Micros => {
                line.push_str(&crate::sys::time::local_hms_micros(when));
                line.push(' ');
            }
        }
        line.push_str(text);
        if let (true, Some(d)) = (self.options.durations, took) {
            let _ = write!(line, " <{}.{:06}>", d.as_secs(), d.subsec_micros());
        }
        line.push('\n');
        self.write(line.as_bytes());
    }

    /// Write raw text (the `--stats` block when it shares `-o`).
    pub fn write(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if let Err(e) = self.out.write_all(bytes) {
            self.failed = true;
            tracing::warn!("trace output failed, no more trace lines: {e}");
        }
    }

    /// Flush buffered output.
    pub fn flush(&mut self) {
        if !self.failed {
            let _ = self.out.flush();
        }
    }
}

/// strace's rendering of a result: `= 0`, `= 0x7f0000000000`,
/// `= -1 EINVAL (Invalid argument)`.
pub fn format_result(result: Result<i64, Errno>, hex: bool) -> String {
    match result {
        Ok(v) if hex => format!("= {v:#x}"),
        Ok(v) => format!("= {v}"),
        Err(e) => format!("= -1 {e:?} ({})", e.desc()),
    }
}

/// strace's line for a delivered signal:
/// `--- SIGSEGV {si_signo=SIGSEGV, si_code=SEGV_MAPERR, si_addr=0x8} ---`.
pub fn format_signal(info: &crate::sys::ptrace::SignalInfo) -> String {
    let name = |signo: i32| {
        nix::sys::signal::Signal::try_from(signo)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("SIG{signo}"))
    };
    let sig = name(info.signo);
    let code = match (info.signo, info.code) {
        (_, 0) => "SI_USER".to_owned(),
        (_, -1) => "SI_QUEUE".to_owned(),
        (_, -6) => "SI_TKILL".to_owned(),
        (_, 0x80) => "SI_KERNEL".to_owned(),
        (libc::SIGSEGV, 1) => "SEGV_MAPERR".to_owned(),
        (libc::SIGSEGV, 2) => "SEGV_ACCERR".to_owned(),
        (libc::SIGBUS, 1) => "BUS_ADRALN".to_owned(),
        (libc::SIGBUS, 2) => "BUS_ADRERR".to_owned(),
        (libc::SIGTRAP, 1) => "TRAP_BRKPT".to_owned(),
        (libc::SIGCHLD, 1) => "CLD_EXITED".to_owned(),
        (libc::SIGCHLD, 2) => "CLD_KILLED".to_owned(),
        (libc::SIGCHLD, 3) => "CLD_DUMPED".to_owned(),
        (libc::SIGCHLD, 5) => "CLD_STOPPED".to_owned(),
        (libc::SIGCHLD, 6) => "CLD_CONTINUED".to_owned(),
        (_, c) => c.to_string(),
    };
    let mut out = format!("--- {sig} {{si_signo={sig}, si_code={code}");
    if let Some(addr) = info.addr {
        let _ = write!(out, ", si_addr={addr:#x}");
    }
    if let Some((pid, uid)) = info.sender {
        let _ = write!(out, ", si_pid={pid}, si_uid={uid}");
    }
    out.push_str("} ---");
    out
}

/// Render `value` as `A|B|0x...` from a table of named bits; zero is `zero`.
pub fn format_flags(value: u64, names: &[(u64, &str)], zero: &str) -> String {
    if value == 0 {
        return zero.to_owned();
    }
    let mut out = String::new();
    let mut rest = value;
    for &(bit, name) in names {
        if bit != 0 && rest & bit == bit {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !out.is_empty() {
            out.push('|');
        }
        let _ = write!(out, "{rest:#x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_classes_and_negation() {
        let s = TraceSet::parse("vk_info,faults").expect("valid");
        assert!(s.hypercall(Some(Hypercall::VkInfo)));
        assert!(!s.hypercall(Some(Hypercall::VkMmap)));
        assert!(!s.hypercall(None));
        assert!(s.faults && !s.runs);

        let all = TraceSet::parse("all").expect("valid");
        assert_eq!(all, TraceSet::ALL);
        let vk = TraceSet::parse("%vkernel").expect("valid");
        assert!(Hypercall::ALL.iter().all(|h| vk.hypercall(Some(*h))));
        assert!(vk.hypercall(None) && !vk.faults && !vk.runs);

        let not = TraceSet::parse("!vk_info").expect("valid");
        assert!(!not.hypercall(Some(Hypercall::VkInfo)));
        assert!(not.hypercall(Some(Hypercall::Mcontrol)) && not.faults && not.runs);

        assert_eq!(TraceSet::parse("none"), Ok(TraceSet::NONE));
        assert_eq!(
            TraceSet::parse("vk_info,bogus"),
            Err(TraceSpecError::UnknownName("bogus".into()))
        );
        assert_eq!(TraceSet::parse(""), Err(TraceSpecError::Empty));
    }

    #[test]
    fn results_render_like_strace() {
        assert_eq!(format_result(Ok(0), false), "= 0");
        assert_eq!(
            format_result(Ok(0x7f00_0000_0000), true),
            "= 0x7f0000000000"
        );
        assert_eq!(
            format_result(Err(Errno::EINVAL), false),
            "= -1 EINVAL (Invalid argument)"
        );
    }

    #[test]
    fn signals_render_like_strace() {
        use crate::sys::ptrace::SignalInfo;
        let segv = SignalInfo {
            signo: libc::SIGSEGV,
            code: 1,
            addr: Some(8),
            sender: None,
        };
        assert_eq!(
            format_signal(&segv),
            "--- SIGSEGV {si_signo=SIGSEGV, si_code=SEGV_MAPERR, si_addr=0x8} ---"
        );
        let term = SignalInfo {
            signo: libc::SIGTERM,
            code: 0,
            addr: None,
            sender: Some((42, 0)),
        };
        assert_eq!(
            format_signal(&term),
            "--- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=42, si_uid=0} ---"
        );
    }

    #[test]
    fn flags_render_with_leftover_bits() {
        let names = [(1, "A"), (2, "B"), (8, "D")];
        assert_eq!(format_flags(0, &names, "0"), "0");
        assert_eq!(format_flags(3, &names, "0"), "A|B");
        assert_eq!(format_flags(0x15, &names, "0"), "A|0x14");
    }
}
