//! Progress of the CLI's long operations, on stderr. On a terminal: a bar (or a spinner for an
//! operation without a count) that is cleared when it ends. In a log file (stderr not a
//! terminal): nothing for an operation that ends within a few seconds, else a line per
//! tenth with the elapsed time and the ETA, so a slow evaluation is never silent.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A log file hears of an operation only once it has run this long.
const QUIET_FOR: Duration = Duration::from_secs(3);

/// Seconds as `h:mm:ss`.
pub fn clock(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// A counted operation: `what` (e.g. "evaluating 1060 reviews"), `done` of `total`.
pub struct Task {
    bar: ProgressBar,
    what: String,
    start: Instant,
    /// Log file: the next tenth to print a line at.
    next_tenth: usize,
    /// Prints nothing (see [`Task::hidden`]).
    silent: bool,
}

impl Task {
    pub fn new(what: impl Into<String>, total: usize) -> Task {
        let what = what.into();
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]").expect("valid template"),
        );
        bar.set_message(what.clone());
        Task { bar, what, start: Instant::now(), next_tenth: 1, silent: false }
    }

    /// A task that prints nothing, for an owner that shows the count itself (an evaluation
    /// under the training bar).
    pub fn hidden(what: impl Into<String>, total: usize) -> Task {
        let t = Task::new(what, total);
        t.bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        Task { silent: true, ..t }
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// Seconds since the task began.
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// `done` of `total` units are finished.
    pub fn set(&mut self, done: usize, total: usize) {
        if self.silent {
            return;
        }
        if !self.bar.is_hidden() {
            self.bar.set_length(total as u64);
            self.bar.set_position(done as u64);
            return;
        }
        let elapsed = self.start.elapsed();
        let tenth = (10 * done).checked_div(total).unwrap_or(10);
        if tenth >= self.next_tenth && done < total {
            self.next_tenth = tenth + 1;
            if elapsed >= QUIET_FOR {
                let secs = elapsed.as_secs_f64();
                let eta = secs / done.max(1) as f64 * (total - done) as f64;
                let _ = writeln!(std::io::stderr(), "{}: {done}/{total} [{} elapsed, ETA {}]", self.what, clock(secs), clock(eta));
            }
        }
    }

    /// The operation ended: clear the bar; a log file that heard of it hears how long it took.
    pub fn finish(self) {
        self.bar.finish_and_clear();
        let secs = self.start.elapsed();
        if self.bar.is_hidden() && !self.silent && secs >= QUIET_FOR {
            let _ = writeln!(std::io::stderr(), "{}: done in {}", self.what, clock(secs.as_secs_f64()));
        }
    }
}

/// Run `f`, an operation without a count (loading a model, writing a file), under a spinner
/// saying `what`. A log file hears of it before it starts when `announce` (the caller expects
/// it to be slow: a large file), and after it when it took a while.
pub fn spin<T>(what: &str, announce: bool, f: impl FnOnce() -> T) -> T {
    let bar = ProgressBar::new_spinner();
    if bar.is_hidden() && announce {
        let _ = writeln!(std::io::stderr(), "{what}...");
    }
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]").expect("valid template"));
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    let out = f();
    bar.finish_and_clear();
    if bar.is_hidden() && start.elapsed() >= QUIET_FOR {
        let _ = writeln!(std::io::stderr(), "{what}: done in {}", clock(start.elapsed().as_secs_f64()));
    }
    out
}
