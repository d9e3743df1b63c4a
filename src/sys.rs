//! Facts about this process and machine that benchmarks and the trainer report or act on:
//! resident and available memory (from `/proc`, Linux), and the Ctrl-C flag the training loop
//! polls.

use std::sync::atomic::{AtomicBool, Ordering};

/// Peak resident memory of this process in MiB (`VmHWM`), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:") / 1024.0
}

/// Current resident memory of this process in MiB (`VmRSS`), 0 where unknown.
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:") / 1024.0
}

fn proc_status_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Memory available to new allocations in MiB (`MemAvailable`), `None` where unknown.
pub fn available_mib() -> Option<f64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|k| k / 1024.0)
    })
}

/// Set by the Ctrl-C handler ([`install_interrupt_handler`]); the training loop saves a
/// checkpoint and returns at the next step boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed since the handler was installed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs a SIGINT handler that only raises the flag [`interrupted`] reads (so a training
/// run can checkpoint and stop cleanly instead of dying mid-step).
pub fn install_interrupt_handler() {
    #[cfg(unix)]
    {
        extern "C" fn on_sigint(_: libc::c_int) {
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        }
    }
}
