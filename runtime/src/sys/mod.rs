//! Raw system interfaces: the only place in the runtime with `unsafe`
//! (the crate denies `unsafe_code`; this module alone allows it).
//!
//! Every function exported from here is safe; each `unsafe` block carries a
//! `// SAFETY:` comment naming the invariants it relies on. Higher layers use
//! these wrappers and `nix`, never `libc` calls that need `unsafe`. Nothing
//! here imports the rest of the crate.

pub mod abi;
pub mod agent_code;
pub mod fatal;
pub mod futex;
pub mod kcmp;
pub mod proc;
pub mod ptrace;
pub mod region;
pub mod seccomp;
pub mod signal;
pub mod spawn;
pub mod stub;
pub mod time;
pub mod uffd;

/// Lock `m`. A thread that panicked while holding it cannot have left the
/// data half-updated in a way that matters more than going on.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
