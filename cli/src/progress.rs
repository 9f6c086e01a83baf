//! Progress on stderr for long phases.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar with ETA on stderr.
pub fn progress(len: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>30} [{bar:25}] {pos}/{len} {msg} (ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// A spinner with `message` on stderr, ticking until finished; for phases of unknown length.
pub fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    spinner
}

/// Runs `work` under a [`spinner`] showing `message`: for the phases without steps to count
/// (loading a model, correction, merging).
pub fn with_spinner<T>(message: impl Into<String>, work: impl FnOnce() -> T) -> T {
    let spinner = spinner(message.into());
    let result = work();
    spinner.finish_and_clear();
    result
}

/// Progress of an emulator's factorisation, one step per layer: a bar that appears with the
/// first factored layer (calibration has its own) and shows the layer's path.
pub fn factorization() -> impl FnMut(emloc::FactorizationProgress<'_>) {
    let mut bar: Option<ProgressBar> = None;
    move |p| {
        let bar = bar.get_or_insert_with(|| progress(p.total, "factorisation"));
        bar.set_position(p.done as u64);
        bar.set_message(p.path.to_string());
        if p.done == p.total {
            bar.finish_and_clear();
        }
    }
}
