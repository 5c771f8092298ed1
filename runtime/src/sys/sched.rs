//! Scheduling policy of vkrun's own threads.

use nix::errno::Errno;
use nix::unistd::Pid;

/// Put task `tid` (0: the calling thread) in `SCHED_BATCH`: its wake-ups do
/// not preempt the waker. vkrun's hand-offs (hypercall thread, RUN waiters,
/// execution contexts) wake the next task and then block at once;
/// preempting the waker only adds a context switch back to it.
pub fn set_batch(tid: Pid) -> Result<(), Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call.
    let r = unsafe { libc::sched_setscheduler(tid.as_raw(), libc::SCHED_BATCH, &param) };
    Errno::result(r).map(drop)
}
