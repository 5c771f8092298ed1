//! `monitor` commands: what gdb cannot ask in its own protocol. The
//! guest's threads and their state, the vmspaces, and a vmspace's user
//! memory read as its user code would read it (through its mappings and
//! page tables), e.g. after a RUN returned `T_PAGEFLT`.

use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd};

use super::target::{Held, Inferior};
use crate::sys::proc;

/// How much `monitor vmspace ID x` shows at most.
const MAX_DUMP: u64 = 4096;

const USAGE: &str = "vkrun monitor commands:
  threads                     every guest thread and whether gdb holds it
  vmspaces                    every vmspace: id, stub pid, execution contexts
  vmspace ID x ADDR [LEN]     LEN bytes (default 16, at most 4096) at ADDR in
                              vmspace ID, read as its user code would";

/// A parsed command.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Threads,
    Vmspaces,
    Dump { id: u64, addr: u64, len: u64 },
    Usage(Option<String>),
}

fn number(word: &str) -> Option<u64> {
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}

fn parse(text: &str) -> Command {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["threads"] => Command::Threads,
        ["vmspaces"] => Command::Vmspaces,
        ["vmspace", id, "x", addr, rest @ ..] if rest.len() <= 1 => {
            let parsed = (
                number(id),
                number(addr),
                rest.first().map_or(Some(16), |l| number(l)),
            );
            match parsed {
                (Some(id), Some(addr), Some(len)) if len <= MAX_DUMP => {
                    Command::Dump { id, addr, len }
                }
                (Some(_), Some(_), Some(_)) => {
                    Command::Usage(Some(format!("at most {MAX_DUMP} bytes")))
                }
                _ => Command::Usage(Some("ID, ADDR and LEN are numbers (0x for hex)".into())),
            }
        }
        [] | ["help"] => Command::Usage(None),
        _ => Command::Usage(Some(format!("unknown command '{text}'"))),
    }
}

/// `addr: xx xx ...` lines, 16 bytes each.
fn hexdump(addr: u64, bytes: &[u8]) -> Vec<String> {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, row)| {
            let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:#x}: {}", addr + 16 * i as u64, hex.join(" "))
        })
        .collect()
}

impl MonitorCmd for Inferior {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        match parse(&String::from_utf8_lossy(cmd)) {
            Command::Threads => {
                for t in &self.threads {
                    let tgid = proc::tgid_of(*t).unwrap_or(*t);
                    let state = match self.held.get(t) {
                        Some(Held::Event) => "stopped".to_owned(),
                        Some(Held::GroupStop) => "stopped (job control)".to_owned(),
                        Some(Held::Signal { sig, .. }) => format!("stopped by {}", sig.as_str()),
                        None => "running".to_owned(),
                    };
                    gdbstub::outputln!(out, "thread {t} of process {tgid}: {state}");
                }
            }
            Command::Vmspaces => {
                let all = self.vmspaces.as_ref().map(|v| v.list()).unwrap_or_default();
                if all.is_empty() {
                    gdbstub::outputln!(out, "no vmspace");
                }
                for (id, stub, contexts) in all {
                    gdbstub::outputln!(
                        out,
                        "vmspace {id:#x}: stub pid {stub}, {contexts} execution context(s)"
                    );
                }
            }
            Command::Dump { id, addr, len } => {
                let mut buf = vec![0u8; len as usize];
                let read = match &self.vmspaces {
                    Some(v) => v.peek(id, addr, &mut buf),
                    None => Err(nix::errno::Errno::ENOENT),
                };
                match read {
                    Err(errno) => gdbstub::outputln!(out, "vmspace {id:#x}: {}", errno.desc()),
                    Ok(n) => {
                        for line in hexdump(addr, &buf[..n]) {
                            gdbstub::outputln!(out, "{line}");
                        }
                        if (n as u64) < len {
                            let at = addr + n as u64;
                            gdbstub::outputln!(out, "{at:#x}: not readable by the user code");
                        }
                    }
                }
            }
            Command::Usage(why) => {
                if let Some(why) = why {
                    gdbstub::outputln!(out, "vkrun: {why}");
                }
                gdbstub::outputln!(out, "{USAGE}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_numbers_in_hex_or_decimal() {
        assert_eq!(parse(" threads "), Command::Threads);
        assert_eq!(parse("vmspaces"), Command::Vmspaces);
        assert_eq!(
            parse("vmspace 0x55d0 x 0x400000"),
            Command::Dump {
                id: 0x55d0,
                addr: 0x400000,
                len: 16
            }
        );
        assert_eq!(
            parse("vmspace 12 x 4096 7"),
            Command::Dump {
                id: 12,
                addr: 4096,
                len: 7
            }
        );
        assert!(matches!(
            parse("vmspace 1 x 0x1000 4097"),
            Command::Usage(Some(_))
        ));
        assert!(matches!(
            parse("vmspace one x 0x1000"),
            Command::Usage(Some(_))
        ));
        assert!(matches!(
            parse("vmspace 1 x 0x1000 2 3"),
            Command::Usage(Some(_))
        ));
        assert!(matches!(parse("reboot"), Command::Usage(Some(_))));
        assert_eq!(parse(""), Command::Usage(None));
    }

    #[test]
    fn dumps_are_sixteen_bytes_a_line() {
        let bytes: Vec<u8> = (0..20).collect();
        assert_eq!(
            hexdump(0x400000, &bytes),
            [
                "0x400000: 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f",
                "0x400010: 10 11 12 13",
            ]
        );
        assert!(hexdump(0, &[]).is_empty());
    }
}
