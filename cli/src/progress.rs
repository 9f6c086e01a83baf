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
