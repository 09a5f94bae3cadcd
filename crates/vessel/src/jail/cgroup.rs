//! The jail's cgroup: `<parent>/<id>`, with the `--cgroup FILE=VALUE`
//! values written and the jailer moved in, as Firecracker's jailer does.
//!
//! - **v2**: one unified hierarchy. The controllers the files name are
//!   enabled in every ancestor's `cgroup.subtree_control` on the way down.
//! - **v1**: one hierarchy per controller (the file's prefix: `cpu` of
//!   `cpu.cfs_quota_us`), each found in /proc/self/mountinfo; the jailer
//!   joins every one the values name through its `tasks` file. A new cpuset
//!   cgroup starts with no CPUs or memory nodes, so it inherits its
//!   parent's, as Firecracker's jailer does. Hosts in systemd's hybrid mode
//!   (like ours) have cpu, memory and pids only in v1.

use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn from_flag(v: u32) -> Result<Version, String> {
        match v {
            1 => Ok(Version::V1),
            2 => Ok(Version::V2),
            _ => Err(format!("--cgroup-version {v}: must be 1 or 2")),
        }
    }
}

/// Create `<parent>/<id>`, write `values` and move this process in.
pub fn join(version: Version, parent: &str, id: &str, values: &[(String, String)]) -> Result<(), String> {
    if parent.split('/').any(|c| c == "..") {
        return Err(format!("--parent-cgroup {parent:?}: no .. components"));
    }
    let relative = Path::new(parent.trim_matches('/')).join(id);
    match version {
        Version::V2 => join_v2(&relative, values),
        Version::V1 => join_v1(&relative, values),
    }
}

/// Kill whatever is still in the v2 cgroup `relative` and remove it.
/// Waits up to a second for the killed tasks to leave.
pub fn remove_v2(relative: &Path) -> Result<(), String> {
    let base = mount_point("cgroup2", |_| true).ok_or("no cgroup v2 hierarchy is mounted")?;
    let dir = base.join(relative);
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills every task at once; older kernels
    // get a SIGKILL per listed task.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<libc::pid_t>().ok()) {
            // SAFETY: kill(2) with a pid from the cgroup's own list.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let mut last = String::new();
    for _ in 0..100 {
        match std::fs::remove_dir(&dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!("removing cgroup {}: {last}", dir.display()))
}

/// The controller a cgroup file belongs to: `memory` of `memory.max`.
fn controller(file: &str) -> Option<&str> {
    file.split_once('.').map(|(c, _)| c).filter(|c| *c != "cgroup")
}

/// Where a filesystem of type `fstype` is mounted, for the first mount
/// whose super options satisfy `options`.
fn mount_point(fstype: &str, options: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // ... mount-point ... - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        (right.next()? == fstype && options(right.nth(1).unwrap_or(""))).then_some(())?;
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn write(path: &Path, value: &str, what: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{what} ({}): {e}", path.display()))
}

fn join_v2(relative: &Path, values: &[(String, String)]) -> Result<(), String> {
    let base = mount_point("cgroup2", |_| true).ok_or("no cgroup v2 hierarchy is mounted (--cgroup-version 2)")?;
    let dir = base.join(relative);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cgroup {}: {e}", dir.display()))?;
    let mut controllers: Vec<&str> = values.iter().filter_map(|(f, _)| controller(f)).collect();
    controllers.sort();
    controllers.dedup();
    if !controllers.is_empty() {
        let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
        let mut at = base.clone();
        for part in relative.components() {
            std::fs::write(at.join("cgroup.subtree_control"), enable.trim()).map_err(|e| {
                format!(
                    "enabling {} in {}: {e} (is the controller in the cgroup v2 hierarchy? \
                     if the host has it only in v1, use --cgroup-version 1)",
                    controllers.join(", "),
                    at.display()
                )
            })?;
            at = at.join(part);
        }
    }
    for (f, v) in values {
        write(&dir.join(f), v, &format!("--cgroup {f}={v}"))?;
    }
    write(
        &dir.join("cgroup.procs"),
        &std::process::id().to_string(),
        &format!("joining cgroup {}", dir.display()),
    )
}

fn join_v1(relative: &Path, values: &[(String, String)]) -> Result<(), String> {
    // Each controller's directory, in the order the values first name it.
    let mut dirs: Vec<(&str, PathBuf)> = Vec::new();
    for (f, _) in values {
        let c = controller(f).ok_or_else(|| {
            format!("--cgroup {f}: with --cgroup-version 1, name a controller's file (cpu.shares, ...)")
        })?;
        if dirs.iter().any(|(have, _)| *have == c) {
            continue;
        }
        let base = mount_point("cgroup", |opts| opts.split(',').any(|o| o == c))
            .ok_or_else(|| format!("--cgroup {f}: no cgroup v1 hierarchy has the {c} controller"))?;
        let dir = base.join(relative);
        create_v1(&base, relative, c == "cpuset")?;
        dirs.push((c, dir));
    }
    for (f, v) in values {
        let c = controller(f).unwrap_or_default();
        if let Some((_, dir)) = dirs.iter().find(|(have, _)| *have == c) {
            write(&dir.join(f), v, &format!("--cgroup {f}={v}"))?;
        }
    }
    for (_, dir) in &dirs {
        write(
            &dir.join("tasks"),
            &std::process::id().to_string(),
            &format!("joining cgroup {}", dir.display()),
        )?;
    }
    Ok(())
}

/// Create each level of `relative` under `base`; for cpuset, give each new
/// level its parent's CPUs and memory nodes (empty ones admit no task).
fn create_v1(base: &Path, relative: &Path, cpuset: bool) -> Result<(), String> {
    let mut at = base.to_path_buf();
    for part in relative.components() {
        let parent = at.clone();
        at = at.join(part);
        if let Err(e) = std::fs::create_dir(&at) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(format!("cgroup {}: {e}", at.display()));
            }
        }
        if cpuset {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let mine = std::fs::read_to_string(at.join(f)).unwrap_or_default();
                if mine.trim().is_empty() {
                    let theirs = std::fs::read_to_string(parent.join(f))
                        .map_err(|e| format!("{}: {e}", parent.join(f).display()))?;
                    write(&at.join(f), theirs.trim(), "inheriting the parent's cpuset")?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_name_their_controller() {
        assert_eq!(controller("cpu.cfs_quota_us"), Some("cpu"));
        assert_eq!(controller("memory.max"), Some("memory"));
        assert_eq!(controller("cgroup.max.depth"), None);
        assert_eq!(controller("nodot"), None);
        assert!(Version::from_flag(3).is_err());
    }
}
