//! This host and this moment, as the board and the state directory record them: the clock,
//! the claimer id, the boot. A leaf: it imports nothing of the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// 64 bits from the kernel's random pool: names nobody can guess in advance.
pub fn random_u64() -> std::io::Result<u64> {
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most `r.len()` bytes into `r`.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if n != r.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(r))
}

/// Seconds since the epoch, as upstream stores times.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `"<hostname>:<pid>"` — upstream's `_claimer_id()`; its host-local checks compare the
/// hostname prefix, so the format must match exactly.
pub fn claimer_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    format!("{host}:{}", std::process::id())
}

/// This boot's random id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// When this boot began (`btime` of `/proc/stat`), in seconds since the epoch.
pub fn boot_time() -> Option<i64> {
    procfs::boot_time_secs().ok().map(|t| t as i64)
}
