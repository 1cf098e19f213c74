use std::fmt;
use std::path::Path;

/// An error of the testkit: which node, which step, what went wrong and,
/// where a server log exists, its last lines.
///
/// ```
/// use pgxkit::testkit::LocalCluster;
///
/// let err = LocalCluster::builder()
///     .bin_dir("/nonexistent/bin")
///     .start()
///     .unwrap_err();
/// assert_eq!(err.step(), "find binaries");
/// assert!(err.to_string().contains("/nonexistent/bin"));
/// ```
#[derive(Debug)]
pub struct Error {
    node: Option<String>,
    step: &'static str,
    message: String,
    log_tail: Option<String>,
}

impl Error {
    pub(crate) fn new(step: &'static str, message: impl Into<String>) -> Self {
        Error {
            node: None,
            step,
            message: message.into(),
            log_tail: None,
        }
    }

    pub(crate) fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Attaches the last lines of the log at `path` (if it can be read).
    pub(crate) fn with_log(mut self, path: &Path) -> Self {
        self.log_tail = log_tail(path, 30);
        self
    }

    /// The node the error is about (`primary`, `replica1`, ...), if any.
    ///
    /// ```no_run
    /// match pgxkit::testkit::LocalCluster::builder().bin_dir("/nowhere").start() {
    ///     Err(e) => println!("node {:?}, step {}", e.node(), e.step()),
    ///     Ok(_) => {}
    /// }
    /// ```
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The step that failed, such as `find binaries`, `initdb`, `start` or
    /// `wait for streaming`.
    ///
    /// ```no_run
    /// if let Err(e) = pgxkit::testkit::LocalCluster::start(0) {
    ///     eprintln!("failed at {}", e.step());
    /// }
    /// ```
    pub fn step(&self) -> &str {
        self.step
    }

    /// The last lines of the server's (or the failing command's) log, if any.
    ///
    /// ```no_run
    /// if let Err(e) = pgxkit::testkit::LocalCluster::start(0) {
    ///     if let Some(tail) = e.log_tail() {
    ///         eprintln!("the server said:\n{tail}");
    ///     }
    /// }
    /// ```
    pub fn log_tail(&self) -> Option<&str> {
        self.log_tail.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(node) = &self.node {
            write!(f, "{node}: ")?;
        }
        write!(f, "{}: {}", self.step, self.message)?;
        if let Some(tail) = &self.log_tail {
            write!(f, "\n--- last lines of the log ---\n{tail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// The last `lines` lines of a text file, or `None` when it cannot be read or is empty.
pub(crate) fn log_tail(path: &Path, lines: usize) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let tail = all[start..].join("\n");
    if tail.trim().is_empty() {
        None
    } else {
        Some(tail)
    }
}
