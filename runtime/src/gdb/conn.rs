//! Where the stub listens and its connection to gdb: the `--gdb` address
//! (loopback TCP or a Unix socket), the listener, and the stream the
//! `gdbstub` state machine writes to.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use gdbstub::conn::Connection;

/// Where the stub listens: loopback TCP or a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GdbAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl GdbAddr {
    /// `HOST:PORT` with a loopback host (`127.0.0.1`, `[::1]`,
    /// `localhost`), `:PORT` or `PORT` (127.0.0.1), or a Unix socket path
    /// (anything with a `/`). Port 0 picks a free port (vkrun prints it).
    pub fn parse(text: &str) -> Result<GdbAddr, String> {
        if text.contains('/') {
            return Ok(GdbAddr::Unix(PathBuf::from(text)));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => ("", text),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{text}' is neither HOST:PORT nor a socket path"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = match host {
            "" | "localhost" => std::net::IpAddr::from([127, 0, 0, 1]),
            h => h
                .parse()
                .map_err(|_| format!("'{h}' is not an IP address (only loopback is served)"))?,
        };
        if !ip.is_loopback() {
            return Err(format!(
                "{ip} is not a loopback address: the stub serves 127.0.0.1 or ::1 only"
            ));
        }
        Ok(GdbAddr::Tcp(SocketAddr::new(ip, port)))
    }
}

/// `--gdb` and `--gdb-wait`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdbOptions {
    pub addr: GdbAddr,
    /// Hold the guest at its first instruction until gdb attaches.
    pub wait: bool,
}

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The connection to gdb: blocking writes bounded by a timeout (a gdb
/// that stops reading ends the session, it does not stall the tracer).
#[derive(Debug)]
pub struct Conn(pub(super) Stream);

#[derive(Debug)]
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// How long one write to gdb may block.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl Conn {
    pub(super) fn stream(&mut self) -> &mut dyn ReadWrite {
        match &mut self.0 {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        match &self.0 {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

pub(super) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.stream().write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.stream().write_all(buf)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.stream().flush()
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        if let Stream::Tcp(s) = &self.0 {
            s.set_nodelay(true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_or_a_socket_path() {
        let tcp = |s: &str| GdbAddr::Tcp(s.parse().expect("socket address"));
        assert_eq!(GdbAddr::parse("127.0.0.1:1234"), Ok(tcp("127.0.0.1:1234")));
        assert_eq!(GdbAddr::parse(":1234"), Ok(tcp("127.0.0.1:1234")));
        assert_eq!(GdbAddr::parse("1234"), Ok(tcp("127.0.0.1:1234")));
        assert_eq!(GdbAddr::parse("localhost:0"), Ok(tcp("127.0.0.1:0")));
        assert_eq!(GdbAddr::parse("[::1]:9"), Ok(tcp("[::1]:9")));
        assert_eq!(
            GdbAddr::parse("/tmp/vk.sock"),
            Ok(GdbAddr::Unix("/tmp/vk.sock".into()))
        );
        assert_eq!(
            GdbAddr::parse("./vk.sock"),
            Ok(GdbAddr::Unix("./vk.sock".into()))
        );
        assert!(
            GdbAddr::parse("0.0.0.0:1234")
                .expect_err("refused")
                .contains("loopback")
        );
        assert!(
            GdbAddr::parse("10.1.2.3:1234")
                .expect_err("refused")
                .contains("loopback")
        );
        assert!(GdbAddr::parse("127.0.0.1:99999").is_err());
        assert!(GdbAddr::parse("example.org:1").is_err());
        assert!(GdbAddr::parse("").is_err());
    }
}
