//! A starting point for a vkernel in Rust (docs/guide.md, steps 1-3): ask
//! the supervisor for `vk_info`, map guest RAM as the direct map, build
//! 4-level page tables for a one-page `MAP_VPAGETABLE` window, point the
//! window at them and check that it shows the RAM page.
//!
//! Run: `vkrun -m 64M -- target/debug/vkernel-template`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use vkabi::hypercall::{self, Errno};
use vkabi::{
    MADV_SETMAP, MAP_SHARED, MAP_VPAGETABLE, PROT_READ, PROT_WRITE, VK_ABI_VERSION, VPTE_A,
    VPTE_FRAME, VPTE_M, VPTE_RW, VPTE_U, VPTE_V,
};

/// Guest RAM seen through the direct map, as 64-bit words.
struct Ram {
    words: &'static [AtomicU64],
    next_frame: u64,
}

impl Ram {
    fn map(fd: i32, size: u64) -> Result<Ram, String> {
        // SAFETY: a new shared mapping of the RAM memfd; nothing else
        // lives at the address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of guest RAM: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the mapping is `size` bytes, page aligned, never unmapped,
        // and only ever accessed as atomics (the host writes A and M).
        let words =
            unsafe { std::slice::from_raw_parts(p as *const AtomicU64, (size / 8) as usize) };
        Ok(Ram {
            words,
            next_frame: 1 << 20,
        })
    }

    fn entry(&self, pa: u64) -> &AtomicU64 {
        &self.words[(pa / 8) as usize]
    }

    /// A fresh frame: zero, because RAM starts zero and frames are not reused.
    fn frame(&mut self) -> Result<u64, String> {
        let pa = self.next_frame;
        if (pa + 4096) / 8 > self.words.len() as u64 {
            return Err("out of RAM".into());
        }
        self.next_frame += 4096;
        Ok(pa)
    }

    /// The PA of the level-1 entry for `pindex` under `root`, making the
    /// tables above it (shifts 27, 18, 9: ABI section 3).
    fn leaf(&mut self, root: u64, pindex: u64) -> Result<u64, String> {
        let mut table = root;
        for shift in [27, 18, 9] {
            let pa = table + ((pindex >> shift) & 511) * 8;
            if self.entry(pa).load(Ordering::SeqCst) & VPTE_V == 0 {
                let next = self.frame()?;
                self.entry(pa)
                    .store(next | VPTE_V | VPTE_RW | VPTE_U, Ordering::SeqCst);
            }
            table = self.entry(pa).load(Ordering::SeqCst) & VPTE_FRAME;
        }
        Ok(table + (pindex & 511) * 8)
    }
}

/// What the template writes through the window and expects in RAM.
const MAGIC: u64 = 0x0076_6b65_726e_656c;

fn errno(what: &str) -> impl Fn(Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn run() -> Result<(), String> {
    let info = hypercall::vk_info().map_err(errno("vk_info (run me under vkrun)"))?;
    if info.abi_version != VK_ABI_VERSION {
        return Err(format!(
            "ABI version {}, this vkernel knows 1",
            info.abi_version
        ));
    }
    let mut ram = Ram::map(info.ram_fd, info.ram_size)?;
    let root = ram.frame()?;
    let page = ram.frame()?;
    let leaf = ram.leaf(root, 0)?;
    ram.entry(leaf)
        .store(page | VPTE_V | VPTE_RW | VPTE_U, Ordering::SeqCst);

    // SAFETY: a new mapping at an address the supervisor picks; it aliases
    // RAM that this program only touches as atomics.
    let win = unsafe {
        hypercall::vk_mmap(
            0,
            4096,
            PROT_READ | PROT_WRITE,
            MAP_SHARED | MAP_VPAGETABLE,
            info.ram_fd,
            0,
        )
    }
    .map_err(errno("vk_mmap"))?;
    hypercall::mcontrol(win, 4096, MADV_SETMAP, root | VPTE_V | VPTE_RW | VPTE_U)
        .map_err(errno("mcontrol(MADV_SETMAP)"))?;

    // SAFETY: `win` is a live, page-aligned 4096-byte mapping.
    let through_window = unsafe { &*(win as *const AtomicU64) };
    through_window.store(MAGIC, Ordering::SeqCst);
    if ram.entry(page).load(Ordering::SeqCst) != MAGIC {
        return Err("the window does not alias RAM".into());
    }
    if ram.entry(leaf).load(Ordering::SeqCst) & (VPTE_A | VPTE_M) != VPTE_A | VPTE_M {
        return Err("the write did not set VPTE_A and VPTE_M".into());
    }
    println!("vkernel: window at {win:#x} shows RAM page {page:#x}; A and M set");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vkernel: {e}");
            ExitCode::FAILURE
        }
    }
}
