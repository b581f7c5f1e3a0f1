//! How much memory this machine has, so that sizes read from a file or a flag are refused
//! with an error naming them before anything is allocated from them, instead of the process
//! aborting on a failed allocation (or, under overcommit, the whole machine running out).
//!
//! Linux reads `/proc/meminfo`; elsewhere the limits are unknown and only overflow is refused.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A field of `/proc/meminfo` in bytes (`MemTotal`, `MemAvailable`).
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Physical memory of the machine (read once).
pub fn total_bytes() -> Option<u64> {
    static TOTAL: OnceLock<Option<u64>> = OnceLock::new();
    *TOTAL.get_or_init(|| meminfo("MemTotal"))
}

/// Memory available for new allocations now (page cache counts as available).
pub fn available_bytes() -> Option<u64> {
    meminfo("MemAvailable")
}

/// `bytes` in a unit a person reads (`1.5 GB`).
pub fn human(bytes: u128) -> String {
    let b = bytes as f64;
    match b {
        b if b >= 1e12 => format!("{:.1} TB", b / 1e12),
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// Refuse `bytes` for `what` when it is more than the memory available now.
pub fn check_available(what: &str, bytes: u128) -> Result<()> {
    match available_bytes() {
        Some(avail) if bytes > avail as u128 => Err(Error::OutOfMemory {
            what: what.to_string(),
            msg: format!("needs {}, {} of memory is available", human(bytes), human(avail as u128)),
        }),
        _ => Ok(()),
    }
}

/// The element count of `shape` as `dtype_bytes`-byte elements, refused when it overflows or
/// one buffer of it would be larger than the machine's memory.
pub fn checked_numel(op: &'static str, shape: &[usize], dtype_bytes: usize) -> Result<usize> {
    let too_big = |msg: String| Error::OutOfMemory { what: format!("{op}: a tensor of shape {shape:?}"), msg };
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| too_big("its size overflows".into()))?;
    let bytes = n as u128 * dtype_bytes as u128;
    match total_bytes() {
        Some(total) if bytes > total as u128 => {
            Err(too_big(format!("needs {}, more than this machine's {} of memory", human(bytes), human(total as u128))))
        }
        _ => Ok(n),
    }
}

/// The peak resident memory of this process (Linux `VmHWM`), bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kb * 1024)
}

/// Reset the peak-RSS counter to the current resident memory (Linux ≥ 4.0), so that
/// [`peak_rss_bytes`] covers what follows only. `false` where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Keep freed memory in the process instead of returning it to the system at once (glibc on
/// Linux; elsewhere nothing): every op writes a fresh output buffer, and with glibc's defaults
/// each large one is a new `mmap` whose pages fault and are zeroed on first touch (≈ 230,000
/// minor faults per training step of the main job). Raises the mmap threshold to glibc's
/// maximum (32 MiB) and the trim threshold to 512 MiB, so freed buffers are reused by the
/// next step. The peak resident memory is the same (the memory is reused, not added); what
/// changes is that up to 512 MiB of freed memory stays mapped. The CLI calls this at start; a
/// program embedding the library may call it too. Returns whether the allocator took it.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes glibc malloc's tuning parameters; any value is checked
        // by glibc (an out-of-range one returns 0 and changes nothing).
        unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 512 << 20) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Return the free memory the allocator keeps (after [`tune_allocator`]) to the system now
/// (glibc's `malloc_trim`; elsewhere nothing), so a peak-memory reading that follows is not
/// inflated by what earlier work freed. `tinytune bench` calls it between cases.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}
