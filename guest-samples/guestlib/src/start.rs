//! The start every test guest's `main` shares: its command line, then
//! `vk_info`, each with its exit status when it fails.

use std::process::ExitCode;

use vkabi::VkInfo;
use vkabi::hypercall;

use crate::errno::strerror;

/// `vk_info`, or `None` after printing `vk_info: <strerror>` on stderr
/// (`Function not implemented` when not run under vkrun).
pub fn vk_info() -> Option<VkInfo> {
    match hypercall::vk_info() {
        Ok(info) => Some(info),
        Err(e) => {
            eprintln!("vk_info: {}", strerror(e.0));
            None
        }
    }
}

/// The program's arguments (without its name) parsed by `parse`, and
/// [`vk_info`]; or the status to exit with: 2 after printing `usage` on
/// stderr when the arguments do not parse, 1 when `vk_info` fails.
pub fn start<P>(
    usage: &str,
    parse: impl FnOnce(&[String]) -> Option<P>,
) -> Result<(P, VkInfo), ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(plan) = parse(&args) else {
        eprintln!("{usage}");
        return Err(ExitCode::from(2));
    };
    let info = vk_info().ok_or(ExitCode::from(1))?;
    Ok((plan, info))
}
