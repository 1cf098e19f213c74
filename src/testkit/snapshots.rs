//! Snapshot assertions for tests, like the Go pgxkit's `AssertPlan` and
//! `AssertGolden`: a query's plan (`EXPLAIN (FORMAT JSON, COSTS OFF)`) in
//! `plans/<name>.json`, the statements a test ran ([`Transcript`]) in
//! `golden/<name>.txt`, under a directory of your choosing
//! (`testdata/` of the crate by default). The first run writes the file;
//! later runs compare and fail with a line diff. With
//! `PGXKIT_UPDATE_SNAPSHOTS=1` every file is rewritten instead.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::hooks::TransactionOutcome;
use crate::statements::Params;
use crate::{Cluster, ClusterBuilder, Error};

/// The variable that rewrites every snapshot instead of comparing.
pub const UPDATE_VAR: &str = "PGXKIT_UPDATE_SNAPSHOTS";

/// Where snapshots live, and whether they are rewritten.
///
/// ```no_run
/// use pgxkit::testkit::{LocalCluster, Snapshots};
///
/// let local = LocalCluster::start(0).unwrap();
/// let cluster = pgxkit::Cluster::connect(&local.primary_dsn()).unwrap();
/// cluster.batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE)").unwrap();
/// Snapshots::in_crate().assert_plan(&cluster, "user_by_email", "SELECT id FROM users WHERE email = $1", &[&"a@b.c"]);
/// ```
#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
    update: bool,
}

/// A snapshot that differs from what the test produced (or could not be
/// read or written).
#[derive(Debug)]
pub struct Mismatch {
    /// The snapshot's file.
    pub path: PathBuf,
    /// What differs: a line diff (`-` the file, `+` now), or why the file
    /// could not be used.
    pub diff: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot {} differs (set {UPDATE_VAR}=1 to rewrite it):\n{}",
            self.path.display(),
            self.diff
        )
    }
}

impl std::error::Error for Mismatch {}

impl Snapshots {
    /// Snapshots under `dir`; rewritten when [`UPDATE_VAR`] is `1` or `true`.
    ///
    /// ```
    /// let snapshots = pgxkit::testkit::Snapshots::new("tests/snapshots");
    /// ```
    pub fn new(dir: impl Into<PathBuf>) -> Snapshots {
        let update = std::env::var(UPDATE_VAR).is_ok_and(|v| v == "1" || v == "true");
        Snapshots {
            dir: dir.into(),
            update,
        }
    }

    /// Snapshots under `testdata/` of the crate being tested
    /// (`CARGO_MANIFEST_DIR`, which cargo sets for tests; else the
    /// current directory).
    ///
    /// ```
    /// let snapshots = pgxkit::testkit::Snapshots::in_crate();
    /// ```
    pub fn in_crate() -> Snapshots {
        let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(PathBuf::new, PathBuf::from);
        Snapshots::new(root.join("testdata"))
    }

    /// Rewrite (`true`) or compare (`false`), whatever [`UPDATE_VAR`] says.
    ///
    /// ```
    /// let snapshots = pgxkit::testkit::Snapshots::new("testdata").update(false);
    /// ```
    #[must_use]
    pub fn update(mut self, yes: bool) -> Snapshots {
        self.update = yes;
        self
    }

    /// Compares `text` with the snapshot `<dir>/<path>` (writing it when
    /// missing, or in update mode).
    ///
    /// # Errors
    /// A [`Mismatch`] with a line diff.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let snapshots = pgxkit::testkit::Snapshots::new(dir.path());
    /// snapshots.check_text("report.txt", "total 3\n").unwrap(); // written
    /// assert!(snapshots.check_text("report.txt", "total 4\n").is_err());
    /// ```
    pub fn check_text(&self, path: impl AsRef<Path>, text: &str) -> Result<(), Mismatch> {
        let path = self.dir.join(path);
        let mismatch = |diff: String| Mismatch {
            path: path.clone(),
            diff,
        };
        match std::fs::read_to_string(&path) {
            Ok(old) if !self.update => {
                if old == text {
                    Ok(())
                } else {
                    Err(mismatch(line_diff(&old, text)))
                }
            }
            Err(e) if !self.update && e.kind() != std::io::ErrorKind::NotFound => {
                Err(mismatch(format!("cannot read it: {e}")))
            }
            _ => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        mismatch(format!("cannot create {}: {e}", parent.display()))
                    })?;
                }
                std::fs::write(&path, text).map_err(|e| mismatch(format!("cannot write it: {e}")))
            }
        }
    }

    /// [`check_text`](Self::check_text) that panics with the diff.
    ///
    /// # Panics
    /// When the snapshot differs.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// pgxkit::testkit::Snapshots::new(dir.path()).assert_text("greeting.txt", "hello\n");
    /// ```
    #[track_caller]
    pub fn assert_text(&self, path: impl AsRef<Path>, text: &str) {
        if let Err(m) = self.check_text(path, text) {
            panic!("{m}");
        }
    }

    /// The plan of `sql` with `params` on the cluster's primary, as
    /// `EXPLAIN (FORMAT JSON, COSTS OFF)` gives it, compared with
    /// `plans/<name>.json`.
    ///
    /// # Errors
    /// A [`Mismatch`] (a sequential scan where an index scan was shows as
    /// `-` and `+` lines), or the error of the `EXPLAIN`.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app").unwrap();
    /// let snapshots = pgxkit::testkit::Snapshots::in_crate();
    /// if let Err(e) = snapshots.check_plan(&cluster, "orders_by_user", "SELECT * FROM orders WHERE user_id = $1", &[&7i64]) {
    ///     panic!("{e}");
    /// }
    /// ```
    pub fn check_plan(
        &self,
        cluster: &Cluster,
        name: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let plan = explain(cluster, sql, params)?;
        self.check_text(format!("plans/{name}.json"), &plan)?;
        Ok(())
    }

    /// [`check_plan`](Self::check_plan) that panics with the diff.
    ///
    /// # Panics
    /// When the plan differs from the snapshot, or the `EXPLAIN` fails.
    ///
    /// ```no_run
    /// # let cluster = pgxkit::Cluster::connect("postgres://app@localhost/app").unwrap();
    /// pgxkit::testkit::Snapshots::in_crate().assert_plan(&cluster, "users_page", "SELECT * FROM users ORDER BY id LIMIT 20", &[]);
    /// ```
    #[track_caller]
    pub fn assert_plan(&self, cluster: &Cluster, name: &str, sql: &str, params: Params<'_>) {
        if let Err(e) = self.check_plan(cluster, name, sql, params) {
            panic!("{e}");
        }
    }

    /// Compares what `transcript` recorded with `golden/<name>.txt`.
    ///
    /// # Errors
    /// A [`Mismatch`] with a line diff.
    ///
    /// ```no_run
    /// # let transcript = pgxkit::testkit::Transcript::new();
    /// pgxkit::testkit::Snapshots::in_crate().check_transcript("signup", &transcript).unwrap();
    /// ```
    pub fn check_transcript(&self, name: &str, transcript: &Transcript) -> Result<(), Mismatch> {
        self.check_text(format!("golden/{name}.txt"), &transcript.text())
    }

    /// [`check_transcript`](Self::check_transcript) that panics with the diff.
    ///
    /// # Panics
    /// When the transcript differs from the snapshot.
    ///
    /// ```no_run
    /// # let transcript = pgxkit::testkit::Transcript::new();
    /// pgxkit::testkit::Snapshots::in_crate().assert_transcript("signup", &transcript);
    /// ```
    #[track_caller]
    pub fn assert_transcript(&self, name: &str, transcript: &Transcript) {
        if let Err(m) = self.check_transcript(name, transcript) {
            panic!("{m}");
        }
    }
}

/// `EXPLAIN (FORMAT JSON, COSTS OFF)` of `sql` on the primary, as text.
fn explain(cluster: &Cluster, sql: &str, params: Params<'_>) -> Result<String, Error> {
    let row = cluster.query_one(&format!("EXPLAIN (FORMAT JSON, COSTS OFF) {sql}"), params)?;
    let plan: crate::plans::JsonText = row.try_get(0).map_err(Error::from)?;
    let mut text = plan.0;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

type Normalizer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The statements a cluster ran, one line each, for
/// [`Snapshots::assert_transcript`]: `BEGIN`, `COMMIT` / `ROLLBACK`, each
/// statement's kind, SQL, parameters (as text) and rows affected, or its
/// error's kind and SQLSTATE. Recorded by the operation and transaction
/// hooks [`attach`](Self::attach) adds, so it is what the cluster ran;
/// UUIDs and timestamps are replaced by `<uuid>` and `<timestamp>`
/// (see [`normalize`](Self::normalize) for more). Lines are in the order
/// the hooks ran: run the statements of one transcript on one thread.
///
/// ```no_run
/// use pgxkit::testkit::{LocalCluster, Snapshots, Transcript};
///
/// let local = LocalCluster::start(0).unwrap();
/// let transcript = Transcript::new();
/// let cluster = transcript
///     .attach(pgxkit::Cluster::builder().primary(local.primary_dsn()))
///     .build()
///     .unwrap();
/// cluster.batch_execute("CREATE TABLE users (id serial, name text)").unwrap();
/// transcript.clear(); // the set-up is not part of it
/// cluster.transaction(|tx| tx.execute("INSERT INTO users (name) VALUES ($1)", &[&"ada"])).unwrap();
/// Snapshots::in_crate().assert_transcript("insert_user", &transcript);
/// ```
#[derive(Clone)]
pub struct Transcript {
    lines: Arc<Mutex<Vec<String>>>,
    normalizer: Arc<Mutex<Normalizer>>,
}

impl fmt::Debug for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transcript")
            .field("lines", &self.lines.lock().map(|l| l.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Default for Transcript {
    fn default() -> Self {
        Transcript::new()
    }
}

impl Transcript {
    /// An empty transcript with the UUID and timestamp normaliser.
    ///
    /// ```
    /// let transcript = pgxkit::testkit::Transcript::new();
    /// assert_eq!(transcript.text(), "");
    /// ```
    pub fn new() -> Transcript {
        Transcript {
            lines: Arc::default(),
            normalizer: Arc::new(Mutex::new(Arc::new(uuids_and_timestamps))),
        }
    }

    /// Adds the recording hooks to `builder`, and
    /// [`log_parameters(true)`](ClusterBuilder::log_parameters) so they see
    /// the parameters.
    ///
    /// ```
    /// let transcript = pgxkit::testkit::Transcript::new();
    /// let builder = transcript.attach(pgxkit::Cluster::builder().primary("postgres://app@localhost/app"));
    /// ```
    pub fn attach(&self, builder: ClusterBuilder) -> ClusterBuilder {
        let (ops, begins, ends) = (self.clone(), self.clone(), self.clone());
        builder
            .log_parameters(true)
            .after_operation(move |op| {
                let params = op
                    .params()
                    .filter(|p| !p.is_empty())
                    .map(|p| format!(" [{}]", p.join(", ")))
                    .unwrap_or_default();
                let outcome = match op.error() {
                    None => match op.rows() {
                        Some(n) => format!(" -> {n} row{}", if n == 1 { "" } else { "s" }),
                        None => String::new(),
                    },
                    Some(e) => format!(
                        " -> error {:?}{}",
                        e.kind(),
                        e.code()
                            .map(|c| format!(" {}", c.code()))
                            .unwrap_or_default()
                    ),
                };
                let kind: &str = op.kind().as_str();
                ops.push(format!("{kind}: {}{params}{outcome}", op.sql().trim()));
                Ok(())
            })
            .before_transaction(move |ev| {
                begins.push(
                    if ev.read_only() {
                        "BEGIN READ ONLY"
                    } else {
                        "BEGIN"
                    }
                    .to_owned(),
                );
                Ok(())
            })
            .after_transaction(move |ev| {
                let line = match ev.outcome() {
                    Some(TransactionOutcome::Commit) => "COMMIT",
                    Some(TransactionOutcome::Unknown) => "COMMIT (outcome unknown)",
                    _ => "ROLLBACK",
                };
                ends.push(line.to_owned());
                Ok(())
            })
    }

    /// Adds a normaliser, applied to every line after the built-in one
    /// (UUIDs, timestamps): for ids, sequence values, anything that
    /// changes from run to run.
    ///
    /// ```
    /// let transcript = pgxkit::testkit::Transcript::new()
    ///     .normalize(|line| line.replace("ada@example.com", "<email>"));
    /// ```
    #[must_use]
    pub fn normalize(self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Transcript {
        {
            let mut current = crate::sync::lock(&self.normalizer);
            let before = Arc::clone(&current);
            *current = Arc::new(move |line: &str| f(&before(line)));
        }
        self
    }

    fn push(&self, line: String) {
        let normalizer = Arc::clone(&crate::sync::lock(&self.normalizer));
        crate::sync::lock(&self.lines).push(normalizer(&line));
    }

    /// Forgets what was recorded (the test's set-up, say).
    ///
    /// ```
    /// let transcript = pgxkit::testkit::Transcript::new();
    /// transcript.clear();
    /// ```
    pub fn clear(&self) {
        crate::sync::lock(&self.lines).clear();
    }

    /// The recorded lines, each ending with a newline.
    ///
    /// ```
    /// assert!(pgxkit::testkit::Transcript::new().text().is_empty());
    /// ```
    pub fn text(&self) -> String {
        crate::sync::lock(&self.lines)
            .iter()
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

/// Replaces UUIDs (`8-4-4-4-12` hexadecimal digits) with `<uuid>` and
/// timestamps (`YYYY-MM-DD HH:MM:SS`, with `T`, fractions and an offset or
/// `Z` when present) with `<timestamp>`: the transcript's built-in
/// normaliser.
///
/// ```
/// use pgxkit::testkit::uuids_and_timestamps;
/// assert_eq!(
///     uuids_and_timestamps("id 3f2504e0-4f89-11d3-9a0c-0305e82c3301 at 2026-12-04 21:07:37.123+00"),
///     "id <uuid> at <timestamp>"
/// );
/// ```
pub fn uuids_and_timestamps(line: &str) -> String {
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(n) = uuid_at(&bytes[i..]) {
            out.push_str("<uuid>");
            i += n;
        } else if let Some(n) = timestamp_at(&bytes[i..]) {
            out.push_str("<timestamp>");
            i += n;
        } else {
            let c = line[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Bytes matching `pattern` (`h` a hex digit, `d` a digit, else itself).
fn matches(s: &[u8], pattern: &[u8]) -> bool {
    s.len() >= pattern.len()
        && s.iter().zip(pattern).all(|(&c, &p)| match p {
            b'h' => c.is_ascii_hexdigit(),
            b'd' => c.is_ascii_digit(),
            _ => c == p,
        })
}

fn uuid_at(s: &[u8]) -> Option<usize> {
    const UUID: &[u8] = b"hhhhhhhh-hhhh-hhhh-hhhh-hhhhhhhhhhhh";
    let boundary = s.get(UUID.len()).is_none_or(|c| !c.is_ascii_hexdigit());
    (matches(s, UUID) && boundary).then_some(UUID.len())
}

fn timestamp_at(s: &[u8]) -> Option<usize> {
    if !matches(s, b"dddd-dd-dd")
        || !(matches(&s[10..], b" dd:dd:dd") || matches(&s[10..], b"Tdd:dd:dd"))
    {
        return None;
    }
    let mut n = 19;
    if s.get(n) == Some(&b'.') {
        n += 1;
        while s.get(n).is_some_and(u8::is_ascii_digit) {
            n += 1;
        }
    }
    match s.get(n) {
        Some(b'Z') => n += 1,
        Some(b'+' | b'-') if s.get(n + 1).is_some_and(u8::is_ascii_digit) => {
            n += 1;
            while s.get(n).is_some_and(|c| c.is_ascii_digit() || *c == b':') {
                n += 1;
            }
        }
        _ => {}
    }
    Some(n)
}

/// A line diff of `old` and `new`: `-` lines only in `old`, `+` only in
/// `new`, two lines of context around each change, `...` for the rest.
fn line_diff(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    // Longest common subsequence, by dynamic programming (snapshots are small).
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 2;
    let near_change = |k: usize| {
        let lo = k.saturating_sub(CONTEXT);
        let hi = (k + CONTEXT).min(ops.len() - 1);
        ops[lo..=hi].iter().any(|(c, _)| *c != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, line)) in ops.iter().enumerate() {
        if near_change(k) {
            if skipped {
                out.push_str("  ...\n");
                skipped = false;
            }
            out.push_str(&format!("{c} {line}\n"));
        } else {
            skipped = true;
        }
    }
    if skipped {
        out.push_str("  ...\n");
    }
    if old.ends_with('\n') != new.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_shows_changed_lines_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\n";
        let new = "a\nb\nc\nD\ne\nf\ng\nh\n";
        let diff = line_diff(old, new);
        assert_eq!(diff, "  ...\n  b\n  c\n- d\n+ D\n  e\n  f\n  ...\n");
        assert_eq!(line_diff("x\n", "x\ny\n"), "  x\n+ y\n");
    }

    #[test]
    fn uuids_and_timestamps_are_normalised_and_nothing_else() {
        assert_eq!(
            uuids_and_timestamps("at 2026-12-04T21:07:37Z and 2026-12-04 21:07:37.5-05:30 done"),
            "at <timestamp> and <timestamp> done"
        );
        assert_eq!(
            uuids_and_timestamps("2026-12-04 only a date"),
            "2026-12-04 only a date"
        );
        assert_eq!(
            uuids_and_timestamps("3F2504E0-4F89-11D3-9A0C-0305E82C3301"),
            "<uuid>"
        );
        // Too long to be a UUID.
        assert_eq!(
            uuids_and_timestamps("3f2504e0-4f89-11d3-9a0c-0305e82c33011"),
            "3f2504e0-4f89-11d3-9a0c-0305e82c33011"
        );
        assert_eq!(uuids_and_timestamps("héllo ünïcode"), "héllo ünïcode");
    }
}
