//! `hello-vmspace`: the bundled demo program for the minikernel, a
//! freestanding static x86-64 Linux executable (no libc, no std: its own
//! `_start`, raw `syscall`s) that cargo builds on any machine that builds
//! the workspace, so README's first command needs nothing installed:
//!
//! ```text
//! cargo build --release --workspace
//! target/release/vkrun -m 256M -- target/release/minikernel target/release/hello-vmspace
//! ```
//!
//! The executable is `target/<profile>/hello-vmspace`, compiled by this
//! package's build.rs from `src/program.rs` (entry point, panic handler,
//! `mem*` functions) and [`app`] (everything it does), with
//! `-C panic=abort`: stable Rust cannot build a `no_std` executable under
//! the workspace's `panic = "unwind"` profiles, and a profile cannot be
//! overridden per package for `panic`. This library is the same [`app`]
//! module, so that clippy, rustfmt and the unit tests cover it.

#![cfg_attr(not(test), no_std)]

pub mod app;
