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

/// Whether `size` bytes of guest RAM fit this host's address space, as
/// the supervisor must map them: a reservation of that size is tried (no
/// memory is committed) and released. The error says why not, naming the
/// size of the user address space (`/proc/cpuinfo`'s virtual address bits)
/// when known.
pub fn ram_fits(size: u64) -> Result<(), String> {
    let len = usize::try_from(size)
        .map_err(|_| "larger than this machine's address space".to_string())?;
    match memmap2::MmapOptions::new()
        .len(len)
        .no_reserve_swap()
        .map_anon()
    {
        Ok(reserved) => {
            drop(reserved);
            Ok(())
        }
        Err(e) => Err(match user_address_space() {
            Some(bytes) => format!(
                "more than this machine can map: its user address space is {} ({e})",
                human(bytes)
            ),
            None => format!("more than this machine can map ({e})"),
        }),
    }
}

/// The size of a process's user address space: half of what the CPU's
/// virtual address bits span (`address sizes : ..., 48 bits virtual`).
fn user_address_space() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    virtual_bits(&cpuinfo).map(|bits| 1u64 << (bits - 1))
}

fn virtual_bits(cpuinfo: &str) -> Option<u32> {
    let line = cpuinfo.lines().find(|l| l.starts_with("address sizes"))?;
    let (_, sizes) = line.split_once(':')?;
    let virt = sizes.split(',').find(|p| p.contains("virtual"))?;
    let bits: u32 = virt.split_whitespace().next()?.parse().ok()?;
    (2..64).contains(&bits).then_some(bits)
}

/// `bytes` with the largest binary suffix that divides it (`128T`).
fn human(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
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
    fn virtual_address_bits_come_from_cpuinfo() {
        let info = "processor\t: 0\naddress sizes\t: 46 bits physical, 48 bits virtual\n";
        assert_eq!(virtual_bits(info), Some(48));
        assert_eq!(virtual_bits("flags : fpu\n"), None);
        assert_eq!(human(1 << 47), "128T");
        assert_eq!(human(3 << 20), "3M");
    }

    #[test]
    fn ram_that_fits_is_accepted_and_ram_past_the_address_space_is_not() {
        assert_eq!(ram_fits(1 << 30), Ok(()));
        let err = ram_fits(200 << 40).expect_err("200T cannot be mapped");
        assert!(err.starts_with("more than this machine can map"), "{err}");
    }

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
