//! The strace-like trace: which events to show (`-e trace=SET`), the
//! writer that prints them in strace's line grammar, and ([`format`]) the
//! rendering of calls, results, traps, faults and signals, from primitives
//! to text. Nothing here knows the domain modules.
//!
//! This is product output with its own writer, not a log: diagnostics go
//! through `tracing`.

pub mod format;
mod syscalls;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use vkabi::Hypercall;

/// A `-e trace=` expression that names nothing vkrun knows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceSpecError {
    /// a name in the set is not a hypercall or a class
    #[error(
        "invalid trace name '{0}' (hypercall names, %vkernel, faults, runs, process, all, none)"
    )]
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
    /// Process events: fork, vfork, clone, execve (strace's `%process`).
    pub process: bool,
}

const ALL_HYPERCALLS: u32 = (1 << Hypercall::ALL.len()) - 1;

impl TraceSet {
    /// Nothing traced.
    pub const NONE: TraceSet = TraceSet {
        hypercalls: 0,
        unknown: false,
        faults: false,
        runs: false,
        process: false,
    };

    /// Everything traced (`--trace`, `-e trace=all`).
    pub const ALL: TraceSet = TraceSet {
        hypercalls: ALL_HYPERCALLS,
        unknown: true,
        faults: true,
        runs: true,
        process: true,
    };

    /// Parse strace's grammar: a comma-separated list of hypercall names,
    /// `%vkernel` (every hypercall), `faults`, `runs`, `process` (or
    /// `%process`: fork, vfork, clone, execve), `all` or `none`; a
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
                "process" | "%process" => set.process = true,
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
            process: self.process || other.process,
        }
    }

    fn complement(self) -> TraceSet {
        TraceSet {
            hypercalls: !self.hypercalls & ALL_HYPERCALLS,
            unknown: !self.unknown,
            faults: !self.faults,
            runs: !self.runs,
            process: !self.process,
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

/// strace's `-t` (seconds), `-tt` (microseconds) and `-ttt` (seconds
/// since the epoch) time prefixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Timestamps {
    /// No prefix.
    #[default]
    None,
    /// `HH:MM:SS`.
    Seconds,
    /// `HH:MM:SS.uuuuuu`.
    Micros,
    /// `SSSSSSSSSS.uuuuuu` since the epoch.
    Epoch,
}

/// Trace options from the command line.
#[derive(Clone, Debug, Default)]
pub struct TraceOptions {
    /// What to trace.
    pub set: TraceSet,
    /// `-t`/`-tt`/`-ttt`: prefix each line with the wall-clock time.
    pub timestamps: Timestamps,
    /// `-r`: prefix each line with the time since the previous line.
    pub relative: bool,
    /// `-T`: append the time spent in each call.
    pub durations: bool,
    /// `-ff` with `-o FILE`: each task's lines go to `FILE.TID`, without
    /// the `[pid N]` prefix (the `--stats` block to the main output).
    pub per_task: Option<PathBuf>,
}

/// Prints trace lines: `[pid N] [time ]text[ <secs>]`.
pub struct TraceWriter {
    out: LineWriter<Box<dyn Write + Send>>,
    options: TraceOptions,
    failed: bool,
    /// Calls that began and have not ended (a RUN), printed whole when they
    /// end, or as strace's `<unfinished ...>` as soon as another line comes
    /// first (a fault the RUN's user code took, another thread's call).
    begun: Vec<Begun>,
    /// When the previous line's event happened (`-r`).
    last: Option<SystemTime>,
    /// `-ff`: each task's own file.
    task_files: HashMap<i32, LineWriter<File>>,
}

/// A call that began: its task, when, its text, and whether its
/// `<unfinished ...>` half is out.
#[derive(Debug)]
struct Begun {
    tid: i32,
    when: SystemTime,
    call: String,
    shown: bool,
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
            begun: Vec::new(),
            last: None,
            task_files: HashMap::new(),
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

    /// Call `call` (`name(args)`) of task `tid` began at `when`; its line
    /// comes with [`TraceWriter::end`].
    pub fn begin(&mut self, tid: i32, when: SystemTime, call: String) {
        self.begun.retain(|b| b.tid != tid);
        self.begun.push(Begun {
            tid,
            when,
            call,
            shown: false,
        });
    }

    /// Task `tid`'s call `call` (begun at `when`, or never begun) ended with
    /// `result` (`= 0 ...`): one line `call result`, or, if other lines came
    /// between, `<... name resumed>) result` after the `<unfinished ...>`.
    pub fn end(
        &mut self,
        tid: i32,
        when: SystemTime,
        call: &str,
        result: &str,
        took: Option<Duration>,
    ) {
        let begun = self
            .begun
            .iter()
            .position(|b| b.tid == tid)
            .map(|i| self.begun.swap_remove(i));
        match begun {
            Some(b) if b.shown => {
                let name = b.call.split('(').next().unwrap_or_default();
                let text = format!("<... {name} resumed>) {result}");
                self.line(tid, SystemTime::now(), &text, took);
            }
            Some(b) => self.line(tid, b.when, &format!("{} {result}", b.call), took),
            None => self.line(tid, when, &format!("{call} {result}"), took),
        }
    }

    /// Print one event of task `tid` that happened at `when` (after the
    /// `<unfinished ...>` half of every call still under way).
    pub fn line(&mut self, tid: i32, when: SystemTime, text: &str, took: Option<Duration>) {
        let mut unfinished = Vec::new();
        for b in self.begun.iter_mut().filter(|b| !b.shown) {
            b.shown = true;
            let open = b.call.strip_suffix(')').unwrap_or(&b.call);
            unfinished.push((b.tid, b.when, format!("{open} <unfinished ...>")));
        }
        for (tid, when, text) in unfinished {
            self.print(tid, when, &text, None);
        }
        self.print(tid, when, text, took);
    }

    fn print(&mut self, tid: i32, when: SystemTime, text: &str, took: Option<Duration>) {
        crate::sys::fatal::test_panic_point("trace");
        let mut line = if self.options.per_task.is_some() {
            String::new()
        } else {
            format!("[pid {tid:>5}] ")
        };
        if self.options.relative {
            // strace -r: the time since the previous line (0 for the first).
            let since = self
                .last
                .and_then(|last| when.duration_since(last).ok())
                .unwrap_or_default();
            let _ = write!(line, "{:>6}.{:06} ", since.as_secs(), since.subsec_micros());
            self.last = Some(self.last.map_or(when, |last| last.max(when)));
        }
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
            Timestamps::Epoch => {
                let since = when
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let _ = write!(line, "{}.{:06} ", since.as_secs(), since.subsec_micros());
            }
        }
        line.push_str(text);
        if let (true, Some(d)) = (self.options.durations, took) {
            let _ = write!(line, " <{}.{:06}>", d.as_secs(), d.subsec_micros());
        }
        line.push('\n');
        if self.options.per_task.is_some() {
            self.write_task(tid, line.as_bytes());
        } else {
            self.write(line.as_bytes());
        }
    }

    /// `-ff`: write to task `tid`'s file, opening `FILE.TID` on its first
    /// line. A file that cannot be opened or written ends the trace, as a
    /// failed output does.
    fn write_task(&mut self, tid: i32, bytes: &[u8]) {
        if self.failed {
            return;
        }
        let Some(base) = &self.options.per_task else {
            return;
        };
        let path = PathBuf::from(format!("{}.{tid}", base.display()));
        let file = match self.task_files.entry(tid) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => match File::create(&path) {
                Ok(f) => v.insert(LineWriter::new(f)),
                Err(e) => {
                    self.failed = true;
                    tracing::warn!("cannot open {}: {e}; no more trace lines", path.display());
                    return;
                }
            },
        };
        if let Err(e) = file.write_all(bytes) {
            self.failed = true;
            tracing::warn!(
                "trace output {} failed, no more trace lines: {e}",
                path.display()
            );
        }
    }

    /// Write raw text (the `--stats` block when it shares `-o`).
    pub fn write(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        // A closed or full output (a pipe into `head`, a FIFO whose reader
        // left, /dev/full) ends the trace, not the guest: the guest runs on
        // untraced, and vkrun says so once (on a stderr that may itself be
        // closed: diagnostics never fail).
        if let Err(e) = self.out.write_all(bytes) {
            self.failed = true;
            tracing::warn!("trace output failed, no more trace lines: {e}");
        }
    }

    /// Flush buffered output.
    pub fn flush(&mut self) {
        if !self.failed {
            let _ = self.out.flush();
            for f in self.task_files.values_mut() {
                let _ = f.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_call_interrupted_by_other_lines_is_unfinished_then_resumed() {
        let out = Shared::default();
        let mut w = TraceWriter::new(Box::new(out.clone()), TraceOptions::default());
        let t = SystemTime::now();
        // Nothing between: one whole line.
        w.begin(
            7,
            t,
            "vmspace_ctl(0x1, VMSPACE_CTL_RUN, 0x10, 0x20)".to_owned(),
        );
        w.end(7, t, "ignored", "= 0 (T_FAST_SYSCALL)", None);
        // A fault line between: the two halves, each once.
        w.begin(
            7,
            t,
            "vmspace_ctl(0x1, VMSPACE_CTL_RUN, 0x10, 0x20)".to_owned(),
        );
        w.line(7, t, "fault(0x1000, V frame=0x0, read) = 0x2000 ro", None);
        w.line(8, t, "vk_info(0x30, 48) = 0", None);
        w.end(7, t, "ignored", "= 0 (T_PAGEFLT)", None);
        // Never begun: the call text given at the end.
        w.end(9, t, "vmspace_ctl(0x2)", "= -1 EINTR", None);
        w.flush();
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "[pid     7] vmspace_ctl(0x1, VMSPACE_CTL_RUN, 0x10, 0x20) = 0 (T_FAST_SYSCALL)",
                "[pid     7] vmspace_ctl(0x1, VMSPACE_CTL_RUN, 0x10, 0x20 <unfinished ...>",
                "[pid     7] fault(0x1000, V frame=0x0, read) = 0x2000 ro",
                "[pid     8] vk_info(0x30, 48) = 0",
                "[pid     7] <... vmspace_ctl resumed>) = 0 (T_PAGEFLT)",
                "[pid     9] vmspace_ctl(0x2) = -1 EINTR",
            ]
        );
    }

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
}
