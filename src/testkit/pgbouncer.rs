use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::error::Error;
use super::process::{self, POLL, Runner};

/// A PgBouncer in front of a [`LocalCluster`](super::LocalCluster)'s primary,
/// for tests of pooling proxies (`LocalCluster::pgbouncer`). Stopped when dropped.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use pgxkit::{Cluster, StatementMode};
/// let local = pgxkit::testkit::LocalCluster::start(0)?;
/// let bouncer = local.pgbouncer("transaction")?;
/// let cluster = Cluster::builder()
///     .primary(bouncer.dsn())
///     .statement_mode(StatementMode::Unnamed)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgBouncer {
    port: u16,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    timeout: Duration,
}

fn find_binary() -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::new(
                "start pgbouncer",
                "no pgbouncer binary found; install it (Debian/Ubuntu: `apt-get install pgbouncer`)",
            )
        })
}

impl PgBouncer {
    pub(crate) fn start(
        runner: &Runner,
        dir: &Path,
        backend_port: u16,
        pool_mode: &str,
        timeout: Duration,
    ) -> Result<PgBouncer, Error> {
        if !matches!(pool_mode, "session" | "transaction" | "statement") {
            return Err(Error::new(
                "start pgbouncer",
                format!("pool_mode `{pool_mode}`: expected session, transaction or statement"),
            ));
        }
        let binary = find_binary()?;
        let port = super::free_port("start pgbouncer")?
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| Error::new("start pgbouncer", e.to_string()))?;
        let dir = dir.join(format!("pgbouncer-{port}"));
        let write = |name: &str, text: String| -> Result<PathBuf, Error> {
            let path = dir.join(name);
            fs::write(&path, text).map_err(|e| {
                Error::new(
                    "start pgbouncer",
                    format!("cannot write {}: {e}", path.display()),
                )
            })?;
            Ok(path)
        };
        fs::create_dir_all(&dir).map_err(|e| {
            Error::new(
                "start pgbouncer",
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        runner.hand_over(&dir)?;
        let log_path = dir.join("pgbouncer.log");
        let users = write("userlist.txt", "\"postgres\" \"\"\n".to_owned())?;
        let ini = write(
            "pgbouncer.ini",
            format!(
                "[databases]\n* = host=127.0.0.1 port={backend_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = {pool_mode}\n\
                 default_pool_size = 4\nmax_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {}\npidfile = {}\n",
                users.display(),
                log_path.display(),
                dir.join("pgbouncer.pid").display()
            ),
        )?;
        let child = runner
            .command_path(&binary, &dir.join("stderr.log"))?
            .arg(&ini)
            .spawn()
            .map_err(|e| {
                Error::new(
                    "start pgbouncer",
                    format!("cannot run {}: {e}", binary.display()),
                )
            })?;
        let bouncer = PgBouncer {
            port,
            log_path,
            child: Mutex::new(Some(child)),
            timeout,
        };
        bouncer.wait_ready()?;
        Ok(bouncer)
    }

    fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let attempt = postgres::Config::new()
                .host("127.0.0.1")
                .port(self.port)
                .user("postgres")
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(1))
                .connect(postgres::NoTls)
                .and_then(|mut c| c.simple_query("SELECT 1").map(|_| ()));
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::new(
                        "start pgbouncer",
                        format!("not ready after {:?}: {e}", self.timeout),
                    )
                    .with_log(&self.log_path));
                }
                Err(_) => {}
            }
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited {
                return Err(
                    Error::new("start pgbouncer", "pgbouncer exited while starting")
                        .with_log(&self.log_path),
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The port PgBouncer listens on (127.0.0.1).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let bouncer = local.pgbouncer("session").unwrap();
    /// println!("pgbouncer on 127.0.0.1:{}", bouncer.port());
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A DSN through PgBouncer to the primary's `postgres` database.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let bouncer = local.pgbouncer("transaction").unwrap();
    /// let cluster = pgxkit::Cluster::connect(&bouncer.dsn()).unwrap();
    /// ```
    pub fn dsn(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// PgBouncer's log file.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let bouncer = local.pgbouncer("session").unwrap();
    /// let log = std::fs::read_to_string(bouncer.log_path()).unwrap();
    /// ```
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut child) = child {
            process::send_signal(child.id(), Signal::SIGINT);
            if process::wait_exit(&mut child, Instant::now() + self.timeout).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
