//! `vpt-demo`: a guest that exercises `MAP_VPAGETABLE` (ABI sections 2-6)
//! and checks itself.
//!
//! ```text
//! vpt-demo                 the demo: every area in turn, one line each
//! vpt-demo AREA            one area, one `AREA: CHECK ok` line per check
//! vpt-demo scatter [N]     N scattered pages (default 2000)
//! ```
//!
//! Areas: `args`, `alias`, `readonly`, `segv`, `superpage`, `inval`,
//! `kernel`, `kva`, `scatter`, `threads` (see `checks/`; each module's doc
//! lists its checks). A failing check prints `AREA: FAIL CHECK: DETAIL`.
//!
//! Every area maps guest RAM as its direct map (DMAP), builds 4-level tables
//! in RAM with `vpte`'s builder (frames from 1 MiB up), maps a window with
//! `vk_mmap(MAP_SHARED|MAP_VPAGETABLE)`, points it at the tables with
//! `MADV_SETMAP`, and compares what the window shows with what the DMAP
//! holds.
//!
//! Exit status: 0 when every check passes; 1 when one fails, or when
//! `vk_info` fails (`vk_info: Function not implemented` on stderr without
//! vkrun); 2 for a bad command line. An unexpected SIGSEGV prints
//! `vpt-demo: FAIL unexpected SIGSEGV` and kills the process.

mod checks;
mod env;
mod report;
mod sys;

use std::process::ExitCode;

use crate::env::Env;
use crate::report::Report;

const USAGE: &str = "usage: vpt-demo [args|dirperm|alias|readonly|segv|superpage|inval|kernel|kva|scatter [N]|threads]";

/// What the command line asked for.
enum Plan {
    Demo,
    One(&'static checks::Area, Option<u64>),
}

fn parse(args: &[String]) -> Option<Plan> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let (name, rest) = match words.as_slice() {
        [] => return Some(Plan::Demo),
        [name, rest @ ..] => (*name, rest),
    };
    let area = checks::AREAS.iter().find(|a| a.name == name)?;
    let param = match (rest, area.takes_count) {
        ([], _) => None,
        ([n], true) => Some(n.parse::<u64>().ok().filter(|n| *n > 0)?),
        _ => return None,
    };
    Some(Plan::One(area, param))
}

fn main() -> ExitCode {
    let (plan, info) = match vkguest::start(USAGE, parse) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut env = match Env::new(info) {
        Ok(env) => env,
        Err(e) => {
            println!("vpt-demo: FAIL {e}");
            return ExitCode::from(1);
        }
    };
    let passed = match plan {
        Plan::One(area, param) => run_area(&mut env, area, param, true).is_some(),
        Plan::Demo => demo(&mut env),
    };
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Run one area; `Some(checks passed)` if none failed.
fn run_area(env: &mut Env, area: &checks::Area, param: Option<u64>, verbose: bool) -> Option<u32> {
    let mut rep = Report::new(area.name, verbose);
    if let Err(msg) = (area.run)(env, &mut rep, param) {
        rep.fail(&msg);
    }
    (rep.failures() == 0).then(|| {
        if !verbose {
            println!(
                "  {:<10} {:>2} ok  {}",
                rep.area(),
                rep.oks(),
                rep.summary()
            );
        }
        rep.oks()
    })
}

/// Every area in turn, one line each.
fn demo(env: &mut Env) -> bool {
    println!(
        "vpt-demo: {} MiB of guest RAM on fd {}, direct map at {:#x}, tables from pa {:#x}",
        env.info.ram_size >> 20,
        env.ram_fd(),
        env.dmap_addr(),
        env::FIRST_FRAME
    );
    let mut total = 0;
    for area in &checks::AREAS {
        match run_area(env, area, None, false) {
            Some(n) => total += n,
            None => return false,
        }
    }
    println!(
        "vpt-demo: all {} areas pass ({total} checks)",
        checks::AREAS.len()
    );
    true
}
