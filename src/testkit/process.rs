//! Finding the server binaries, running them as the right OS user, and the
//! process bookkeeping (children, liveness, signals) the nodes need.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

use super::error::Error;

/// Programs a local cluster needs from the server package.
const REQUIRED: [&str; 3] = ["initdb", "postgres", "pg_basebackup"];

/// How often bounded waits look at their condition again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Finds the directory with the PostgreSQL server binaries: `pg_config
/// --bindir` first, then the newest `/usr/lib/postgresql/*/bin`.
pub(crate) fn find_bin_dir() -> Result<PathBuf, Error> {
    discover_bin_dir("pg_config", Path::new("/usr/lib/postgresql"))
}

pub(crate) fn discover_bin_dir(pg_config: &str, versions_root: &Path) -> Result<PathBuf, Error> {
    let from_pg_config = Command::new(pg_config)
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|dir| has_server_binaries(dir)) {
        return Ok(dir);
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server_binaries(dir))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir).ok_or_else(|| {
        Error::new(
            "find binaries",
            format!(
                "no PostgreSQL server binaries found (`{pg_config} --bindir` gave none with initdb, \
                 and none in {}/*/bin); install the server package \
                 (Debian/Ubuntu: `apt-get install postgresql`)",
                versions_root.display()
            ),
        )
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED.iter().all(|name| dir.join(name).is_file())
}

/// Checks that a user-given directory holds the server binaries.
pub(crate) fn check_bin_dir(dir: &Path) -> Result<(), Error> {
    match REQUIRED.iter().find(|name| !dir.join(name).is_file()) {
        None => Ok(()),
        Some(missing) => Err(Error::new(
            "find binaries",
            format!(
                "{} has no `{missing}`: not a PostgreSQL server bin directory; install the server \
                 package (Debian/Ubuntu: `apt-get install postgresql`)",
                dir.display()
            ),
        )),
    }
}

/// Runs the server programs from one bin directory, as the `postgres` OS user
/// when this process is root (the server refuses to run as root).
#[derive(Debug)]
pub(crate) struct Runner {
    bin_dir: PathBuf,
    owner: Option<(Uid, Gid)>,
    work_dir: PathBuf,
}

impl Runner {
    pub(crate) fn new(bin_dir: PathBuf, work_dir: PathBuf) -> Result<Self, Error> {
        let owner = if effective_uid_is_root() {
            let user = User::from_name("postgres").ok().flatten().ok_or_else(|| {
                Error::new(
                    "find server user",
                    "running as root, but there is no `postgres` OS user to run the server as \
                     (the server refuses root; the Debian package postgresql creates that user)",
                )
            })?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        Ok(Runner {
            bin_dir,
            owner,
            work_dir,
        })
    }

    /// Gives `path` (and nothing below it) to the server's OS user.
    pub(crate) fn hand_over(&self, path: &Path) -> Result<(), Error> {
        if let Some((uid, gid)) = self.owner {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| {
                Error::new(
                    "prepare directory",
                    format!("cannot give {} to the postgres user: {e}", path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// A command for one of the server programs, with output appended to `log`.
    pub(crate) fn command(&self, program: &str, log: &Path) -> Result<Command, Error> {
        self.command_path(&self.bin_dir.join(program), log)
    }

    /// A command for the program at `path`, run like the server programs.
    pub(crate) fn command_path(&self, path: &Path, log: &Path) -> Result<Command, Error> {
        let mut cmd = Command::new(path);
        // libpq and the server read PG* variables; the cluster must not
        // depend on whatever the user's shell has set.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C")
            .current_dir(&self.work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(open_log(log)?))
            .stderr(Stdio::from(open_log(log)?));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        Ok(cmd)
    }

    /// Runs a program to completion within `timeout`; its output goes to `log`.
    pub(crate) fn run(
        &self,
        step: &'static str,
        program: &str,
        args: &[&str],
        log: &Path,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut child = self
            .command(program, log)?
            .args(args)
            .spawn()
            .map_err(|e| Error::new(step, format!("cannot run {program}: {e}")))?;
        match wait_exit(&mut child, Instant::now() + timeout) {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                Err(Error::new(step, format!("{program} failed ({status})")).with_log(log))
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(
                    Error::new(step, format!("{program} did not finish within {timeout:?}"))
                        .with_log(log),
                )
            }
        }
    }
}

fn open_log(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::new("open log", format!("cannot open {}: {e}", path.display())))
}

fn effective_uid_is_root() -> bool {
    // The owner of /proc/self is the process's effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or_else(|_| Uid::effective().is_root())
}

/// Waits for a child to exit until `deadline`; `None` when it is still running.
pub(crate) fn wait_exit(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(POLL),
            // The child was already reaped: treat it as gone.
            Err(_) => return Some(ExitStatus::default()),
        }
    }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn send_signal(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = signal::kill(Pid::from_raw(raw), signal);
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub(crate) fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|(state, _)| state != "Z"),
        Err(_) => false,
    }
}

/// The live processes whose parent is `parent`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    stat_fields(&stat).map(|(state, ppid)| state != "Z" && ppid == parent)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The fields of `/proc/PID/stat` after the command name, from field 3
/// (state) on: the name in parentheses may itself hold spaces and parentheses.
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// State and parent pid from the text of `/proc/PID/stat`.
fn stat_fields(stat: &str) -> Option<(&str, u32)> {
    let mut fields = fields_after_name(stat)?;
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The start time of `pid` in clock ticks since boot (`/proc/PID/stat`
/// field 22): with the pid, it names one process even after pid reuse.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    fields_after_name(&stat)?.nth(22 - 3)?.parse().ok()
}

/// Waits until none of `pids` is alive, until `deadline`; returns whether they all went.
pub(crate) fn wait_gone(pids: &[u32], deadline: Instant) -> bool {
    loop {
        if !pids.iter().any(|&pid| is_alive(pid)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat = "1234 (post) gres: x) S 99 1234 1234 0 -1";
        assert_eq!(stat_fields(stat), Some(("S", 99)));
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn discovery_names_the_package_when_nothing_is_found() {
        let err = discover_bin_dir(
            "/nonexistent/pg_config",
            Path::new("/nonexistent/lib/postgresql"),
        )
        .unwrap_err();
        assert_eq!(err.step(), "find binaries");
        assert!(
            err.to_string().contains("apt-get install postgresql"),
            "{err}"
        );
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_pid_is_not() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX - 1));
    }
}
