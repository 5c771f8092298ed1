//! The conformance areas, one module each; each module's doc lists the
//! checks it prints.

mod errors;
mod forge;
mod fork;
pub mod hold;
mod hostile;
mod isolation;
mod kick;
mod paging;
mod prw;
mod regs;
mod scribble;
mod signals;
mod threads;
mod traps;

use crate::env::Env;
use crate::report::{Outcome, Report};

/// One area: its name on the command line and in every line it prints.
#[derive(Debug)]
pub struct Area {
    /// The subcommand.
    pub name: &'static str,
    /// Run the checks.
    pub run: fn(&mut Env, &mut Report) -> Outcome,
}

/// Every area, in `all` order.
pub const AREAS: [Area; 9] = [
    Area {
        name: "errors",
        run: errors::run,
    },
    Area {
        name: "regs",
        run: regs::run,
    },
    Area {
        name: "traps",
        run: traps::run,
    },
    Area {
        name: "paging",
        run: paging::run,
    },
    Area {
        name: "isolation",
        run: isolation::run,
    },
    Area {
        name: "signals",
        run: signals::run,
    },
    Area {
        name: "threads",
        run: threads::run,
    },
    Area {
        name: "prw",
        run: prw::run,
    },
    Area {
        name: "fork",
        run: fork::run,
    },
];

/// Not part of `all`: user code attacking vkrun's pages in its stub.
pub const HOSTILE_STUB: Area = Area {
    name: "hostile-stub",
    run: hostile::run,
};

/// Not part of `all` (it takes seconds): user code ignoring vkrun's kick.
pub const KICK_IGNORE: Area = Area {
    name: "kick-ignore",
    run: kick::run,
};

/// Not part of `all`: user code forging the stub agent's answers.
pub const AGENT_FORGE: Area = Area {
    name: "agent-forge",
    run: forge::run,
};

/// Not part of `all`: user code scribbling over vkrun's pages in its stub.
pub const HOSTILE_SCRIBBLE: Area = Area {
    name: "hostile-scribble",
    run: scribble::run,
};
