//! The `vkrun` command line as a library, so that the man page and shell
//! completions are generated from the same definition the binary parses
//! (`cargo run -p xtask -- man OUTDIR`).
#![forbid(unsafe_code)]

pub mod cli;
pub mod size;
