//! Runtime directories of named VMs: `/run/vessel/NAME/` as root,
//! `$XDG_RUNTIME_DIR/vessel/NAME/` otherwise (or `/tmp/vessel-UID/NAME/`
//! when that is unset). Each holds the VM's API socket, its console socket
//! and log, and its pid. The CLI finds VMs here; there is no daemon.

use std::path::{Path, PathBuf};

pub const API_SOCK: &str = "api.sock";
pub const CONSOLE_SOCK: &str = "console.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
pub const PID_FILE: &str = "pid";

/// Where every named VM's directory lives.
pub fn base() -> PathBuf {
    if let Some(dir) = std::env::var_os("VESSEL_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/vessel");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vessel"),
        _ => PathBuf::from(format!("/tmp/vessel-{uid}")),
    }
}

/// A VM name: 1 to 64 of letters, digits, '_', '-', '.', not starting with '.'.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "VM name {name:?} is invalid: use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
        ))
    }
}

pub fn dir_of(name: &str) -> PathBuf {
    base().join(name)
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

pub fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join(PID_FILE)).ok()?.trim().parse().ok()
}

/// Whether the VM in `dir` is alive (its process exists).
pub fn is_live(dir: &Path) -> bool {
    read_pid(dir).is_some_and(pid_alive)
}

/// Claim `name`'s directory for this process: create it, or take over one
/// whose VM is gone. A live VM of that name is an error.
pub fn claim(name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    let dir = dir_of(name);
    if dir.exists() {
        if is_live(&dir) && read_pid(&dir) != Some(std::process::id() as i32) {
            return Err(format!("a VM named {name:?} is already running ({})", dir.display()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn write_pid(dir: &Path) -> Result<(), String> {
    std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id()))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Every VM directory, sorted by name; directories of VMs that are gone
/// are removed on the way.
pub fn list() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(base()) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !path.is_dir() || check_name(&name).is_err() {
            continue;
        }
        if !is_live(&path) {
            // A VM still starting has no pid file yet; leave young dirs be.
            let young = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < std::time::Duration::from_secs(10));
            if !young {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "vm-1", "a.b_c", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
