//! The conformance areas, one module each; each module's doc lists the
//! lines it prints on success.

mod alias;
mod args;
mod dirperm;
mod inval;
mod kernel;
mod kva;
mod readonly;
mod scatter;
mod segv;
mod superpage;
mod threads;

use crate::env::Env;
use crate::report::{Outcome, Report};

/// One area: its name on the command line and in every line it prints.
#[derive(Debug)]
pub struct Area {
    /// The subcommand.
    pub name: &'static str,
    /// Whether it takes a count (`scatter N`).
    pub takes_count: bool,
    /// Run the checks.
    pub run: fn(&mut Env, &mut Report, Option<u64>) -> Outcome,
}

/// Every area, in demo order.
pub const AREAS: [Area; 11] = [
    area("args", args::run),
    area("dirperm", dirperm::run),
    area("alias", alias::run),
    area("readonly", readonly::run),
    area("segv", segv::run),
    area("superpage", superpage::run),
    area("inval", inval::run),
    area("kernel", kernel::run),
    area("kva", kva::run),
    Area {
        name: "scatter",
        takes_count: true,
        run: scatter::run,
    },
    area("threads", threads::run),
];

const fn area(name: &'static str, run: fn(&mut Env, &mut Report, Option<u64>) -> Outcome) -> Area {
    Area {
        name,
        takes_count: false,
        run,
    }
}
