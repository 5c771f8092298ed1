//! What this host offers vkrun, as `vkrun --version` reports it: the kernel
//! features the supervisor uses when present, and the limits it works within.

use crate::sys::{proc, stub, uffd};

/// The host's answers to vkrun's questions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    /// The kernel release (`uname -r`), if readable.
    pub kernel: Option<String>,
    /// User code may use `wrfsbase`/`wrgsbase` (`HWCAP2_FSGSBASE`):
    /// vmspaces need it.
    pub fsgsbase: bool,
    /// The kernel has `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6): a
    /// hypercall wakes the supervisor on the caller's CPU. Judged from the
    /// release; without it hypercalls are slower, not wrong.
    pub sync_wake_up: bool,
    /// A userfaultfd may report faults taken in kernel mode (guest system
    /// calls on window addresses, ABI section 3).
    pub uffd_kernel_faults: bool,
    /// `vm.max_map_count`, which bounds the host mappings of windows.
    pub max_map_count: Option<u64>,
}

/// Ask the host.
pub fn probe() -> HostReport {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    let sync_wake_up = kernel
        .as_deref()
        .and_then(release_number)
        .is_some_and(|v| v >= (6, 6));
    HostReport {
        kernel,
        fsgsbase: stub::fsgsbase_available(),
        sync_wake_up,
        uffd_kernel_faults: uffd::kernel_faults_allowed(),
        max_map_count: proc::max_map_count(),
    }
}

/// `(major, minor)` of a release such as `6.18.0-foo`.
fn release_number(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_numbers() {
        assert_eq!(release_number("6.18.0-rc1"), Some((6, 18)));
        assert_eq!(release_number("5.9"), Some((5, 9)));
        assert_eq!(release_number("garbage"), None);
        assert!(release_number("6.5.13").is_some_and(|v| v < (6, 6)));
    }

    #[test]
    fn probe_reads_the_limit() {
        let report = probe();
        assert!(report.kernel.is_some());
        assert!(report.max_map_count.is_some_and(|n| n > 0));
    }
}
