//! Clusters left behind by a process that died without dropping them.
//!
//! A `LocalCluster` stops its servers and removes its directory on drop, but
//! a process that is killed (SIGKILL, or Ctrl-C on `cargo test`, whose default
//! action runs no destructor) leaves its servers running, holding ports and
//! disk. Each cluster directory records its owner process (pid and start
//! time, so a reused pid is not mistaken for it); every start looks through
//! the temporary root and reaps the directories whose owner is gone: stops
//! the servers found by their pid files (only a process whose command line
//! names that directory is signalled), waits for them, and removes the
//! directory. A directory without an owner file (being created, or not the
//! kit's) is left alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process;

/// The file in a cluster directory naming its owner process.
const OWNER_FILE: &str = "owner";

/// How long reaping waits for an orphan's servers to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// This process as an owner record: pid and start time.
fn owner_record() -> String {
    let pid = std::process::id();
    format!("{pid} {}\n", process::start_time(pid).unwrap_or(0))
}

/// Writes the owner record into a new cluster directory.
pub(crate) fn claim(dir: &Path) -> std::io::Result<()> {
    fs::write(dir.join(OWNER_FILE), owner_record())
}

/// Reaps every orphaned cluster directory directly under `root`; returns
/// the directories removed. Best effort: what cannot be reaped is logged and
/// left.
pub(crate) fn reap(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for dir in entries.flatten().map(|e| e.path()) {
        let is_cluster = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgxkit-"));
        if !is_cluster || !is_orphan(&dir) {
            continue;
        }
        match reap_one(&dir) {
            Ok(()) => {
                log::info!("removed an orphaned test cluster: {}", dir.display());
                reaped.push(dir);
            }
            Err(why) => log::warn!(
                "could not remove the orphaned test cluster {}: {why}",
                dir.display()
            ),
        }
    }
    reaped
}

/// Whether `dir` has an owner record whose process is gone.
fn is_orphan(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        return false;
    };
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) else {
        return false; // unreadable: not ours to judge
    };
    let Ok(pid) = u32::try_from(pid) else {
        return false;
    };
    !(process::is_alive(pid) && process::start_time(pid) == Some(started))
}

fn reap_one(dir: &Path) -> Result<(), String> {
    let mut stopped = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| e.to_string())?;
    // Each subdirectory, and its `data` (a Patroni node's server).
    let subs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .flat_map(|sub| [sub.join("data"), sub])
        .collect();
    // An HA manager first, so it restarts no server; then the servers
    // (immediate shutdown), PgBouncer and etcd (fast).
    for (pid_file, signal) in [
        ("patroni.pid", Signal::SIGKILL),
        ("postmaster.pid", Signal::SIGQUIT),
        ("pgbouncer.pid", Signal::SIGTERM),
        ("etcd.pid", Signal::SIGTERM),
    ] {
        for sub in &subs {
            if let Some(pid) = process_of(sub, pid_file) {
                process::send_signal(pid, signal);
                stopped.push(pid);
            }
        }
    }
    if !process::wait_gone(&stopped, Instant::now() + STOP_TIMEOUT) {
        for &pid in &stopped {
            process::send_signal(pid, Signal::SIGKILL);
        }
        if !process::wait_gone(&stopped, Instant::now() + STOP_TIMEOUT) {
            return Err(format!("processes {stopped:?} did not exit"));
        }
    }
    match fs::remove_dir_all(dir) {
        // Another process reaping the same orphan got there first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| e.to_string()),
    }
}

/// The live process named by the first line of `dir/pid_file`, if its
/// command line names `dir` (so a reused pid is never signalled).
fn process_of(dir: &Path, pid_file: &str) -> Option<u32> {
    let text = fs::read_to_string(dir.join(pid_file)).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let dir = dir.to_str()?;
    (process::is_alive(pid) && cmdline.contains(dir)).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_owns_and_a_gone_one_does_not() {
        let root = tempfile::tempdir().unwrap();
        let mine = root.path().join("pgxkit-mine");
        fs::create_dir(&mine).unwrap();
        claim(&mine).unwrap();
        assert!(!is_orphan(&mine));

        // Same pid, another start time: a reused pid is not the owner.
        let reused = root.path().join("pgxkit-reused");
        fs::create_dir(&reused).unwrap();
        fs::write(
            reused.join(OWNER_FILE),
            format!("{} 1\n", std::process::id()),
        )
        .unwrap();
        assert!(is_orphan(&reused));

        // No owner file, or another prefix: left alone.
        let unowned = root.path().join("pgxkit-unowned");
        fs::create_dir(&unowned).unwrap();
        let other = root.path().join("other-dir");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(OWNER_FILE), "1 1\n").unwrap();

        let reaped = reap(root.path());
        assert_eq!(reaped, std::slice::from_ref(&reused));
        assert!(mine.exists() && unowned.exists() && other.exists());
        assert!(!reused.exists());
    }

    #[test]
    fn a_pid_file_naming_another_process_is_not_signalled() {
        // This test process's pid, in a directory its command line does not
        // name: never signalled.
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(process_of(dir.path(), "postmaster.pid"), None);
    }
}
