//! Per-phase wall time and peak memory of the process, two ways:
//!
//! - exact heap bytes from [`CountingAllocator`], the binary's global allocator (every CPU
//!   tensor lives on this heap), whose peak is reset at the start of each phase;
//! - the peak resident set (`VmHWM` in `/proc/self/status`, Linux), reset per phase by writing
//!   `5` to `/proc/self/clear_refs`. It also counts code, allocator caches and mapped files.
//!
//! Where the OS does not report RSS the value is `None` rather than a made-up figure.
//!
//! The heap counter sees allocations, not touched pages. faer's matrix products (the
//! `private-gemm-x86` kernels) give every thread that multiplies a packing buffer of twice the
//! L3 size the CPU reports, allocated once and kept for the thread's life, of which only the
//! part a product packs into is ever written. On a CPU reporting a 480 MiB L3 that is 960 MiB
//! of heap per thread (2.9 GiB for the main thread and two rayon workers) that is address
//! space, not memory: for phases that run faer (emulator construction, correction, `plan`),
//! compare RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The system allocator, counting live and peak heap bytes.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

use serde::Serialize;

/// Wall time and peak resident memory of one phase.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PhaseStats {
    /// Wall time in seconds.
    pub wall_seconds: f64,
    /// Peak resident set size during the phase, in bytes (`None` where the OS does not say).
    pub peak_rss_bytes: Option<u64>,
    /// Peak live heap bytes during the phase (exact, from [`CountingAllocator`]).
    pub peak_heap_bytes: usize,
    /// Live heap bytes when the phase started (what earlier phases left alive).
    pub start_heap_bytes: usize,
}

impl PhaseStats {
    /// Peak RSS in MiB for tables, or `-` if unknown.
    pub fn peak_heap_mib(&self) -> String {
        format!("{:.0}", self.peak_heap_bytes as f64 / (1024.0 * 1024.0))
    }

    /// What the phase needs in a process of its own, as a stage would run it: the model it
    /// runs (`model_bytes`, held before the phase started) plus what the phase allocated above
    /// its starting heap. Whatever else the process held (an original kept for a later
    /// correction, earlier rows) is left out.
    pub fn needed_bytes(&self, model_bytes: usize) -> usize {
        model_bytes + self.peak_heap_bytes.saturating_sub(self.start_heap_bytes)
    }

    /// Peak RSS in MiB for tables, or `-` if unknown.
    pub fn peak_mib(&self) -> String {
        self.peak_rss_bytes
            .map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
    }
}

/// Bytes of `module`'s float parameters, each in its own dtype (bf16 frozen weights count 2),
/// plus what its quantized weights hold ([`emloc::nn::quantized_bytes`]).
pub fn param_bytes<M: burn::module::Module>(module: &M) -> usize {
    struct Bytes(usize);
    impl burn::module::ModuleVisitor for Bytes {
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            let value = param.val();
            self.0 += value.shape().num_elements() * value.dtype().size();
        }
    }
    let mut bytes = Bytes(0);
    module.visit(&mut bytes);
    bytes.0 + emloc::nn::quantized_bytes(module)
}

/// A running phase: started by [`Phase::start`], ended by [`Phase::finish`].
#[derive(Debug)]
pub struct Phase {
    started: Instant,
    start_heap_bytes: usize,
}

impl Phase {
    /// Resets the peak-RSS watermark and starts the clock.
    pub fn start() -> Self {
        // Best effort: without it the peak is the process's peak so far, still an upper bound.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let live = LIVE.load(Ordering::Relaxed);
        PEAK.store(live, Ordering::Relaxed);
        Self { started: Instant::now(), start_heap_bytes: live }
    }

    /// Ends a first part of the phase (e.g. loading) and starts the next: returns the part's
    /// statistics and resets the clock and both peaks, so that the rest is measured apart.
    pub fn split(&mut self) -> PhaseStats {
        let part = Self { started: self.started, start_heap_bytes: self.start_heap_bytes };
        let stats = part.finish();
        *self = Self::start();
        stats
    }

    /// Seconds since [`start`](Self::start).
    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Stops the clock and reads the peak since [`start`](Self::start).
    pub fn finish(self) -> PhaseStats {
        PhaseStats {
            wall_seconds: self.started.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            peak_heap_bytes: PEAK.load(Ordering::Relaxed),
            start_heap_bytes: self.start_heap_bytes,
        }
    }
}

/// `VmHWM` of this process in bytes, if the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_sees_its_own_allocation() {
        if peak_rss_bytes().is_none() {
            eprintln!("skipped: no /proc/self/status on this OS");
            return;
        }
        let phase = Phase::start();
        let before = peak_rss_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let stats = phase.finish();
        assert!(stats.peak_rss_bytes.unwrap() >= before + (60 << 20), "{stats:?} vs {before}");
        // The unit-test binary has the system allocator, so the heap counter sees nothing there;
        // `cli/tests/stages.rs` checks it through the `emloc` binary's reports.
    }
}
