//! Where the time goes: a per-kernel profile of everything the engine runs.
//!
//! Off by default (one relaxed atomic load per kernel). On with `TINYTUNE_PROFILE=1` or
//! [`set_enabled`]; every primitive of [`crate::backend::Storage`] then records its wall time,
//! its floating-point operations (matmul-like kernels), the bytes of its output and one call,
//! keyed by the kernel and the phase it ran in: `forward`, the backward rule of a forward op
//! (`backward:matmul`, `backward:silu`: the kernels that rule ran), or `optimizer`. A kernel
//! that runs another kernel through `Storage` is counted once, as the outer one. [`table`]
//! prints the totals, largest first, with the time outside every kernel (graph building,
//! freeing, the trainer) and the process's minor page faults in the window.
//!
//! On the GPU a kernel's time is the time to record it, not to run it (the queue is
//! asynchronous); the calls (dispatches) and bytes are exact.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static FROM_ENV: Once = Once::new();

/// The counters since [`reset`] (or the first kernel).
static STATS: Mutex<Option<Window>> = Mutex::new(None);

thread_local! {
    static PHASE: Cell<&'static str> = const { Cell::new("forward") };
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

struct Window {
    start: Instant,
    faults: Option<u64>,
    rows: HashMap<(&'static str, &'static str), Row>,
}

impl Window {
    fn new() -> Window {
        Window { start: Instant::now(), faults: minor_faults(), rows: HashMap::new() }
    }
}

/// The totals of one kernel in one phase.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub phase: &'static str,
    pub kernel: &'static str,
    pub calls: u64,
    pub secs: f64,
    pub flops: f64,
    pub bytes: u64,
}

/// Whether kernels are being profiled (`TINYTUNE_PROFILE=1` turns it on at the first kernel).
pub fn enabled() -> bool {
    FROM_ENV.call_once(|| {
        if std::env::var("TINYTUNE_PROFILE").is_ok_and(|v| v == "1") {
            ENABLED.store(true, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// Turn profiling on or off (overrides the environment).
pub fn set_enabled(on: bool) {
    FROM_ENV.call_once(|| {});
    ENABLED.store(on, Ordering::Relaxed);
}

/// Forget the counters and start a new window now.
pub fn reset() {
    *STATS.lock().unwrap_or_else(|e| e.into_inner()) = Some(Window::new());
}

/// Run `f` with kernels attributed to `phase` (`"optimizer"`, `"backward:matmul"`).
pub fn in_phase<T>(phase: &'static str, f: impl FnOnce() -> T) -> T {
    let before = PHASE.with(|p| p.replace(phase));
    let out = f();
    PHASE.with(|p| p.set(before));
    out
}

/// `"backward:OP"` for a forward op's name (one leaked string per op name, a few dozen in
/// all); `"backward"` when profiling is off, without allocating.
pub fn backward_phase(op: &'static str) -> &'static str {
    if !enabled() {
        return "backward";
    }
    static NAMES: Mutex<Option<HashMap<&'static str, &'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    names.get_or_insert_with(HashMap::new).entry(op).or_insert_with(|| Box::leak(format!("backward:{op}").into_boxed_str()))
}

/// A kernel being timed; records on drop. `None` inside when profiling is off or the kernel
/// runs inside another one.
pub struct Span(Option<(Instant, &'static str, f64)>);

/// Start timing `kernel`, which does `flops` floating-point operations (0 when not
/// meaningful). Finish with [`Span::done`], giving the output's size.
#[inline]
pub fn span(kernel: &'static str, flops: f64) -> Span {
    if !enabled() {
        return Span(None);
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    Span(if outer { Some((Instant::now(), kernel, flops)) } else { None })
}

impl Span {
    /// The kernel returned an output of `bytes` bytes (0 for none or on error).
    #[inline]
    pub fn done(mut self, bytes: usize) {
        self.record(bytes);
    }

    fn record(&mut self, bytes: usize) {
        let Some((t0, kernel, flops)) = self.0.take() else { return };
        let secs = t0.elapsed().as_secs_f64();
        let phase = PHASE.with(Cell::get);
        let mut stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
        let w = stats.get_or_insert_with(Window::new);
        let row = w.rows.entry((phase, kernel)).or_insert_with(|| Row { phase, kernel, ..Row::default() });
        row.calls += 1;
        row.secs += secs;
        row.flops += flops;
        row.bytes += bytes as u64;
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if enabled() {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
        self.record(0);
    }
}

/// The rows of the current window, largest time first; the window's wall time; its minor
/// page faults (Linux).
pub fn snapshot() -> (Vec<Row>, Duration, Option<u64>) {
    let stats = STATS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = stats.as_ref() else { return (Vec::new(), Duration::ZERO, None) };
    let mut rows: Vec<Row> = w.rows.values().cloned().collect();
    rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    let faults = minor_faults().zip(w.faults).map(|(now, then)| now.saturating_sub(then));
    (rows, w.start.elapsed(), faults)
}

/// The profile as a table: per kernel (all phases), then per phase, each with its share of
/// the window's wall time, calls, GFLOP/s where it computes, and MB written.
pub fn table() -> String {
    let (rows, wall, faults) = snapshot();
    let wall_s = wall.as_secs_f64().max(1e-9);
    let mut out = String::new();
    let in_kernels: f64 = rows.iter().map(|r| r.secs).sum();
    let line = |out: &mut String, name: &str, secs: f64, calls: u64, flops: f64, bytes: u64| {
        let rate = if flops > 0.0 && secs > 0.0 { format!("{:8.1}", flops / secs / 1e9) } else { format!("{:>8}", "") };
        out.push_str(&format!(
            "{name:<34} {secs:9.3} {:6.1}% {calls:9} {:9.1} {rate} {:10.1}\n",
            100.0 * secs / wall_s,
            1e6 * secs / calls.max(1) as f64,
            bytes as f64 / 1e6
        ));
    };
    let header = |out: &mut String, what: &str| {
        out.push_str(&format!(
            "{what:<34} {:>9} {:>7} {:>9} {:>9} {:>8} {:>10}\n",
            "seconds", "share", "calls", "µs/call", "GFLOP/s", "MB out"
        ));
    };
    let faults = faults.map_or(String::new(), |f| format!(", {f} minor page faults"));
    out.push_str(&format!("profile: {wall_s:.3} s wall, {in_kernels:.3} s in kernels{faults}\n"));
    header(&mut out, "kernel");
    for (k, r) in &totals(&rows, |r| r.kernel) {
        line(&mut out, k, r.secs, r.calls, r.flops, r.bytes);
    }
    line(&mut out, "(outside kernels)", (wall_s - in_kernels).max(0.0), 0, 0.0, 0);
    out.push('\n');
    header(&mut out, "phase / kernel");
    for (p, total) in &totals(&rows, |r| r.phase) {
        line(&mut out, p, total.secs, total.calls, total.flops, total.bytes);
        // The phase's three largest kernels, indented.
        for r in rows.iter().filter(|r| r.phase == *p).take(3) {
            line(&mut out, &format!("  {}", r.kernel), r.secs, r.calls, r.flops, r.bytes);
        }
    }
    out
}

/// The rows summed by `key` (the kernel or the phase), largest time first.
fn totals(rows: &[Row], key: fn(&Row) -> &'static str) -> Vec<(&'static str, Row)> {
    let mut by: HashMap<&'static str, Row> = HashMap::new();
    for r in rows {
        let e = by.entry(key(r)).or_default();
        (e.calls, e.secs, e.flops, e.bytes) = (e.calls + r.calls, e.secs + r.secs, e.flops + r.flops, e.bytes + r.bytes);
    }
    let mut out: Vec<(&'static str, Row)> = by.into_iter().collect();
    out.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
    out
}

/// The process's minor page faults so far (Linux `/proc/self/stat`, field 10).
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(7)?.parse().ok()
}
