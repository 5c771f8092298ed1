//! Raw system interfaces: the only place in the supervisor with `unsafe`.
//!
//! Every function exported from here is safe; each `unsafe` block carries a
//! `// SAFETY:` comment naming the invariants it relies on. Higher layers use
//! these wrappers and `nix`, never `libc` calls that need `unsafe`.

pub mod agent_code;
pub mod futex;
pub mod kcmp;
pub mod ptrace;
pub mod seccomp;
pub mod signal;
pub mod spawn;
pub mod stub;
pub mod time;
pub mod uffd;
