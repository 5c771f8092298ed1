//! `prw`: `vmspace_pread`/`vmspace_pwrite` (ABI section 7) through linear
//! mappings and through a `MAP_VPAGETABLE` window, where they walk the
//! tables as a user access would (A, and M for pwrite); a short count at the
//! first inaccessible byte; 0 for n = 0. On success:
//!
//! ```text
//! ok prw.linear.pread              5000 bytes across a page boundary
//! ok prw.linear.pwrite             300 bytes, seen through the direct map
//! ok prw.linear.short-read         10 of 100 bytes before an unmapped page
//! ok prw.linear.short-write        10 of 100 bytes, and only those written
//! ok prw.linear.readonly-pwrite    a PROT_READ mapping: pwrite copies 0, pread works
//! ok prw.unmapped                  pread and pwrite at an unmapped page copy 0
//! ok prw.zero-length               n = 0 returns 0, mapped or not
//! ok prw.window.pread              through the tables, across two frames
//! ok prw.window.pread-sets-a       A on every entry of the walk, no M on the leaf
//! ok prw.window.pwrite             lands in the leaf's frame
//! ok prw.window.pwrite-sets-a-m    A and M on every entry of the walk
//! ok prw.window.readonly-pwrite    a VPTE without RW: pwrite copies 0, sets no M
//! ok prw.window.short-read         stops at an invalid VPTE
//! ok prw.window.short-write        stops at a VPTE without RW
//! ```

use vkabi::{PAGE_SIZE, PROT_READ, PROT_WRITE, VPTE_A, VPTE_M, VPTE_RW, VPTE_U};
use vpte::GuestPhysAddr;

use crate::env::{self, Env, Vmspace};
use crate::report::{Outcome, Report, show};

const LIN_VA: u64 = 0x0100_0000;
const RO_VA: u64 = 0x0110_0000;
const WIN_VA: u64 = 0x0200_0000;
const RW: i32 = PROT_READ | PROT_WRITE;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// `vmspace_pread` of `n` bytes at `va`: the bytes copied.
fn pread(vs: &Vmspace, va: u64, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    match vs.pread(&mut buf, va) {
        Ok(got) if got <= n => {
            buf.truncate(got);
            Ok(buf)
        }
        r => Err(format!("vmspace_pread({va:#x}, {n}): {}", show(&r))),
    }
}

/// `vmspace_pwrite` of `bytes` at `va`: the count copied.
fn pwrite(vs: &Vmspace, va: u64, bytes: &[u8]) -> Result<usize, String> {
    match vs.pwrite(bytes, va) {
        Ok(got) if got <= bytes.len() => Ok(got),
        r => Err(format!(
            "vmspace_pwrite({va:#x}, {}): {}",
            bytes.len(),
            show(&r)
        )),
    }
}

/// That `got` equals `want` (lengths and bytes), or where they differ.
fn bytes_eq(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: expected {:#x} bytes, got {:#x}",
            want.len(),
            got.len()
        ));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {i:#x} is {:#04x}, expected {:#04x}",
            got[i], want[i]
        )),
    }
}

pub fn run(env: &mut Env, rep: &mut Report) -> Outcome {
    let vs = env.vmspace()?;
    linear(env, rep, &vs)?;
    window(env, rep, &vs)
}

fn linear(env: &mut Env, rep: &mut Report, vs: &Vmspace) -> Outcome {
    // Three pages, then nothing.
    let lin = env.map_linear(vs, LIN_VA, 3, RW)?;
    let all = pattern(lin.len() as usize, 3);
    env.write_bytes(lin.pa, &all);

    let r = pread(vs, lin.va + 100, 5000)
        .and_then(|got| bytes_eq("the bytes read", &got, &all[100..5100]));
    rep.result("linear.pread", r);

    let data = pattern(300, 0x55);
    let at = 4000u64;
    let r = pwrite(vs, lin.va + at, &data).and_then(|n| {
        if n != data.len() {
            return Err(format!("copied {n} bytes, expected {}", data.len()));
        }
        let seen = env.read_bytes(GuestPhysAddr(lin.pa.0 + at), data.len());
        bytes_eq("the direct map after pwrite", &seen, &data)
    });
    rep.result("linear.pwrite", r);

    let end = lin.end();
    let r = pread(vs, end - 10, 100).and_then(|got| {
        let want = env.read_bytes(GuestPhysAddr(lin.pa.0 + lin.len() - 10), 10);
        bytes_eq("a pread running into an unmapped page", &got, &want)
    });
    rep.result("linear.short-read", r);

    let data = pattern(100, 0x99);
    let r = pwrite(vs, end - 10, &data).and_then(|n| {
        if n != 10 {
            return Err(format!(
                "a pwrite of 100 bytes 10 bytes before an unmapped page copied {n}, expected 10"
            ));
        }
        let seen = env.read_bytes(GuestPhysAddr(lin.pa.0 + lin.len() - 10), 10);
        bytes_eq("the direct map after the short pwrite", &seen, &data[..10])
    });
    rep.result("linear.short-write", r);

    let ro = env.map_linear(vs, RO_VA, 1, PROT_READ)?;
    let stamp = pattern(16, 0x11);
    env.write_bytes(ro.pa, &stamp);
    let r = pwrite(vs, ro.va, &[0xEE; 8]).and_then(|n| {
        let now = env.read_bytes(ro.pa, 16);
        if n != 0 || now != stamp {
            return Err(format!(
                "a pwrite to a PROT_READ mapping copied {n} bytes (expected 0); \
                 the frame {} changed",
                if now == stamp { "has not" } else { "has" }
            ));
        }
        pread(vs, ro.va, 16).and_then(|got| bytes_eq("a pread of it", &got, &stamp))
    });
    rep.result("linear.readonly-pwrite", r);

    let r = pread(vs, end, 8).and_then(|got| {
        let n = pwrite(vs, end, &[1; 8])?;
        if got.is_empty() && n == 0 {
            Ok(())
        } else {
            Err(format!(
                "at unmapped {end:#x}: pread copied {}, pwrite {n}; expected 0 for both",
                got.len()
            ))
        }
    });
    rep.result("unmapped", r);

    let zero: Vec<String> = [lin.va, end]
        .iter()
        .flat_map(|&va| {
            let mut none = [0u8; 0];
            [
                ("pread", va, vs.pread(&mut none, va)),
                ("pwrite", va, vs.pwrite(&none, va)),
            ]
        })
        .filter(|(_, _, r)| *r != Ok(0))
        .map(|(call, va, r)| format!("vmspace_{call}({va:#x}, n 0): {}", show(&r)))
        .collect();
    rep.check("zero-length", zero.is_empty(), || {
        format!("expected 0: {}", zero.join("; "))
    });
    Ok(())
}

fn window(env: &mut Env, rep: &mut Report, vs: &Vmspace) -> Outcome {
    // Page 0 -> b, page 1 -> a (not contiguous in that order), page 2 ->
    // c read-only, page 3 invalid.
    let mut pt = env.tables(16)?;
    let w = env.map_window(vs, WIN_VA, 4, 0)?;
    let a = env::frame(&mut pt)?;
    let b = env::frame(&mut pt)?;
    let c = env::frame(&mut pt)?;
    let (pa_bytes, pb_bytes, pc_bytes) = (
        pattern(PAGE_SIZE as usize, 0x21),
        pattern(PAGE_SIZE as usize, 0x42),
        pattern(PAGE_SIZE as usize, 0x63),
    );
    env.write_bytes(a, &pa_bytes);
    env.write_bytes(b, &pb_bytes);
    env.write_bytes(c, &pc_bytes);
    env::map(&mut pt, w.pindex(0), b, VPTE_RW | VPTE_U)?;
    env::map(&mut pt, w.pindex(1), a, VPTE_RW | VPTE_U)?;
    env::map(&mut pt, w.pindex(2), c, VPTE_U)?;
    w.setmap(vs, pt.master())?;

    let mut want = pb_bytes[4090..].to_vec();
    want.extend_from_slice(&pa_bytes[..6]);
    let r = pread(vs, w.va(0, 4090), 12)
        .and_then(|got| bytes_eq("a pread across two pages of the window", &got, &want));
    rep.result("window.pread", r);
    let leaf0 = env::leaf(&pt, w.pindex(0));
    let path = env.path(pt.root(), w.pindex(0));
    rep.check(
        "window.pread-sets-a",
        path.iter().all(|(_, e)| e.has(VPTE_A)) && !leaf0.has(VPTE_M),
        || format!("walk after pread: {path:?}; expected A everywhere, no M on the leaf"),
    );

    let word = 0x9E17_0000_0000_0001u64.to_le_bytes();
    let r = pwrite(vs, w.va(1, 16), &word).and_then(|n| {
        if n != 8 {
            return Err(format!("copied {n} bytes, expected 8"));
        }
        let seen = env.read_bytes(GuestPhysAddr(a.0 + 16), 8);
        bytes_eq("the leaf's frame after pwrite", &seen, &word)
    });
    rep.result("window.pwrite", r);
    let path = env.path(pt.root(), w.pindex(1));
    rep.check(
        "window.pwrite-sets-a-m",
        path.iter().all(|(_, e)| e.has(VPTE_A | VPTE_M)),
        || format!("walk after pwrite: {path:?}; expected A|M everywhere"),
    );

    let r = pwrite(vs, w.va(2, 0), &[0xEE; 8]).and_then(|n| {
        let leaf = env::leaf(&pt, w.pindex(2));
        let now = env.read_bytes(c, 8);
        if n == 0 && !leaf.has(VPTE_M) && now == pc_bytes[..8] {
            Ok(())
        } else {
            Err(format!(
                "a pwrite through a VPTE without RW copied {n} bytes (expected 0); leaf {leaf}; \
                 frame {}",
                if now == pc_bytes[..8] {
                    "unchanged"
                } else {
                    "changed"
                }
            ))
        }
    });
    rep.result("window.readonly-pwrite", r);

    let r = pread(vs, w.va(2, PAGE_SIZE - 4), 16).and_then(|got| {
        bytes_eq(
            "a pread running into an invalid VPTE",
            &got,
            &pc_bytes[4092..],
        )
    });
    rep.result("window.short-read", r);

    let r = pwrite(vs, w.va(1, PAGE_SIZE - 4), &[0x77; 16]).and_then(|n| {
        let seen = env.read_bytes(GuestPhysAddr(a.0 + PAGE_SIZE - 4), 4);
        if n == 4 && seen == [0x77; 4] {
            Ok(())
        } else {
            Err(format!(
                "a pwrite of 16 bytes 4 bytes before a VPTE without RW copied {n} (expected 4); \
                 the frame's last bytes {seen:02x?}"
            ))
        }
    });
    rep.result("window.short-write", r);
    Ok(())
}
