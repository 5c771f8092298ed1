//! `vmspace-check`: a guest that checks every line of ABI section 7
//! (vmspaces: `vmspace_create`/`destroy`/`ctl(RUN)`/`mmap`/`munmap`/
//! `mcontrol`/`pread`/`pwrite`) from the guest's side, running small x86-64
//! snippets as user code in vmspaces.
//!
//! ```text
//! vmspace-check AREA        one area: `ok AREA.CHECK` per passing check,
//!                           `FAIL AREA.CHECK: DETAIL` per failing one
//! vmspace-check all         every area in turn, then `vmspace-check: N ok, M failed`
//! vmspace-check hold-run    RUN spinning user code in two vmspaces, print
//!                           `running PID`, then block until killed
//! vmspace-check exit-running  the same, then exit 0 while both RUNs spin,
//!                           as soon as stdin has a line or ends
//! vmspace-check hold-window  a window with one page installed, one
//!                           faulted and the rest untouched; print `window
//!                           VA PAGES`, then exit once stdin has a line or ends
//! vmspace-check fuzz SEED N N random hypercalls with hostile arguments
//!                           (see `fuzz.rs`), then `fuzz: N calls, ...`
//! ```
//!
//! Areas: `errors`, `regs`, `traps`, `paging`, `isolation`, `signals`,
//! `threads`, `prw`, `fork` (see `checks/`; each module's doc lists its
//! checks). A set-up step that fails ends its area with `FAIL AREA: DETAIL`.
//!
//! Exit status: 0 when every check passes; 1 when one fails, or when
//! `vk_info` fails (`vk_info: Function not implemented` on stderr without
//! vkrun); 2 for a bad command line.

mod checks;
mod env;
mod fuzz;
mod report;
mod runner;
mod sys;
mod user;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use crate::env::Env;
use crate::report::Report;

const USAGE: &str = "usage: vmspace-check [errors|regs|traps|paging|isolation|signals|threads|prw|fork|all|hold-run|exit-running|hold-window|stub-death|hostile-stub|hostile-scribble|kick-ignore|fuzz SEED N]";

/// What the command line asked for.
enum Plan {
    One(&'static checks::Area),
    All,
    HoldRun { exit: bool },
    HoldWindow,
    StubDeath,
    Fuzz { seed: u64, calls: u64 },
}

fn parse(args: &[String]) -> Option<Plan> {
    match args {
        [fuzz, seed, calls] if fuzz == "fuzz" => Some(Plan::Fuzz {
            seed: seed.parse().ok()?,
            calls: calls.parse().ok()?,
        }),
        [name] => match name.as_str() {
            "all" => Some(Plan::All),
            "hold-run" => Some(Plan::HoldRun { exit: false }),
            "exit-running" => Some(Plan::HoldRun { exit: true }),
            "hold-window" => Some(Plan::HoldWindow),
            "stub-death" => Some(Plan::StubDeath),
            "hostile-stub" => Some(Plan::One(&checks::HOSTILE_STUB)),
            "hostile-scribble" => Some(Plan::One(&checks::HOSTILE_SCRIBBLE)),
            "kick-ignore" => Some(Plan::One(&checks::KICK_IGNORE)),
            name => checks::AREAS.iter().find(|a| a.name == name).map(Plan::One),
        },
        _ => None,
    }
}

fn main() -> ExitCode {
    let (plan, info) = match vkguest::start(USAGE, parse) {
        Ok(started) => started,
        Err(code) => return code,
    };
    if let Plan::Fuzz { seed, calls } = plan {
        let code = fuzz::run(seed, calls, info.ram_fd, info.ram_size);
        let _ = std::io::stdout().flush();
        return ExitCode::from(code);
    }
    let mut env = match Env::new(info) {
        Ok(env) => env,
        Err(e) => {
            println!("FAIL vmspace-check: {e}");
            return ExitCode::from(1);
        }
    };
    let failures = match plan {
        Plan::Fuzz { .. } => unreachable!("run above"),
        Plan::One(area) => run_area(&mut env, area).1,
        Plan::All => {
            let (oks, failures) = checks::AREAS
                .iter()
                .map(|a| run_area(&mut env, a))
                .fold((0, 0), |(o, f), (a, b)| (o + a, f + b));
            println!("vmspace-check: {oks} ok, {failures} failed");
            failures
        }
        Plan::HoldWindow => match checks::hold::window(&mut env) {
            Ok(()) => {
                let _ = std::io::stdin().read_line(&mut String::new());
                0
            }
            Err(e) => {
                println!("FAIL hold-window: {e}");
                1
            }
        },
        Plan::StubDeath => match checks::hold::stub_death(&mut env) {
            Ok(()) => 0,
            Err(e) => {
                println!("FAIL stub-death: {e}");
                1
            }
        },
        Plan::HoldRun { exit } => match checks::hold::run(&mut env) {
            Ok(()) if exit => {
                // Exit (returning from main: exit_group) once stdin has a
                // line or ends, while both RUNs spin.
                let _ = std::io::stdin().read_line(&mut String::new());
                0
            }
            Ok(()) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Err(e) => {
                println!("FAIL hold-run: {e}");
                1
            }
        },
    };
    let _ = std::io::stdout().flush();
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Run one area; returns its numbers of passing and failing checks.
fn run_area(env: &mut Env, area: &checks::Area) -> (u32, u32) {
    let mut rep = Report::new(area.name);
    if let Err(msg) = (area.run)(env, &mut rep) {
        rep.fail(&msg);
    }
    (rep.oks(), rep.failures())
}
