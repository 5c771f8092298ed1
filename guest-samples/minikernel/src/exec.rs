//! Loading an x86-64 ELF program into a fresh address space, the way
//! Linux's `load_elf_binary` does: `ET_EXEC` at its link addresses,
//! `ET_DYN` (PIE) at [`PIE_BASE`], and the interpreter a dynamically
//! linked program names (`PT_INTERP`, e.g. `ld-linux-x86-64.so.2`) as high
//! as there is room below the mmap area's top; the program starts at the
//! interpreter's entry, which finds the program through `AT_PHDR`,
//! `AT_PHNUM`, `AT_ENTRY` and itself through `AT_BASE`.
//! Each `PT_LOAD` segment becomes an area with the segment's protection
//! (`PF_R/PF_W/PF_X`), its file bytes are copied into frames and the rest of
//! its memory (bss) is zero; the program break starts on the page after the
//! highest segment. The initial stack holds, from the top: the strings
//! (argv, envp, the program's path, `AT_RANDOM`'s 16 bytes, "x86_64"), then
//! auxv, envp, argv and argc at `rsp` (16-byte aligned), as the x86-64 psABI
//! requires. No vDSO (`AT_SYSINFO_EHDR` is absent); `AT_BASE` is the
//! interpreter's base, 0 for a static program.

use std::path::{Path, PathBuf};

use vkabi::PAGE_SIZE;

use crate::mm::{Mm, PROT_EXEC, PROT_READ, PROT_WRITE, page_down, page_up};
use crate::ram::{Frames, OutOfMemory, Ram};

/// Where a static-pie program's lowest segment goes (Linux's ELF_ET_DYN_BASE
/// region).
pub const PIE_BASE: u64 = 0x5555_5555_4000;

/// Pages of a writable segment's bss given frames at load.
const BSS_NOW: u64 = 16;

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_PHDR: u32 = 6;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

/// Why a program could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Reading the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a 64-bit little-endian x86-64 ELF executable.
    #[error("not an x86-64 ELF executable")]
    NotElf,
    /// Its interpreter (`PT_INTERP`) could not be read.
    #[error("interpreter {path:?}: {source}")]
    Interp {
        /// The interpreter's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Its interpreter is no x86-64 ELF program.
    #[error("bad ELF interpreter")]
    BadInterp,
    /// A segment lies outside the file or the user address range.
    #[error("bad program segment")]
    BadSegment,
    /// Guest RAM is full.
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
}

impl ExecError {
    /// The errno `execve` would return.
    pub fn errno(&self) -> i32 {
        match self {
            ExecError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            ExecError::Interp { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ExecError::BadInterp => libc::ELIBBAD,
            ExecError::NotElf | ExecError::BadSegment => libc::ENOEXEC,
            ExecError::OutOfMemory(_) => libc::ENOMEM,
        }
    }
}

/// A loaded program's start: `rip` and `rsp`.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// The entry point.
    pub entry: u64,
    /// The initial stack pointer (pointing at argc).
    pub rsp: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One program header.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

/// `path` as `execvp` finds it: as given if it contains a '/', else the
/// first executable file of that name in `$PATH`.
pub fn find_program(path: &str) -> PathBuf {
    if path.contains('/') {
        return PathBuf::from(path);
    }
    let dirs = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&dirs)
        .map(|d| d.join(path))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(path))
}

/// An ELF image placed in an address space.
struct Image {
    /// What was added to its link addresses.
    bias: u64,
    /// Its entry point (biased).
    entry: u64,
    /// Where its program headers are in memory (0 if not loaded).
    phdr: u64,
    /// How many program headers it has.
    phnum: u64,
    /// The page after its highest segment.
    top: u64,
    /// Its `PT_INTERP` path.
    interp: Option<PathBuf>,
}

/// The parsed header of an ELF file: type, entry, program headers.
struct Elf {
    e_type: u16,
    entry: u64,
    phoff: u64,
    phdrs: Vec<Phdr>,
}

/// Parse the ELF header and program headers of `file`.
fn parse(file: &[u8]) -> Result<Elf, ExecError> {
    if file.get(..4) != Some(b"\x7fELF") || file.get(4..6) != Some(&[2, 1]) {
        return Err(ExecError::NotElf);
    }
    let e_type = u16_at(file, 16).ok_or(ExecError::NotElf)?;
    let machine = u16_at(file, 18).ok_or(ExecError::NotElf)?;
    let entry = u64_at(file, 24).ok_or(ExecError::NotElf)?;
    let phoff = u64_at(file, 32).ok_or(ExecError::NotElf)?;
    let phentsize = u16_at(file, 54).ok_or(ExecError::NotElf)? as usize;
    let phnum = u16_at(file, 56).ok_or(ExecError::NotElf)? as usize;
    if machine != EM_X86_64 || !(e_type == ET_EXEC || e_type == ET_DYN) || phentsize < 56 {
        return Err(ExecError::NotElf);
    }
    let mut phdrs = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * phentsize))
            .ok_or(ExecError::NotElf)?;
        let field = |off| u64_at(file, at + off).ok_or(ExecError::NotElf);
        phdrs.push(Phdr {
            kind: u32_at(file, at).ok_or(ExecError::NotElf)?,
            flags: u32_at(file, at + 4).ok_or(ExecError::NotElf)?,
            offset: field(8)?,
            vaddr: field(16)?,
            filesz: field(32)?,
            memsz: field(40)?,
        });
    }
    Ok(Elf {
        e_type,
        entry,
        phoff,
        phdrs,
    })
}

/// The `PT_INTERP` path of `elf` in `file`, if any.
fn interp_path(file: &[u8], elf: &Elf) -> Result<Option<PathBuf>, ExecError> {
    let Some(p) = elf.phdrs.iter().find(|p| p.kind == PT_INTERP) else {
        return Ok(None);
    };
    if p.filesz < 2 || p.filesz > 4096 {
        return Err(ExecError::NotElf);
    }
    let bytes = usize::try_from(p.offset)
        .ok()
        .and_then(|o| file.get(o..)?.get(..p.filesz as usize))
        .ok_or(ExecError::NotElf)?;
    let path = bytes.split(|b| *b == 0).next().unwrap_or(&[]);
    if path.is_empty() {
        return Err(ExecError::NotElf);
    }
    Ok(Some(PathBuf::from(
        String::from_utf8_lossy(path).into_owned(),
    )))
}

/// Place the `PT_LOAD` segments of `elf` (from `file`) in `mm`: `ET_EXEC`
/// at its link addresses, `ET_DYN` with its lowest page at `dyn_base`, or
/// (`None`) as high as the free room below [`crate::mm::MMAP_TOP`] allows,
/// as Linux places an interpreter.
fn place(
    ram: &Ram,
    frames: &mut Frames,
    mm: &mut Mm,
    file: &[u8],
    elf: &Elf,
    dyn_base: Option<u64>,
) -> Result<Image, ExecError> {
    let loads: Vec<Phdr> = elf
        .phdrs
        .iter()
        .copied()
        .filter(|p| p.kind == PT_LOAD)
        .collect();
    let lowest = loads
        .iter()
        .map(|p| page_down(p.vaddr))
        .min()
        .ok_or(ExecError::NotElf)?;
    let highest = loads
        .iter()
        .map(|p| p.vaddr.checked_add(p.memsz).map(page_up))
        .try_fold(0u64, |m, e| e.map(|e| m.max(e)))
        .ok_or(ExecError::BadSegment)?;
    let bias = if elf.e_type == ET_DYN {
        let base = match dyn_base {
            Some(b) => b,
            None => mm
                .free_range(highest - lowest)
                .ok_or(ExecError::BadSegment)?,
        };
        base.wrapping_sub(lowest)
    } else {
        0
    };
    let mut top = 0;
    for p in &loads {
        let start = p.vaddr.wrapping_add(bias);
        let end = start.checked_add(p.memsz).ok_or(ExecError::BadSegment)?;
        let data = usize::try_from(p.offset)
            .ok()
            .and_then(|o| file.get(o..))
            .and_then(|d| d.get(..p.filesz as usize))
            .ok_or(ExecError::BadSegment)?;
        if p.filesz > p.memsz || page_down(start) < crate::mm::MIN_ADDR || end > mm.stack_top {
            return Err(ExecError::BadSegment);
        }
        let mut prot = 0;
        if p.flags & 4 != 0 {
            prot |= PROT_READ;
        }
        if p.flags & 2 != 0 {
            prot |= PROT_WRITE;
        }
        if p.flags & 1 != 0 {
            prot |= PROT_EXEC;
        }
        mm.add(page_down(start), page_up(end), prot);
        if !mm.load(ram, frames, start, data)? {
            return Err(ExecError::BadSegment);
        }
        // The bss part of the first and last pages is zero already (fresh
        // frames); the next pages wholly in bss get zeroed frames now, up
        // to BSS_NOW of them (a program writes its small bss at once, and a
        // frame now costs far less than a fault later); the rest are
        // demand-zero.
        let file_end = page_up(start + p.filesz);
        let bss_now = page_up(end).min(file_end + BSS_NOW * PAGE_SIZE);
        if p.flags & 2 != 0 && bss_now > file_end {
            let zeros = vec![0u8; (bss_now - file_end) as usize];
            if !mm.load(ram, frames, file_end, &zeros)? {
                return Err(ExecError::BadSegment);
            }
        }
        top = top.max(page_up(end));
    }
    mm.refresh(ram, lowest.wrapping_add(bias), top);
    let phoff = elf.phoff;
    let phdr = elf
        .phdrs
        .iter()
        .find(|p| p.kind == PT_PHDR)
        .map(|p| p.vaddr.wrapping_add(bias))
        .or_else(|| {
            loads
                .iter()
                .find(|p| p.offset <= phoff && phoff < p.offset.saturating_add(p.filesz))
                .map(|p| p.vaddr.wrapping_add(bias) + phoff - p.offset)
        })
        .unwrap_or(0);
    Ok(Image {
        bias,
        entry: elf.entry.wrapping_add(bias),
        phdr,
        phnum: elf.phdrs.len() as u64,
        top,
        interp: None,
    })
}

/// Load the program at `path` into `mm` (empty but for its stack area),
/// and its interpreter when it names one (`PT_INTERP`, as Linux's
/// `load_elf_binary`: the program at its addresses or [`PIE_BASE`], the
/// interpreter as high as there is room below the mmap top, started at
/// the interpreter's entry with `AT_BASE` its base), and build the initial
/// stack with `argv` and `envp`. A missing interpreter is `ENOENT`, one
/// that is no ELF program `ELIBBAD`.
pub fn load(
    ram: &Ram,
    frames: &mut Frames,
    mm: &mut Mm,
    path: &Path,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
) -> Result<Start, ExecError> {
    let file = std::fs::read(path)?;
    let elf = parse(&file)?;
    let interp = interp_path(&file, &elf)?;
    let interp_file = match &interp {
        Some(i) => Some(std::fs::read(i).map_err(|e| ExecError::Interp {
            path: i.clone(),
            source: e,
        })?),
        None => None,
    };
    let interp_elf = match &interp_file {
        Some(f) => Some(parse(f).map_err(|_| ExecError::BadInterp)?),
        None => None,
    };
    let mut main = place(ram, frames, mm, &file, &elf, Some(PIE_BASE))?;
    main.interp = interp;
    mm.brk_start = main.top;
    mm.brk = main.top;
    let (entry, base) = match (&interp_file, &interp_elf) {
        (Some(f), Some(e)) => {
            let i = place(ram, frames, mm, f, e, None)?;
            (i.entry, i.bias)
        }
        _ => (main.entry, 0),
    };
    let aux = Aux {
        phdr: main.phdr,
        phnum: main.phnum,
        entry: main.entry,
        base,
    };
    let rsp = build_stack(ram, frames, mm, path, argv, envp, &aux)?;
    Ok(Start { entry, rsp })
}

/// The auxv values that come from the program.
struct Aux {
    phdr: u64,
    phnum: u64,
    entry: u64,
    /// The interpreter's base (0 without one).
    base: u64,
}

/// Write the initial stack below `mm.stack_top`; returns `rsp`.
fn build_stack(
    ram: &Ram,
    frames: &mut Frames,
    mm: &mut Mm,
    path: &Path,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    aux: &Aux,
) -> Result<u64, ExecError> {
    let top = mm.stack_top;
    // The string area, growing down from the top (a NULL word first).
    let mut strings: Vec<u8> = Vec::new();
    let mut place = |bytes: &[u8], nul: bool| -> u64 {
        if nul {
            strings.splice(0..0, [0u8]);
        }
        strings.splice(0..0, bytes.iter().copied());
        strings.len() as u64
    };
    place(&[0; 8], false);
    let execfn = place(path.as_os_str().as_encoded_bytes(), true);
    let platform = place(b"x86_64", true);
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `random`.
    let got = unsafe { libc::getrandom(random.as_mut_ptr().cast(), 16, 0) };
    if got != 16 {
        random = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().to_le_bytes())
            .unwrap_or([0x5a; 16]);
    }
    let random_at = place(&random, false);
    let envs: Vec<u64> = envp.iter().rev().map(|e| place(e, true)).collect();
    let args: Vec<u64> = argv.iter().rev().map(|a| place(a, true)).collect();
    let strings_start = top - strings.len() as u64;
    let addr = |off: u64| top - off;

    // SAFETY: getauxval only reads this process's auxiliary vector.
    let (hwcap, hwcap2, minsig) = unsafe {
        (
            libc::getauxval(libc::AT_HWCAP),
            libc::getauxval(libc::AT_HWCAP2),
            libc::getauxval(51),
        )
    };
    // SAFETY: these id calls cannot fail.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    let auxv: [(u64, u64); 19] = [
        (3, aux.phdr),
        (4, 56),
        (5, aux.phnum),
        (6, PAGE_SIZE),
        (7, aux.base),
        (8, 0),
        (9, aux.entry),
        (11, u64::from(uid)),
        (12, u64::from(euid)),
        (13, u64::from(gid)),
        (14, u64::from(egid)),
        (15, addr(platform)),
        (16, hwcap),
        (26, hwcap2),
        (17, 100),
        (23, 0),
        (25, addr(random_at)),
        (31, addr(execfn)),
        (51, minsig),
    ];
    let mut words: Vec<u64> = vec![argv.len() as u64];
    words.extend(args.iter().rev().map(|o| addr(*o)));
    words.push(0);
    words.extend(envs.iter().rev().map(|o| addr(*o)));
    words.push(0);
    for (k, v) in auxv {
        words.extend([k, v]);
    }
    words.extend([0, 0]);
    let rsp = (strings_start - words.len() as u64 * 8) & !15;
    if top - rsp > crate::mm::STACK_SIZE / 2 {
        return Err(ExecError::Io(std::io::Error::from_raw_os_error(
            libc::E2BIG,
        )));
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    if !mm.load(ram, frames, rsp, &bytes)? || !mm.load(ram, frames, strings_start, &strings)? {
        return Err(ExecError::BadSegment);
    }
    Ok(rsp)
}
