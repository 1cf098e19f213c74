use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::error::Error;
use super::process::{self, POLL, Runner};

/// One server of a [`LocalCluster`](super::LocalCluster): the primary
/// (node 0) or a streaming replica.
///
/// Every method that waits is bounded by the cluster's timeout
/// ([`LocalClusterBuilder::timeout`](super::LocalClusterBuilder::timeout),
/// 60 s by default) and returns an [`Error`] naming the node, the step and the
/// tail of the server log when it runs out.
///
/// ```no_run
/// # fn main() -> Result<(), pgxkit::testkit::Error> {
/// let cluster = pgxkit::testkit::LocalCluster::start(1)?;
/// let replica = &cluster.replicas()[0];
/// replica.kill()?;            // SIGKILL, as a crash
/// replica.start()?;           // back, and streaming again
/// replica.pause_replay()?;    // now it falls behind the primary
/// replica.resume_replay()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalNode {
    name: String,
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    socket_dir: PathBuf,
    password: Option<String>,
    runner: Arc<Runner>,
    timeout: Duration,
    postmaster: Mutex<Option<Child>>,
    /// Set by [`freeze`](LocalNode::freeze) until [`thaw`](LocalNode::thaw).
    frozen: AtomicBool,
    /// A listener holding the port from when it was chosen until the server
    /// first starts, so no other process's kit can choose it meanwhile
    /// (initdb and pg_basebackup take seconds).
    reservation: Mutex<Option<std::net::TcpListener>>,
}

impl LocalNode {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        reservation: std::net::TcpListener,
        data_dir: PathBuf,
        log_path: PathBuf,
        socket_dir: PathBuf,
        password: Option<String>,
        runner: Arc<Runner>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let port = reservation
            .local_addr()
            .map_err(|e| Error::new("choose ports", e.to_string()).on_node(&name))?
            .port();
        Ok(LocalNode {
            name,
            port,
            data_dir,
            log_path,
            socket_dir,
            password,
            runner,
            timeout,
            postmaster: Mutex::new(None),
            frozen: AtomicBool::new(false),
            reservation: Mutex::new(Some(reservation)),
        })
    }

    /// The node's name: `primary`, `replica1`, `replica2`, ...
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert_eq!(local.replicas()[0].name(), "replica1");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loopback TCP port the server listens on.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// println!("primary on 127.0.0.1:{}", local.primary().port());
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for this server over TCP on 127.0.0.1: user
    /// `postgres` (with the generated password under `password_auth`),
    /// database `postgres`. Add `?sslmode=...` for TLS.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let dsn = local.primary().dsn();
    /// assert!(dsn.starts_with("postgres://"));
    /// ```
    pub fn dsn(&self) -> String {
        match &self.password {
            Some(pw) => format!("postgres://postgres:{pw}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
        }
    }

    /// Starts a [`FaultProxy`](super::FaultProxy) in front of this node: its
    /// [`dsn`](super::FaultProxy::dsn) reaches the node through the proxy,
    /// whose [`Fault`](super::Fault) the test switches at run time.
    /// Replication between nodes does not go through it.
    ///
    /// ```no_run
    /// use pgxkit::testkit::{Fault, LocalCluster};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let local = LocalCluster::start(0)?;
    /// let proxy = local.primary().fault_proxy()?;
    /// let cluster = pgxkit::Cluster::connect(proxy.dsn())?;
    /// proxy.set(Fault::Silent);
    /// # Ok(()) }
    /// ```
    pub fn fault_proxy(&self) -> Result<super::FaultProxy, Error> {
        let target = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port));
        super::FaultProxy::start(target, &self.dsn()).map_err(|e| e.on_node(&self.name))
    }

    /// The directory of the server's Unix socket (the kit's own admin access).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert!(local.primary().socket_dir().exists());
    /// ```
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's data directory.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert!(local.primary().data_dir().join("PG_VERSION").exists());
    /// ```
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (its stderr).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let log = std::fs::read_to_string(local.primary().log_path()).unwrap();
    /// ```
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The postmaster's process id while the server runs.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert!(local.primary().pid().is_some());
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// Whether the postmaster is running.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let replica = &local.replicas()[0];
    /// replica.kill().unwrap();
    /// assert!(!replica.is_running());
    /// ```
    pub fn is_running(&self) -> bool {
        let mut guard = self.lock();
        match guard.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *guard = None;
                false
            }
            None => false,
        }
    }

    /// A new `postgres::Client` to this server as `postgres`, over its Unix
    /// socket (trusted whatever the TCP authentication), connect timeout 5 s.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let mut client = local.primary().client().unwrap();
    /// let one: i32 = client.query_one("SELECT 1", &[]).unwrap().get(0);
    /// ```
    pub fn client(&self) -> Result<postgres::Client, Error> {
        self.connect(Duration::from_secs(5))
            .map_err(|e| self.error("connect", format!("cannot connect: {e}")))
    }

    fn connect(&self, timeout: Duration) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(timeout)
            .connect(postgres::NoTls)
    }

    /// Starts the server and waits until it accepts connections. Starting a
    /// running server is a no-op.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let replica = &local.replicas()[0];
    /// replica.kill().unwrap();
    /// replica.start().unwrap(); // crash recovery, then it streams again
    /// ```
    pub fn start(&self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        let port = self.port.to_string();
        let data_dir = self.data_dir.to_string_lossy();
        let cluster_name = format!("cluster_name=pgxkit-{}", self.name);
        // The port is free from here until the server binds it.
        drop(
            self.reservation
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let child = self
            .runner
            .command("postgres", &self.log_path)
            .map_err(|e| e.on_node(&self.name))?
            .args(["-D", &data_dir, "-p", &port, "-c", &cluster_name])
            .spawn()
            .map_err(|e| self.error("start", format!("cannot run postgres: {e}")))?;
        *self.lock() = Some(child);
        self.wait_ready()
    }

    /// Waits until the server accepts connections, failing early when it exits.
    fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if !self.is_running() {
                return Err(self.error("start", "the server exited while starting"));
            }
            let last = match self.connect(Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(self.error(
                    "start",
                    format!(
                        "not accepting connections on port {} after {:?}: {last}",
                        self.port, self.timeout
                    ),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the server with a fast shutdown (SIGINT: sessions are ended,
    /// a checkout-consistent state is written) and waits for it to exit.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// local.replicas()[0].stop().unwrap();
    /// ```
    pub fn stop(&self) -> Result<(), Error> {
        self.shut_down(Signal::SIGINT, "stop")
    }

    /// Stops and starts the server again.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// local.primary().restart().unwrap();
    /// ```
    pub fn restart(&self) -> Result<(), Error> {
        self.stop()?;
        self.start()
    }

    /// Freezes the server as a stopped VM or a hung host looks to its
    /// clients: SIGSTOP to the postmaster, then to every one of its
    /// processes. Connections stay open and the kernel still acknowledges
    /// what clients send, but nothing answers, and a cancel request is not
    /// answered either. [`thaw`](Self::thaw) resumes every process; stopping,
    /// killing or dropping the node thaws it first.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// local.primary().freeze().unwrap();
    /// local.primary().thaw().unwrap();
    /// ```
    pub fn freeze(&self) -> Result<(), Error> {
        let Some(pid) = self.pid() else {
            return Err(self.error("freeze", "the server is not running"));
        };
        self.frozen.store(true, SeqCst);
        // The postmaster first, so it forks no process after the list.
        process::send_signal(pid, Signal::SIGSTOP);
        for child in process::children_of(pid) {
            process::send_signal(child, Signal::SIGSTOP);
        }
        Ok(())
    }

    /// Resumes a server [`freeze`](Self::freeze) stopped (SIGCONT to each of
    /// its processes); a no-op when it is not frozen.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// local.primary().thaw().unwrap();
    /// ```
    pub fn thaw(&self) -> Result<(), Error> {
        if !self.frozen.swap(false, SeqCst) {
            return Ok(());
        }
        if let Some(pid) = self.pid() {
            for child in process::children_of(pid) {
                process::send_signal(child, Signal::SIGCONT);
            }
            process::send_signal(pid, Signal::SIGCONT);
        }
        Ok(())
    }

    /// Whether the server is frozen ([`freeze`](Self::freeze)).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// assert!(!local.primary().is_frozen());
    /// ```
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(SeqCst)
    }

    /// Kills the server as a crash would: SIGKILL to the postmaster and to
    /// every one of its processes, then waits until all are gone. Unlike
    /// [`stop`](Self::stop) nothing is written; [`start`](Self::start)
    /// then runs crash recovery.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// local.replicas()[0].kill().unwrap(); // as a crash: SIGKILL to every process
    /// ```
    pub fn kill(&self) -> Result<(), Error> {
        self.thaw()?;
        let mut guard = self.lock();
        let Some(mut child) = guard.take() else {
            return Ok(());
        };
        drop(guard);
        let backends = process::children_of(child.id());
        let _ = child.kill();
        for pid in &backends {
            process::send_signal(*pid, Signal::SIGKILL);
        }
        let deadline = Instant::now() + self.timeout;
        let reaped = process::wait_exit(&mut child, deadline).is_some();
        if reaped && process::wait_gone(&backends, deadline) {
            Ok(())
        } else {
            Err(self.error("kill", "server processes still alive after SIGKILL"))
        }
    }

    /// Stops with `signal`; escalates to SIGKILL if the deadline passes.
    pub(crate) fn shut_down(&self, signal: Signal, step: &'static str) -> Result<(), Error> {
        self.thaw()?;
        let Some(mut child) = self.lock().take() else {
            return Ok(());
        };
        process::send_signal(child.id(), signal);
        if process::wait_exit(&mut child, Instant::now() + self.timeout).is_some() {
            return Ok(());
        }
        let backends = process::children_of(child.id());
        let _ = child.kill();
        for pid in &backends {
            process::send_signal(*pid, Signal::SIGKILL);
        }
        let _ = process::wait_exit(&mut child, Instant::now() + self.timeout);
        Err(self.error(
            step,
            format!(
                "the server did not exit within {:?}; it was killed",
                self.timeout
            ),
        ))
    }

    /// Pauses WAL replay on a replica (`pg_wal_replay_pause()`): it keeps
    /// receiving WAL but applies none, so it falls behind for real.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let replica = &local.replicas()[0];
    /// replica.pause_replay().unwrap(); // it falls behind for real
    /// replica.resume_replay().unwrap();
    /// ```
    pub fn pause_replay(&self) -> Result<(), Error> {
        self.execute("pause replay", "SELECT pg_wal_replay_pause()")
    }

    /// Resumes WAL replay on a replica (`pg_wal_replay_resume()`).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// local.replicas()[0].resume_replay().unwrap();
    /// ```
    pub fn resume_replay(&self) -> Result<(), Error> {
        self.execute("resume replay", "SELECT pg_wal_replay_resume()")
    }

    /// Promotes a replica to a writable primary and waits until it is one.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let replica = &local.replicas()[0];
    /// replica.promote().unwrap();
    /// replica.client().unwrap().batch_execute("CREATE TABLE now_writable (x int)").unwrap();
    /// ```
    pub fn promote(&self) -> Result<(), Error> {
        let seconds = i32::try_from(self.timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        let mut client = self.client()?;
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, $1)", &[&seconds])
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.error("promote", e.to_string()))?;
        if promoted {
            Ok(())
        } else {
            Err(self.error(
                "promote",
                format!("not promoted within {seconds} s (is it a replica?)"),
            ))
        }
    }

    /// The WAL position this node has replayed (replica) or written (primary).
    pub(crate) fn wal_position(&self, client: &mut postgres::Client) -> Result<String, Error> {
        client
            .query_one(
                "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                 ELSE pg_current_wal_lsn() END)::text",
                &[],
            )
            .and_then(|row| row.try_get::<_, Option<String>>(0))
            .map_err(|e| self.error("read WAL position", e.to_string()))?
            .ok_or_else(|| self.error("read WAL position", "no WAL position"))
    }

    /// Waits until this replica's WAL receiver streams from the primary.
    pub(crate) fn wait_streaming(&self) -> Result<(), Error> {
        self.wait_until("wait for streaming", |client| {
            let row = client.query_opt(
                "SELECT status FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                &[],
            )?;
            Ok(row.is_some())
        })
    }

    /// Waits until this replica has replayed WAL up to `lsn`.
    pub(crate) fn wait_replayed(&self, lsn: &str, deadline: Instant) -> Result<(), Error> {
        self.wait_until_deadline("wait for catch-up", deadline, |client| {
            let row = client.query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&lsn],
            )?;
            row.try_get(0)
        })
    }

    fn wait_until(
        &self,
        step: &'static str,
        check: impl FnMut(&mut postgres::Client) -> Result<bool, postgres::Error>,
    ) -> Result<(), Error> {
        self.wait_until_deadline(step, Instant::now() + self.timeout, check)
    }

    fn wait_until_deadline(
        &self,
        step: &'static str,
        deadline: Instant,
        mut check: impl FnMut(&mut postgres::Client) -> Result<bool, postgres::Error>,
    ) -> Result<(), Error> {
        let mut client = None;
        loop {
            let outcome = match client.as_mut() {
                Some(c) => check(c).map_err(|e| e.to_string()),
                None => self
                    .connect(Duration::from_secs(1))
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        let done = check(&mut c).map_err(|e| e.to_string());
                        client = Some(c);
                        done
                    }),
            };
            let why = match outcome {
                Ok(true) => return Ok(()),
                Ok(false) => "condition not met".to_owned(),
                Err(e) => {
                    client = None;
                    e
                }
            };
            if Instant::now() >= deadline {
                return Err(self.error(step, format!("gave up at the deadline: {why}")));
            }
            thread::sleep(POLL);
        }
    }

    fn execute(&self, step: &'static str, sql: &str) -> Result<(), Error> {
        self.client()?
            .batch_execute(sql)
            .map_err(|e| self.error(step, e.to_string()))
    }

    pub(crate) fn error(&self, step: &'static str, message: impl Into<String>) -> Error {
        Error::new(step, message)
            .on_node(&self.name)
            .with_log(&self.log_path)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.postmaster
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT): the cluster is thrown away anyway.
        let _ = self.shut_down(Signal::SIGQUIT, "stop");
    }
}
