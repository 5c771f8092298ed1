//! `segv`: a failed walk delivers SIGSEGV with the details of ABI section 6,
//! and a handler that fixes the tables and returns gets the access retried.
//! Four cases: a read and a write of a page whose leaf has V clear
//! (`maperr read`, `maperr write`), a write to a page mapped without RW
//! after a read installed it (`accerr write`), and a read of a page whose
//! leaf points beyond RAM (`beyond-RAM read`). For each CASE, on success:
//!
//! ```text
//! segv: CASE signal ok         exactly one SIGSEGV
//! segv: CASE si_addr ok        si_addr = the address accessed
//! segv: CASE si_code ok        SEGV_MAPERR, or SEGV_ACCERR for accerr
//! segv: CASE trapno ok         REG_TRAPNO = 14
//! segv: CASE cr2 ok            REG_CR2 = the address accessed
//! segv: CASE err bits ok       REG_ERR & (P|W|U|I) = U, W|U, P|W|U, U
//! segv: CASE retry ok          the retried access sees the new mapping
//! ```

use vkabi::{PAGE_SIZE, PGEX_I, PGEX_P, PGEX_U, PGEX_W, VPTE_RW, VPTE_U};
use vpte::{GuestPhysAddr, Vpte};

use crate::env::{self, Env, stamp, stamp_frame};
use crate::report::{Outcome, Report, must};
use crate::sys::{Fix, SEGV_ACCERR, SEGV_MAPERR, X86_TRAP_PF, expect_segv};

/// The leaf before the access.
#[derive(Clone, Copy)]
enum Before {
    /// V clear.
    Unmapped,
    /// Without RW, and already read once.
    ReadOnly,
    /// V|RW with a frame at the end of RAM.
    BeyondRam,
}

struct Case {
    name: &'static str,
    write: bool,
    before: Before,
    code: i32,
    err: u64,
}

const CASES: [Case; 4] = [
    Case {
        name: "maperr read",
        write: false,
        before: Before::Unmapped,
        code: SEGV_MAPERR,
        err: PGEX_U,
    },
    Case {
        name: "maperr write",
        write: true,
        before: Before::Unmapped,
        code: SEGV_MAPERR,
        err: PGEX_W | PGEX_U,
    },
    Case {
        name: "accerr write",
        write: true,
        before: Before::ReadOnly,
        code: SEGV_ACCERR,
        err: PGEX_P | PGEX_W | PGEX_U,
    },
    Case {
        name: "beyond-RAM read",
        write: false,
        before: Before::BeyondRam,
        code: SEGV_MAPERR,
        err: PGEX_U,
    },
];

const MARK: u64 = 0x5E6F_0000_0000_0001;

pub fn run(env: &mut Env, rep: &mut Report, _: Option<u64>) -> Outcome {
    rep.set_summary("SIGSEGV brings si_addr, si_code, trapno 14, cr2, err; fix, return, retry");
    let mut pt = env.tables(16)?;
    let w = env.window(CASES.len() as u64)?;
    let end_of_ram = GuestPhysAddr(env.info.ram_size & !(PAGE_SIZE - 1));
    let mut fixes = Vec::new();
    for (page, case) in (0..).zip(&CASES) {
        let frame = env::frame(&mut pt)?;
        stamp_frame(env, frame);
        let p = w.pindex(page);
        let good = Vpte::leaf(frame, VPTE_RW | VPTE_U).raw();
        let fix = match case.before {
            Before::Unmapped => {
                env::map(&mut pt, p, frame, VPTE_RW | VPTE_U)?;
                let gone = pt.unmap(p).map_err(|e| format!("unmap {p}: {e}"))?;
                let pa = gone.ok_or("unmap found nothing")?.entry_pa;
                Fix::Store { pa, value: good }
            }
            Before::ReadOnly => {
                env::map(&mut pt, p, frame, VPTE_U)?;
                Fix::Or {
                    pa: env::leaf_pa(&pt, p)?,
                    bits: VPTE_RW,
                }
            }
            Before::BeyondRam => {
                env::map(&mut pt, p, end_of_ram, VPTE_RW | VPTE_U)?;
                Fix::Store {
                    pa: env::leaf_pa(&pt, p)?,
                    value: good,
                }
            }
        };
        fixes.push((frame, fix));
    }
    must("MADV_SETMAP", w.setmap(pt.master()))?;

    for ((page, case), (frame, fix)) in (0..).zip(&CASES).zip(fixes) {
        if let Before::ReadOnly = case.before {
            // Install the read-only translation first.
            let v = w.read(page, 0);
            if v != stamp(frame) {
                return Err(format!(
                    "{}: first read {v:#x}, the frame holds {:#x}",
                    case.name,
                    stamp(frame)
                ));
            }
        }
        let (va, (retried, segv)) = if case.write {
            let retried = expect_segv(fix, || w.write(page, 1, MARK));
            let now = env.load(GuestPhysAddr(frame.0 + 8));
            (w.va(page, 8), (now == MARK, retried.1))
        } else {
            let (v, segv) = expect_segv(fix, || w.read(page, 0));
            (w.va(page, 0), (v == stamp(frame), segv))
        };
        let name = case.name;
        rep.check(format_args!("{name} signal"), segv.signals == 1, || {
            format!("{} SIGSEGVs", segv.signals)
        });
        rep.check(format_args!("{name} si_addr"), segv.addr == va, || {
            format!("si_addr {:#x}, accessed {va:#x}", segv.addr)
        });
        rep.check(
            format_args!("{name} si_code"),
            segv.code == case.code,
            || format!("si_code {}, expected {}", segv.code, case.code),
        );
        rep.check(
            format_args!("{name} trapno"),
            segv.trapno == X86_TRAP_PF,
            || format!("REG_TRAPNO {}, expected {X86_TRAP_PF}", segv.trapno),
        );
        rep.check(format_args!("{name} cr2"), segv.cr2 == va, || {
            format!("REG_CR2 {:#x}, accessed {va:#x}", segv.cr2)
        });
        let err = segv.err & (PGEX_P | PGEX_W | PGEX_U | PGEX_I);
        rep.check(format_args!("{name} err bits"), err == case.err, || {
            format!(
                "REG_ERR {:#x}, expected {:#x} in P|W|U|I",
                segv.err, case.err
            )
        });
        rep.check(format_args!("{name} retry"), retried, || {
            "the retried access did not see the fixed mapping".to_owned()
        });
    }
    Ok(())
}
