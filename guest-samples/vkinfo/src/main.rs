//! `vkinfo`: the smallest vkrun guest. Asks the supervisor for `vk_info`,
//! maps guest RAM as its direct map, writes a pattern through one mapping
//! and checks it through a second, independent one (the pages are shared,
//! not copied).
//!
//! Exits 0 when everything checks out, 1 when `vk_info` fails (for example
//! without vkrun: `Function not implemented`), 2 when RAM misbehaves.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use memmap2::MmapOptions;
use vkabi::hypercall::{self, Errno};

/// At most this much of RAM is mapped and checked.
const CHECK_LIMIT: u64 = 64 << 20;

fn main() -> ExitCode {
    let info = match hypercall::vk_info() {
        Ok(info) => info,
        Err(Errno(e)) => {
            let msg = std::io::Error::from_raw_os_error(e).to_string();
            let msg = msg.split(" (os error").next().unwrap_or(&msg);
            eprintln!("vk_info: {msg}");
            return ExitCode::from(1);
        }
    };
    println!("abi_version: {}", info.abi_version);
    println!("page_size: {}", info.page_size);
    println!("ram_fd: {}", info.ram_fd);
    println!("vpte_levels: {}", info.vpte_levels);
    println!("ram_size: {}", info.ram_size);
    println!("user_max: {:#x}", info.user_max);
    match check_ram(info.ram_fd, info.ram_size) {
        Ok(()) => {
            println!("pattern: ok");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("pattern: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Write a pattern at the first, middle and last page of (at most
/// [`CHECK_LIMIT`] bytes of) RAM through one mapping; read it back through
/// another; check that RAM cannot grow.
fn check_ram(fd: i32, ram_size: u64) -> Result<(), String> {
    let len = ram_size.min(CHECK_LIMIT);
    // SAFETY: vk_info just reported `fd` as this process's RAM memfd; the
    // File takes ownership of it for the rest of the program.
    let file = unsafe { File::from_raw_fd(fd) };
    let len = usize::try_from(len).map_err(|_| "RAM too large".to_owned())?;
    let map = |what: &str| {
        // SAFETY: the memfd is sealed against shrinking, so the mapping
        // cannot lose its backing while in use.
        unsafe { MmapOptions::new().len(len).map_mut(&file) }
            .map_err(|e| format!("mmap ({what}): {e}"))
    };
    let mut dmap = map("direct map")?;
    let alias = map("second mapping")?;
    let page = 4096;
    let mut offsets = vec![0, (len / 2) & !(page - 1), len - page];
    offsets.dedup();
    for (i, &off) in offsets.iter().enumerate() {
        let stamp = 0xA5A5_0000_u32 + i as u32;
        dmap[off..off + 4].copy_from_slice(&stamp.to_le_bytes());
        dmap[off + page - 1] = i as u8 ^ 0x5A;
    }
    for (i, &off) in offsets.iter().enumerate() {
        let stamp = 0xA5A5_0000_u32 + i as u32;
        let seen = u32::from_le_bytes(alias[off..off + 4].try_into().expect("4 bytes"));
        if seen != stamp || alias[off + page - 1] != i as u8 ^ 0x5A {
            return Err(format!("page at {off:#x} does not alias: read {seen:#x}"));
        }
    }
    // Guest RAM cannot be resized by the guest (the memfd is sealed).
    if file.set_len(ram_size + page as u64).is_ok() {
        return Err("RAM could be grown".to_owned());
    }
    Ok(())
}
