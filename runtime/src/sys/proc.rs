//! What vkrun reads from `/proc`: thread groups, task states, caught
//! signals, mappings, descriptors and `vm.max_map_count`. Each reader is a
//! pure parser over the file's text plus one read, so the parsers are
//! tested here. (Hand-written: the `procfs` crate would bring a large
//! dependency for six small fields.)

use nix::unistd::Pid;

/// The thread-group id of task `tid`.
pub fn tgid_of(tid: Pid) -> Option<Pid> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status_field(&status, "Tgid:")?
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// Whether the process of `tid` has a handler for signal `sig` (`SigCgt`).
pub fn catches(tid: Pid, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status_field(&status, "SigCgt:")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .is_some_and(|mask| (1..=64).contains(&sig) && mask & (1 << (sig - 1)) != 0)
}

/// Whether the process of `tid` leaves signal `sig` to its default
/// action: neither caught (`SigCgt`) nor ignored (`SigIgn`); one read of
/// `/proc/TID/status`.
pub fn takes_default(tid: Pid, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let has = |field| {
        status_field(&status, field)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .is_some_and(|mask| (1..=64).contains(&sig) && mask & (1 << (sig - 1)) != 0)
    };
    !has("SigCgt:") && !has("SigIgn:")
}

/// Whether thread `tid` of `tgid` still exists.
pub fn task_alive(tgid: Pid, tid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// Whether thread `tid` of `tgid` is stopped (job control or ptrace).
pub fn task_stopped(tgid: Pid, tid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| stat_state(&s))
        .is_some_and(|c| c == 'T' || c == 't')
}

/// The system call thread `tid` of `tgid` is blocked in, with its six
/// arguments (`/proc/PID/task/TID/syscall`), or `None` if it is running,
/// not in a system call, or gone.
pub fn task_syscall(tgid: Pid, tid: Pid) -> Option<(i64, [u64; 6])> {
    let text = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/syscall")).ok()?;
    parse_syscall(&text)
}

/// `NR ARG1 .. ARG6 SP PC` as `/proc/PID/syscall` prints them (hex args).
fn parse_syscall(text: &str) -> Option<(i64, [u64; 6])> {
    let mut words = text.split_whitespace();
    let nr: i64 = words.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(words.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some((nr, args))
}

/// The address ranges `[start, end)` mapped in process `tgid`.
pub fn mapped_ranges(tgid: Pid) -> Vec<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{tgid}/maps"))
        .map(|maps| maps.lines().filter_map(maps_range).collect())
        .unwrap_or_default()
}

/// The descriptor numbers open in task `tid`.
pub fn fds(tid: Pid) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{tid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// `vm.max_map_count`.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The value of `name` (e.g. `"Tgid:"`) in a `/proc/PID/status` text.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// The state letter of a `/proc/PID/stat` line (after the command name,
/// which may itself hold spaces and parentheses).
fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The range of one `/proc/PID/maps` line.
fn maps_range(line: &str) -> Option<(u64, u64)> {
    let (range, _) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// The program `tgid` runs (`/proc/PID/exe`) and its arguments
/// (`/proc/PID/cmdline`), for the trace of an exec.
pub fn program(tgid: Pid) -> Option<(String, Vec<String>)> {
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{tgid}/cmdline")).ok()?;
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some((exe.to_string_lossy().into_owned(), args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_lines_parse_and_running_or_outside_is_none() {
        let line = "202 0x7ffffff00000 0x0 0x5 0x0 0x0 0x0 0x7ffc1000 0x7ffffff01030\n";
        assert_eq!(
            parse_syscall(line),
            Some((202, [0x7fff_fff0_0000, 0, 5, 0, 0, 0]))
        );
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffc1000 0x401000\n"), None);
        assert_eq!(parse_syscall("202 0x1 0x2\n"), None);
    }

    #[test]
    fn default_dispositions_are_told_from_caught_and_ignored_ones() {
        let me = nix::unistd::getpid();
        // The Rust runtime ignores SIGPIPE and catches SIGSEGV (stack
        // overflows); nothing here touches SIGUSR2.
        assert!(takes_default(me, libc::SIGUSR2));
        assert!(!takes_default(me, libc::SIGPIPE));
        assert!(!takes_default(me, libc::SIGSEGV));
        // A process that is gone takes nothing.
        assert!(!takes_default(Pid::from_raw(i32::MAX), libc::SIGUSR2));
    }

    #[test]
    fn parsers_read_the_kernels_formats() {
        let status = "Name:\tcat\nTgid:\t4242\nSigCgt:\t0000000000000400\n";
        assert_eq!(status_field(status, "Tgid:"), Some("4242"));
        assert_eq!(status_field(status, "SigCgt:"), Some("0000000000000400"));
        assert_eq!(stat_state("17 (a b) c) S 1 2"), Some('S'));
        assert_eq!(stat_state("17 (x) t 1"), Some('t'));
        assert_eq!(
            maps_range("7f0000000000-7f0000001000 rw-s 00000000 00:01 5 /memfd:x"),
            Some((0x7f00_0000_0000, 0x7f00_0000_1000))
        );
        assert_eq!(maps_range("garbage"), None);
    }

    #[test]
    fn readers_see_this_process() {
        let me = Pid::this();
        assert_eq!(tgid_of(me), Some(me));
        assert!(task_alive(me, me));
        assert!(!task_stopped(me, me));
        assert!(!mapped_ranges(me).is_empty());
        assert!(fds(me).contains(&0) || fds(me).contains(&1) || !fds(me).is_empty());
        assert!(max_map_count().is_some_and(|n| n > 0));
    }
}
