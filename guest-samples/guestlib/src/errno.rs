//! Errno values as the guests print them.

use vkabi::hypercall::Errno;

/// `strerror` without Rust's " (os error N)" suffix.
pub fn strerror(e: i32) -> String {
    let msg = std::io::Error::from_raw_os_error(e).to_string();
    match msg.split_once(" (os error") {
        Some((text, _)) => text.to_owned(),
        None => msg,
    }
}

/// An errno as `EINVAL 22 (Invalid argument)`.
pub fn errno_text(e: Errno) -> String {
    let name = match e {
        Errno::EPERM => "EPERM",
        Errno::ENOENT => "ENOENT",
        Errno::EINTR => "EINTR",
        Errno::EIO => "EIO",
        Errno::EBADF => "EBADF",
        Errno::ENOMEM => "ENOMEM",
        Errno::EFAULT => "EFAULT",
        Errno::EBUSY => "EBUSY",
        Errno::EEXIST => "EEXIST",
        Errno::EINVAL => "EINVAL",
        Errno::ENOSYS => "ENOSYS",
        Errno::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "errno",
    };
    format!("{name} {} ({})", e.0, strerror(e.0))
}

/// A hypercall that must succeed: its error as the caller's failure,
/// `<what>: <errno_text>`.
pub fn must<T>(what: &str, r: Result<T, Errno>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {}", errno_text(e)))
}
