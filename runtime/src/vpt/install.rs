//! Changing what a window maps, under the process's locks: installing runs
//! of RAM within the VMA budget, evicting and re-arming, dropping
//! translations, and keeping the books in step with the resolver (which
//! installs in the guest itself and reports through its ring).

use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::unistd::Pid;

use super::agent::{REGISTER_SLOTS, RamRun};
use super::windows::MmState;
use super::{ANON, Locked, PAGE, Process, Space, Vpt};
use crate::error::errno_or;
use crate::sys::agent_code::{
    self, RES_BUDGET, RES_INS_HEAD, RES_INS_RING, RES_INS_SLOTS, RES_INS_TAIL, RES_MAX_WINDOWS,
    RES_NWIN, RES_RESOLVED, RES_WINDOWS,
};
use crate::sys::lock;
use crate::sys::uffd::UFFDIO_REGISTER;

/// Whether `[va, va + len)` is a non-empty run of whole pages below
/// `USER_MAX` (what an honest resolver reports).
fn is_page_run(va: u64, len: u64) -> bool {
    len > 0
        && va.is_multiple_of(PAGE)
        && len.is_multiple_of(PAGE)
        && va
            .checked_add(len)
            .is_some_and(|end| end <= vkabi::USER_MAX)
}

impl Vpt {
    /// Lock `p`'s mm state and, in a guest process, the lock shared with
    /// its resolver, and take in what the resolver did meanwhile. A stub
    /// has no resolver: its resolver page is within reach of the user code
    /// and is never read or waited on.
    pub(super) fn enter<'a>(&self, p: &'a Process) -> Result<Locked<'a>, Errno> {
        let mm = lock(&p.mm);
        if p.space == Space::Vmspace {
            return Ok(Locked { mm, agent: None });
        }
        p.agent.lock_shared(p.tgid)?;
        let mut locked = Locked {
            mm,
            agent: Some(&p.agent),
        };
        self.sync_from_resolver(p, &mut locked)?;
        Ok(locked)
    }

    /// Take in the resolver's installs (VMA bookkeeping and counters) and
    /// give it a fresh budget, evicting old runs first if needed. Caller
    /// holds both locks. The ring is in the guest's memory: at most one
    /// ring's worth of records is read, and a record that is no page run
    /// below `USER_MAX` is skipped.
    fn sync_from_resolver(&self, p: &Process, mm: &mut MmState) -> Result<(), Errno> {
        let a = &p.agent;
        let head = a.res_word(RES_INS_HEAD).load(Ordering::Acquire);
        let mut tail = a.res_word(RES_INS_TAIL).load(Ordering::Relaxed);
        let pending = head.wrapping_sub(tail);
        if pending > RES_INS_SLOTS {
            tracing::warn!(tgid = %p.tgid, pending, "the resolver's install ring is corrupt; skipped");
            tail = head.wrapping_sub(RES_INS_SLOTS);
        }
        while tail != head {
            let slot = RES_INS_RING + 16 * (tail % RES_INS_SLOTS) as usize;
            let va = a.res_qword(slot).load(Ordering::Relaxed);
            let len = a.res_qword(slot + 8).load(Ordering::Relaxed);
            if is_page_run(va, len) {
                mm.record_install(va, len);
            }
            tail = tail.wrapping_add(1);
        }
        a.res_word(RES_INS_TAIL).store(tail, Ordering::Release);
        self.count_resolved(p, mm);
        self.make_room(p, mm)?;
        let budget = self.max_runs.saturating_sub(mm.runs() as u64);
        a.res_word(RES_BUDGET)
            .store(budget.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Add the faults the resolver resolved since the last look to the
    /// counters (each was one walk and one install).
    pub(super) fn count_resolved(&self, p: &Process, mm: &mut MmState) {
        if p.space == Space::Vmspace {
            return; // no resolver; its page is the user code's to scribble on
        }
        let resolved = p.agent.res_qword(RES_RESOLVED).load(Ordering::Relaxed);
        let new = resolved.saturating_sub(mm.resolved_seen);
        mm.resolved_seen = resolved;
        self.stats
            .vpagetable_faults
            .fetch_add(new, Ordering::Relaxed);
        self.stats
            .host_mappings_installed
            .fetch_add(new, Ordering::Relaxed);
    }

    /// Copy the window table to the resolver page. Caller holds both locks.
    pub(super) fn publish_windows(&self, p: &Process, mm: &MmState) {
        let a = &p.agent;
        let n = mm.windows.len().min(RES_MAX_WINDOWS);
        for (i, w) in mm.windows.values().take(n).enumerate() {
            let slot = RES_WINDOWS + 32 * i;
            a.res_qword(slot).store(w.start, Ordering::Relaxed);
            a.res_qword(slot + 8).store(w.end(), Ordering::Relaxed);
            a.res_qword(slot + 16).store(w.off, Ordering::Relaxed);
            a.res_qword(slot + 24).store(w.master, Ordering::Relaxed);
        }
        a.res_word(RES_NWIN).store(n as u32, Ordering::Release);
        *lock(&p.ranges) = mm.windows.values().map(|w| (w.start, w.len)).collect();
    }

    /// Install RAM `[pa, pa+len)` at `va` in `p`'s guest, keeping the VMA
    /// budget: evict old runs first if needed, and again on `ENOMEM`.
    /// Caller holds `mm`.
    pub(super) fn install(&self, p: &Process, mm: &mut MmState, run: RamRun) -> Result<(), Errno> {
        self.make_room(p, mm)?;
        let mut attempt = 0;
        loop {
            match p.agent.mmap_ram(p.tgid, self.ram.raw_fd(), run) {
                Ok(()) => break,
                // The host's VMA limit: never fail a valid access for it.
                Err(Errno::ENOMEM) if attempt < 3 && mm.runs() > 0 => {
                    attempt += 1;
                    let n = (mm.runs() as u64 / 2).max(1);
                    self.evict(p, mm, n)?;
                }
                Err(e) => return Err(e),
            }
        }
        mm.record_install(run.va, run.len);
        self.stats
            .host_mappings_installed
            .fetch_add(1, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Evict an eighth of the budget's runs when the process holds as many
    /// as the budget allows. Caller holds `mm`.
    fn make_room(&self, p: &Process, mm: &mut MmState) -> Result<(), Errno> {
        match mm.room_needed(self.max_runs) {
            0 => Ok(()),
            n => self.evict(p, mm, n),
        }
    }

    /// Evict up to `count` of the least recently installed runs: replace
    /// each (a whole run, so no split is needed at the limit) with fresh
    /// registered anonymous memory. Caller holds `mm`.
    fn evict(&self, p: &Process, mm: &mut MmState, count: u64) -> Result<(), Errno> {
        if !self.told_evicting.swap(true, Ordering::Relaxed) {
            let limit = crate::sys::proc::max_map_count().unwrap_or(0);
            tracing::warn!(
                "guest process {} has more scattered window pages installed than the host's VMA \
                 budget allows ({} runs under vm.max_map_count = {limit}): older translations are \
                 evicted and fault again when touched (--stats counts them as \
                 vkrun.host_mappings_evicted); raise the limit with \
                 `sysctl -w vm.max_map_count={}`",
                p.tgid,
                self.max_runs,
                limit.max(65530) * 4
            );
        }
        let victims = mm.take_oldest(count);
        self.rearm(p, &victims)?;
        self.stats
            .host_mappings_evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Drop every host translation in `[s, e)` of a window: map fresh
    /// registered anonymous memory over the span that holds installed or
    /// faulted pages (one mmap: its cost is per VMA, not per page), so they
    /// walk again. Caller holds `mm`.
    pub(super) fn drop_translations(
        &self,
        p: &Process,
        mm: &mut MmState,
        s: u64,
        e: u64,
    ) -> Result<(), Errno> {
        let Some((lo, hi)) = mm.translated_span(s, e) else {
            return Ok(()); // nothing installed here: nothing to drop
        };
        self.rearm(p, &[(lo, hi - lo)])?;
        mm.forget_translations(lo, hi);
        self.sync_vma_gauge(mm);
        Ok(())
    }

    /// Put fresh registered anonymous memory over each `(va, len)` (in a
    /// vmspace: fresh `PROT_NONE` memory, not registered), dropping
    /// whatever translation was there, with no moment at which another guest
    /// thread could touch unregistered memory (and see zeroes): each range is
    /// mapped `PROT_NONE` first (an access then is a `SIGSEGV` the tracer
    /// resolves once the caller releases `mm`), registered by the agent, and
    /// only then made accessible. Caller holds `mm`.
    pub(super) fn rearm(&self, p: &Process, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        const OPS_PER_RANGE: usize = 3;
        let none = libc::PROT_NONE as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = ANON | libc::MAP_FIXED as u64;
        if p.space == Space::Vmspace {
            // A vmspace's window pages not installed stay PROT_NONE: the
            // next access raises SIGSEGV in the execution context.
            for chunk in ranges.chunks(agent_code::MAX_OPS) {
                let ops: Vec<_> = chunk
                    .iter()
                    .map(|&(va, len)| (libc::SYS_mmap, [va, len, none, flags, u64::MAX, 0]))
                    .collect();
                for r in p.agent.run(p.tgid, &ops)? {
                    errno_or(r)?;
                }
            }
            return Ok(());
        }
        let uffd = u64::from(p.agent.uffd_fd.load(Ordering::Relaxed));
        let per_batch = (agent_code::MAX_OPS / OPS_PER_RANGE).min(REGISTER_SLOTS);
        for chunk in ranges.chunks(per_batch) {
            let mut ops = Vec::with_capacity(chunk.len() * OPS_PER_RANGE);
            for (i, &(va, len)) in chunk.iter().enumerate() {
                let slot = p.agent.register_slot(i, va, len);
                ops.push((libc::SYS_mmap, [va, len, none, flags, u64::MAX, 0]));
                ops.push((libc::SYS_ioctl, [uffd, UFFDIO_REGISTER, slot, 0, 0, 0]));
                ops.push((libc::SYS_mprotect, [va, len, rw, 0, 0, 0]));
            }
            let r = p.agent.run(p.tgid, &ops)?;
            for (i, &(va, len)) in chunk.iter().enumerate() {
                errno_or(r[OPS_PER_RANGE * i])?;
                if errno_or(r[OPS_PER_RANGE * i + 1]).is_err() {
                    // The guest closed the agent's uffd descriptor: register
                    // from here, and zap whatever was mapped meanwhile.
                    p.uffd.register_missing(va, len)?;
                    let dontneed = libc::MADV_DONTNEED as u64;
                    p.agent
                        .run(p.tgid, &[(libc::SYS_madvise, [va, len, dontneed, 0, 0, 0])])?;
                }
            }
        }
        Ok(())
    }

    /// Map `page` `PROT_NONE` (a walk failed there): the retried access
    /// raises a real `SIGSEGV`, or `EFAULT` in the kernel. Caller holds `mm`.
    pub(super) fn poison(&self, p: &Process, page: u64) -> Result<(), Errno> {
        let flags = ANON | libc::MAP_FIXED as u64;
        let r = p.agent.run(
            p.tgid,
            &[(libc::SYS_mmap, [page, PAGE, 0, flags, u64::MAX, 0])],
        )?;
        errno_or(r[0]).map(drop)
    }

    /// Bring `vkrun.host_vmas` (an upper bound: two per installed run) up to
    /// date with this process's runs.
    pub(super) fn sync_vma_gauge(&self, mm: &mut MmState) {
        let now = mm.vmas();
        if now >= mm.counted_vmas {
            let total = self
                .stats
                .host_vmas
                .fetch_add(now - mm.counted_vmas, Ordering::Relaxed)
                + (now - mm.counted_vmas);
            self.stats
                .host_vmas_peak
                .fetch_max(total, Ordering::Relaxed);
        } else {
            self.stats
                .host_vmas
                .fetch_sub(mm.counted_vmas - now, Ordering::Relaxed);
        }
        mm.counted_vmas = now;
    }

    /// The guest thread `tid` names in trace lines: a vmspace's context
    /// thread is named by the guest thread it runs for, as in RUN's lines.
    pub(super) fn trace_tid(&self, tid: Pid) -> Pid {
        self.context_faults()
            .and_then(|c| c.guest_of(tid))
            .unwrap_or(tid)
    }
}

#[cfg(test)]
mod tests {
    use super::is_page_run;

    #[test]
    fn forged_install_records_are_refused() {
        assert!(is_page_run(0x1000, 0x2000));
        assert!(!is_page_run(0xFFFF_FFFF_FFFF_0000, 0x20000));
        assert!(!is_page_run(0x1000, 0));
        assert!(!is_page_run(0x1001, 0x1000));
        assert!(!is_page_run(vkabi::USER_MAX, 0x1000));
    }
}
