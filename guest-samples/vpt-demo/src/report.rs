//! What the guest prints: `<area>: <check> ok` per passing check (or, in
//! the demo, one summary line per area), `<area>: FAIL <check>: <detail>`
//! per failing one.

use std::fmt::Display;

use vkabi::hypercall::Errno;
pub use vkguest::{errno_text, must};

/// A failure that ends the area: the check that failed and why.
pub type Outcome = Result<(), String>;

/// The checks of one area.
#[derive(Debug)]
pub struct Report {
    area: &'static str,
    verbose: bool,
    oks: u32,
    failures: u32,
    summary: String,
}

impl Report {
    /// A report for `area`; `verbose` prints one line per passing check.
    pub fn new(area: &'static str, verbose: bool) -> Report {
        Report {
            area,
            verbose,
            oks: 0,
            failures: 0,
            summary: String::new(),
        }
    }

    /// The area's name.
    pub fn area(&self) -> &'static str {
        self.area
    }

    /// Passing checks so far.
    pub fn oks(&self) -> u32 {
        self.oks
    }

    /// Failing checks so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The area's one-line summary for the demo.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// Set the summary.
    pub fn set_summary(&mut self, s: impl Into<String>) {
        self.summary = s.into();
    }

    /// A line of information (verbose mode only): `<area>: <msg>`.
    pub fn info(&self, msg: impl Display) {
        if self.verbose {
            println!("{}: {msg}", self.area);
        }
    }

    /// Record a check: `<area>: <what> ok`, or a FAIL line with `detail()`;
    /// the area goes on either way. Returns `pass`.
    pub fn check(
        &mut self,
        what: impl Display,
        pass: bool,
        detail: impl FnOnce() -> String,
    ) -> bool {
        if pass {
            self.oks += 1;
            if self.verbose {
                println!("{}: {what} ok", self.area);
            }
        } else {
            self.failures += 1;
            println!("{}: FAIL {what}: {}", self.area, detail());
        }
        pass
    }

    /// Count a failure reported by the caller (an [`Outcome`] that ended the
    /// area), printing it.
    pub fn fail(&mut self, msg: &str) {
        self.failures += 1;
        println!("{}: FAIL {msg}", self.area);
    }
}

/// A hypercall result for a FAIL line.
pub fn show(r: Result<u64, Errno>) -> String {
    match r {
        Ok(v) => format!("returned {v:#x}"),
        Err(e) => format!("failed with {}", errno_text(e)),
    }
}
