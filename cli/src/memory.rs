//! Per-phase wall time and peak memory of the process.
//!
//! On Linux the peak resident set (`VmHWM` in `/proc/self/status`) is reset at the start of each
//! phase by writing `5` to `/proc/self/clear_refs`, so each phase reports its own peak. Where
//! either file is unavailable the peak is `None` rather than a made-up figure.

use std::time::Instant;

use serde::Serialize;

/// Wall time and peak resident memory of one phase.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PhaseStats {
    /// Wall time in seconds.
    pub wall_seconds: f64,
    /// Peak resident set size during the phase, in bytes (`None` where the OS does not say).
    pub peak_rss_bytes: Option<u64>,
}

impl PhaseStats {
    /// Peak RSS in MiB for tables, or `-` if unknown.
    pub fn peak_mib(&self) -> String {
        self.peak_rss_bytes.map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
    }
}

/// A running phase: started by [`Phase::start`], ended by [`Phase::finish`].
#[derive(Debug)]
pub struct Phase {
    started: Instant,
}

impl Phase {
    /// Resets the peak-RSS watermark and starts the clock.
    pub fn start() -> Self {
        // Best effort: without it the peak is the process's peak so far, still an upper bound.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self { started: Instant::now() }
    }

    /// Seconds since [`start`](Self::start).
    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Stops the clock and reads the peak since [`start`](Self::start).
    pub fn finish(self) -> PhaseStats {
        PhaseStats { wall_seconds: self.started.elapsed().as_secs_f64(), peak_rss_bytes: peak_rss_bytes() }
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
    }
}
