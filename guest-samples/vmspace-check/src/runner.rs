//! A guest thread that RUNs a vmspace on request: the checks that need user
//! code running while this thread acts (signals, `EBUSY`, two contexts at
//! once, `hold-run`) hand it frames and collect what each RUN returned.
//!
//! One runner is one guest thread, so all its RUNs use the same execution
//! context (ABI section 7).

use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vkabi::hypercall::{self, Errno};
use vkabi::{TrapFrame, VMSPACE_CTL_RUN, VextFrame};
use vpte::GuestPhysAddr;

use crate::env::load;
use crate::report::errno_text;
use crate::sys;

/// How long a RUN may take to react (start making progress, return after a
/// signal, finish a bounded loop) before the check fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one RUN returned.
#[derive(Clone, Copy, Debug)]
pub struct RunEnd {
    /// The hypercall's result.
    pub result: Result<(), Errno>,
    /// The frame after the call.
    pub tf: TrapFrame,
    /// `sys::handled` for SIGUSR1 and SIGUSR2, read right after the call
    /// returned (the handler of a signal that ended the RUN has run by then).
    pub handled: [(u64, i32); 2],
    /// The runner thread's id.
    pub tid: i32,
}

impl RunEnd {
    /// That the call succeeded, or why not.
    pub fn ok(&self) -> Result<(), String> {
        self.result
            .map_err(|e| format!("vmspace_ctl(RUN) failed: {}", errno_text(e)))
    }
}

/// A guest thread that RUNs vmspace `id` with each frame it is given.
#[derive(Debug)]
pub struct Runner {
    to: Option<Sender<(TrapFrame, VextFrame)>>,
    from: Receiver<RunEnd>,
    /// A RUN end seen early (while waiting for progress).
    early: Option<RunEnd>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    /// Start the thread for vmspace `id`.
    pub fn new(id: u64) -> Runner {
        let (to, requests) = mpsc::channel::<(TrapFrame, VextFrame)>();
        let (results, from) = mpsc::channel();
        let thread = thread::spawn(move || {
            for (mut tf, mut vf) in requests {
                let result = hypercall::vmspace_ctl(id, VMSPACE_CTL_RUN, &mut tf, &mut vf);
                let handled = [sys::handled(libc::SIGUSR1), sys::handled(libc::SIGUSR2)];
                let end = RunEnd {
                    result,
                    tf,
                    handled,
                    tid: sys::gettid(),
                };
                if results.send(end).is_err() {
                    return;
                }
            }
        });
        Runner {
            to: Some(to),
            from,
            early: None,
            thread: Some(thread),
        }
    }

    /// Start a RUN with `tf` and `vf`.
    pub fn start(&mut self, tf: TrapFrame, vf: VextFrame) -> Result<(), String> {
        self.early = None;
        self.to
            .as_ref()
            .expect("the sender lives until drop")
            .send((tf, vf))
            .map_err(|_| "the runner thread is gone".to_owned())
    }

    /// Wait until the word at `pa` (a progress counter the user code writes)
    /// exceeds `above`; returns its value. Fails if the RUN ends first or
    /// nothing happens within [`RUN_TIMEOUT`].
    pub fn wait_progress(
        &mut self,
        ram: &[AtomicU64],
        pa: GuestPhysAddr,
        above: u64,
    ) -> Result<u64, String> {
        let start = Instant::now();
        loop {
            let v = load(ram, pa);
            if v > above {
                return Ok(v);
            }
            match self.from.try_recv() {
                Ok(end) => {
                    self.early = Some(end);
                    return Err(format!(
                        "RUN ended before the user code made progress (progress word {v:#x}, \
                         expected more than {above:#x}): {}, {}",
                        match end.result {
                            Ok(()) => "returned 0".to_owned(),
                            Err(e) => errno_text(e),
                        },
                        crate::env::describe(&end.tf)
                    ));
                }
                Err(TryRecvError::Disconnected) => {
                    return Err("the runner thread is gone".to_owned());
                }
                Err(TryRecvError::Empty) => {}
            }
            if start.elapsed() > RUN_TIMEOUT {
                return Err(format!(
                    "no progress within {RUN_TIMEOUT:?} (progress word {v:#x}, expected more \
                     than {above:#x}): RUN does not run the user code"
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send `sig` to the runner thread (`pthread_kill`).
    pub fn signal(&self, sig: i32) -> Result<(), String> {
        let thread = self.thread.as_ref().expect("the thread lives until drop");
        use std::os::unix::thread::JoinHandleExt;
        sys::pthread_kill(thread.as_pthread_t(), sig).map_err(|e| format!("pthread_kill: {e}"))
    }

    /// Wait for the RUN to return, up to [`RUN_TIMEOUT`].
    pub fn wait_end(&mut self) -> Result<RunEnd, String> {
        self.wait_end_for(RUN_TIMEOUT)?
            .ok_or_else(|| format!("RUN did not return within {RUN_TIMEOUT:?}"))
    }

    /// Wait for the RUN to return, up to `limit`: `None` if it has not.
    pub fn wait_end_for(&mut self, limit: Duration) -> Result<Option<RunEnd>, String> {
        if let Some(end) = self.early.take() {
            return Ok(Some(end));
        }
        match self.from.recv_timeout(limit) {
            Ok(end) => Ok(Some(end)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err("the runner thread is gone".to_owned()),
        }
    }

    /// Run `tf` to its end (a bounded snippet) and return what RUN gave.
    pub fn run(&mut self, tf: TrapFrame, vf: VextFrame) -> Result<RunEnd, String> {
        self.start(tf, vf)?;
        self.wait_end()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Closing the request channel ends the thread once it is idle; a
        // thread stuck inside RUN (a failed check) is left behind and dies
        // with the process.
        self.to = None;
        let start = Instant::now();
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && start.elapsed() < Duration::from_secs(1) {
                thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
