//! `vkcall`: a guest for tests and benchmarks. Each subcommand issues
//! hypercalls (or plays with guest RAM) and prints what happened, so that
//! end-to-end tests can check the supervisor from the guest's side.
//!
//! ```text
//! vkcall raw NR [ARG...]     issue hypercall NR (numbers may be 0x...), print the raw return
//! vkcall info SIZE           vk_info into a 64-byte 0xee-filled buffer; print return and bytes
//! vkcall ram-abuse           resize, close, dup over and punch the RAM fd, then vk_info again
//! vkcall hold-vmspaces N     create vmspaces 1..=N, print "ready PID", wait for stdin to close
//! vkcall loop getpid|vk_info|bare N   N calls, print ns per call (bare: an
//!                            unassigned hypercall number, answered ENOSYS)
//! ```

use std::process::ExitCode;
use std::time::Instant;

use vkabi::hypercall::{self, syscall6};

fn num(s: &str) -> u64 {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s
            .parse::<u64>()
            .ok()
            .or_else(|| s.parse::<i64>().ok().map(|v| v as u64)),
    };
    parsed.unwrap_or_else(|| {
        eprintln!("vkcall: not a number: {s}");
        std::process::exit(2)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["raw", nr, rest @ ..] if rest.len() <= 6 => {
            let mut a = [0u64; 6];
            for (slot, s) in a.iter_mut().zip(rest) {
                *slot = num(s);
            }
            // SAFETY: a test tool: the caller chooses the numbers; hypercalls
            // only write where the arguments point, which is the point of
            // testing bad pointers.
            let ret = unsafe { syscall6(num(nr), a[0], a[1], a[2], a[3], a[4], a[5]) };
            println!("{ret}");
        }
        ["info", size] => {
            let mut buf = [0xeeu8; 64];
            // SAFETY: `buf` is writable for 64 bytes; the size may claim more,
            // which the supervisor must clamp to the struct size (48).
            let ret = unsafe { hypercall::vk_info_raw(buf.as_mut_ptr(), num(size) as usize) };
            match ret {
                Ok(v) => println!("ret {v}"),
                Err(e) => println!("err {}", e.0),
            }
            let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
            println!("{hex}");
        }
        ["info-readonly"] => {
            // The program's own text: mapped, but read-only.
            let text = main as *const () as *mut u8;
            // SAFETY: the supervisor must refuse to write there (EFAULT);
            // if it did write, the process would crash, which the test sees.
            let ret = unsafe { hypercall::vk_info_raw(text, 48) };
            match ret {
                Ok(v) => println!("ret {v}"),
                Err(e) => println!("err {}", e.0),
            }
        }
        ["ram-abuse"] => return ram_abuse(),
        ["hold-vmspaces", n] => {
            // Create N vmspaces, say so, and keep them until stdin closes.
            for id in 1..=num(n) {
                if let Err(e) = hypercall::vmspace_create(id, 0, 0) {
                    println!("vmspace_create({id}) failed: {}", e.0);
                    return ExitCode::from(1);
                }
            }
            println!("ready {}", std::process::id());
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        }
        ["loop", what, n] => {
            let n = num(n);
            let start = Instant::now();
            for _ in 0..n {
                match *what {
                    // SAFETY: getpid takes no arguments.
                    "getpid" => unsafe {
                        syscall6(libc::SYS_getpid as u64, 0, 0, 0, 0, 0, 0);
                    },
                    "vk_info" => {
                        let _ = hypercall::vk_info();
                    }
                    // SAFETY: an unassigned hypercall number: no memory is touched.
                    "bare" => unsafe {
                        syscall6(vkabi::VK_SYS_BASE + 1, 0, 0, 0, 0, 0, 0);
                    },
                    _ => {
                        eprintln!("vkcall: loop getpid|vk_info|bare N");
                        return ExitCode::from(2);
                    }
                }
            }
            let ns = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
            println!("{ns:.1}");
        }
        _ => {
            eprintln!(
                "usage: vkcall raw NR [ARG...] | info SIZE | ram-abuse | loop getpid|vk_info|bare N"
            );
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Try everything a guest can do to its RAM descriptor; print each result.
fn ram_abuse() -> ExitCode {
    let Ok(info) = hypercall::vk_info() else {
        eprintln!("vk_info failed");
        return ExitCode::from(1);
    };
    let fd = info.ram_fd;
    let size = info.ram_size as libc::off_t;
    // SAFETY: plain syscalls on integers; none touches memory of this
    // process except through the stack buffers given.
    unsafe {
        let r = libc::ftruncate(fd, size * 2);
        println!("grow {r} {}", if r < 0 { errno() } else { 0 });
        let r = libc::ftruncate(fd, size / 2);
        println!("shrink {r} {}", if r < 0 { errno() } else { 0 });
        let r = libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE);
        println!("seal {r} {}", if r < 0 { errno() } else { 0 });
        let r = libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            1 << 20,
        );
        println!("punch {r}");
        let byte = [7u8];
        let r = libc::pwrite(fd, byte.as_ptr().cast(), 1, size - 1);
        println!("pwrite-last {r}");
        let r = libc::pwrite(fd, byte.as_ptr().cast(), 1, size);
        println!("pwrite-beyond {r} {}", if r < 0 { errno() } else { 0 });
        // Put something else at the RAM's number, then ask again.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::dup2(null, fd);
        libc::close(null);
    }
    match hypercall::vk_info() {
        Ok(again) => {
            // SAFETY: `stat` is plain data, valid when zeroed.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes only into `st`.
            let r = unsafe { libc::fstat(again.ram_fd, &mut st) };
            let same_size = r == 0 && st.st_size == size;
            println!("refound {} {same_size}", again.ram_fd != fd);
        }
        Err(e) => println!("refound error {}", e.0),
    }
    ExitCode::SUCCESS
}
