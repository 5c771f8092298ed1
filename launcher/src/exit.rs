//! vkrun's exit status, which is API: the guest's own status, or one of a
//! small documented set for vkrun's failures.

use vkrun_runtime::{Error, Outcome};

/// Every status vkrun can exit with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest exited with this code.
    Guest(u8),
    /// The guest was killed by signal N: 128 + N.
    GuestSignaled(i32),
    /// A bad command line (clap's convention): 2.
    Usage,
    /// vkrun itself failed: 125.
    VkrunFailure,
    /// The guest exists but cannot be executed: 126.
    CannotExecute,
    /// The guest was not found: 127.
    NotFound,
}

impl ExitStatus {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Guest(code) => i32::from(code),
            ExitStatus::GuestSignaled(sig) => 128 + sig,
            ExitStatus::Usage => 2,
            ExitStatus::VkrunFailure => 125,
            ExitStatus::CannotExecute => 126,
            ExitStatus::NotFound => 127,
        }
    }
}

impl From<&Outcome> for ExitStatus {
    fn from(outcome: &Outcome) -> Self {
        match *outcome {
            Outcome::Exited(code) => ExitStatus::Guest(code as u8),
            Outcome::Signaled { signal, .. } => ExitStatus::GuestSignaled(signal as i32),
        }
    }
}

impl From<&Error> for ExitStatus {
    fn from(err: &Error) -> Self {
        match err {
            Error::NotFound { .. } | Error::NoSuchFile { .. } => ExitStatus::NotFound,
            Error::CannotExecute { .. } => ExitStatus::CannotExecute,
            Error::Ram(_) | Error::Sys { .. } | Error::Setup { .. } => ExitStatus::VkrunFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use nix::sys::signal::Signal;

    #[test]
    fn codes() {
        assert_eq!(ExitStatus::from(&Outcome::Exited(3)).code(), 3);
        assert_eq!(ExitStatus::from(&Outcome::Exited(256 + 7)).code(), 7);
        let segv = Outcome::Signaled {
            signal: Signal::SIGSEGV,
            core_dumped: true,
        };
        assert_eq!(ExitStatus::from(&segv).code(), 139);
        let nf = Error::NotFound {
            program: "x".into(),
        };
        assert_eq!(ExitStatus::from(&nf).code(), 127);
        let ce = Error::CannotExecute {
            program: "x".into(),
            errno: Errno::EACCES,
        };
        assert_eq!(ExitStatus::from(&ce).code(), 126);
        let sys = Error::Sys {
            what: "fork",
            errno: Errno::EAGAIN,
        };
        assert_eq!(ExitStatus::from(&sys).code(), 125);
        assert_eq!(ExitStatus::Usage.code(), 2);
    }
}
