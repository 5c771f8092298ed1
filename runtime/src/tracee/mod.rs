//! Mechanisms on stopped tracees: running system calls inside one
//! ([`inject`]) and reading and writing its memory ([`remote`]), and the
//! token that says which thread may ptrace ([`Tracer`]).
//!
//! ptrace requests are bound to the thread that attached: every function
//! here that issues one takes a `&Tracer`, which only the supervisor's
//! event loop holds. Remote memory access needs no token.

pub mod inject;
pub mod remote;

use std::marker::PhantomData;

/// The tracer thread's token: held by the supervisor's event loop, lent to
/// whatever must ptrace (injections, stub set-up, jobs queued for the
/// tracer). Neither `Send` nor `Sync`, so it cannot leave that thread.
#[derive(Debug)]
pub struct Tracer {
    _this_thread: PhantomData<*const ()>,
}

impl Tracer {
    /// The token of the calling thread. Only the thread that attaches to
    /// the guest (the supervisor's) calls this, once.
    pub(crate) fn this_thread() -> Tracer {
        Tracer {
            _this_thread: PhantomData,
        }
    }

    /// A second token for a part of the supervisor that lives on the
    /// tracer thread and must ptrace from inside a callback that cannot be
    /// lent one (the GDB stub's target). Holding `self` proves the caller
    /// is the tracer thread; the copy cannot leave it either.
    pub(crate) fn share(&self) -> Tracer {
        Tracer {
            _this_thread: PhantomData,
        }
    }
}
