//! What the guest prints: `ok <area>.<check>` per passing check,
//! `FAIL <area>.<check>: <detail>` per failing one, and `FAIL <area>:
//! <detail>` when the area cannot go on (a set-up step failed).

use std::fmt::Display;

use vkabi::TrapFrame;
use vkabi::hypercall::Errno;
pub use vkguest::{errno_text, must};

use crate::env::describe;

/// A failure that ends the area: what failed and why.
pub type Outcome = Result<(), String>;

/// The checks of one area.
#[derive(Debug)]
pub struct Report {
    area: &'static str,
    oks: u32,
    failures: u32,
}

impl Report {
    /// A report for `area`.
    pub fn new(area: &'static str) -> Report {
        Report {
            area,
            oks: 0,
            failures: 0,
        }
    }

    /// Passing checks so far.
    pub fn oks(&self) -> u32 {
        self.oks
    }

    /// Failing checks so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Record a check: `ok <area>.<name>`, or a FAIL line with `detail()`.
    /// Returns `pass`.
    pub fn check(
        &mut self,
        name: impl Display,
        pass: bool,
        detail: impl FnOnce() -> String,
    ) -> bool {
        if pass {
            self.oks += 1;
            println!("ok {}.{name}", self.area);
        } else {
            self.failures += 1;
            println!("FAIL {}.{name}: {}", self.area, detail());
        }
        pass
    }

    /// Record a check whose outcome is `Ok` or a detail.
    pub fn result(&mut self, name: impl Display, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => self.check(name, true, String::new),
            Err(detail) => self.check(name, false, || detail),
        }
    }

    /// A value check: `expected X, got Y` in hex.
    pub fn eq(&mut self, name: impl Display, what: &str, got: u64, want: u64) -> bool {
        self.check(name, got == want, || {
            format!("{what}: expected {want:#x}, got {got:#x}")
        })
    }

    /// A hypercall that must fail with `want`.
    pub fn errno<T: std::fmt::Debug>(
        &mut self,
        name: impl Display,
        call: &str,
        got: Result<T, Errno>,
        want: Errno,
    ) -> bool {
        self.check(name, got.as_ref().err() == Some(&want), || {
            format!("{call}: expected {}, got {}", errno_text(want), show(&got))
        })
    }

    /// A hypercall that must succeed.
    pub fn success<T: std::fmt::Debug>(
        &mut self,
        name: impl Display,
        call: &str,
        got: Result<T, Errno>,
    ) -> bool {
        self.check(name, got.is_ok(), || {
            format!("{call}: expected success, got {}", show(&got))
        })
    }

    /// Count a failure that ended the area: `FAIL <area>: <msg>`.
    pub fn fail(&mut self, msg: &str) {
        self.failures += 1;
        println!("FAIL {}: {msg}", self.area);
    }
}

/// A hypercall result for a FAIL line.
pub fn show<T: std::fmt::Debug>(r: &Result<T, Errno>) -> String {
    match r {
        Ok(v) => format!("success ({v:#x?})"),
        Err(e) => errno_text(*e),
    }
}

/// That RUN stopped with `trapno` at `rip` (`None`: any rip), or why not.
pub fn trap(tf: &TrapFrame, trapno: u64, rip: Option<u64>) -> Result<(), String> {
    if tf.tf_trapno != trapno {
        return Err(format!(
            "expected tf_trapno {trapno:#x}, got {}",
            describe(tf)
        ));
    }
    match rip {
        Some(rip) if tf.tf_rip != rip => {
            Err(format!("expected tf_rip {rip:#x}, got {}", describe(tf)))
        }
        _ => Ok(()),
    }
}

/// That `got` is `want`, or `<what>: expected X, got Y` in hex.
pub fn same(got: u64, want: u64, what: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: expected {want:#x}, got {got:#x}"))
    }
}
