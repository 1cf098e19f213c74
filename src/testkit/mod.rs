//! Throw-away local PostgreSQL clusters for integration tests (feature `testkit`).
//!
//! [`LocalCluster`] starts a real primary and any number of streaming
//! replicas from the machine's PostgreSQL server binaries, in a fresh
//! temporary directory, on free 127.0.0.1 ports, and removes all of it when
//! dropped, also when a test panics. It is what pgxkit's own tests and the
//! quickstart stand on, and it is yours for your integration tests.
//!
//! ```no_run
//! use pgxkit::testkit::LocalCluster;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = LocalCluster::start(2)?; // a primary and two replicas
//! let mut primary = cluster.primary().client()?;
//! primary.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")?;
//! cluster.wait_for_replicas_caught_up(std::time::Duration::from_secs(10))?;
//! let mut replica = cluster.replicas()[0].client()?;
//! let n: i64 = replica.query_one("SELECT count(*) FROM t", &[])?.get(0);
//! assert_eq!(n, 1);
//! # Ok(()) }
//! ```
//!
//! Binaries are found through `pg_config --bindir`, then the newest
//! `/usr/lib/postgresql/*/bin`, unless [`LocalClusterBuilder::bin_dir`] names
//! them. When the process runs as root the servers run as the `postgres` OS
//! user, since PostgreSQL refuses to run as root. Authentication is `trust`
//! for user `postgres` on loopback only.
//!
//! If the test process is killed with SIGKILL no destructor runs and its
//! servers are left behind (their data directories hold `pgxkit-` in the path).

mod certs;
mod error;
mod node;
mod orphans;
mod patroni;
mod pgbouncer;
mod process;
mod proxy;
mod snapshots;

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use certs::TlsFiles;
pub use error::Error;
pub use node::LocalNode;
pub use patroni::{PatroniCluster, PatroniClusterBuilder, PatroniNode};
pub use pgbouncer::PgBouncer;
pub use proxy::{Fault, FaultProxy};
pub use snapshots::{Mismatch, Snapshots, Transcript, UPDATE_VAR, uuids_and_timestamps};

use process::Runner;

/// Settings written to every node's `postgresql.conf`: loopback only, and
/// durability traded for speed (the data is thrown away). The Unix socket
/// lives in the cluster's own directory and serves only the kit's own
/// administrative connections.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "'32MB'"),
    ("max_connections", "200"),
    ("wal_keep_size", "'512MB'"),
    ("wal_retrieve_retry_interval", "'200ms'"),
    ("wal_receiver_status_interval", "'1s'"),
    ("hot_standby", "on"),
];

/// A primary and its streaming replicas, running until dropped.
///
/// Dropping it stops every server (immediate shutdown) and removes the
/// temporary directory that held their data and logs.
///
/// ```no_run
/// # fn main() -> Result<(), pgxkit::testkit::Error> {
/// let cluster = pgxkit::testkit::LocalCluster::builder().replicas(2).start()?;
/// println!("primary at {}", cluster.primary_dsn());
/// for dsn in cluster.replica_dsns() {
///     println!("replica at {dsn}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    /// With [`LocalClusterBuilder::fault_proxies`], one per node, in order.
    proxies: Vec<FaultProxy>,
    // Nodes drop (and stop) before the directory holding their data goes.
    nodes: Vec<LocalNode>,
    dir: tempfile::TempDir,
    timeout: Duration,
    tls: Option<TlsFiles>,
    password: Option<String>,
    runner: Arc<Runner>,
}

impl LocalCluster {
    /// A builder, to choose the number of replicas and other settings.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().replicas(1).start().unwrap();
    /// ```
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder::default()
    }

    /// Starts a primary and `replicas` streaming replicas with the default
    /// settings; the same as `LocalCluster::builder().replicas(n).start()`.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::start(2).unwrap(); // primary + 2 replicas
    /// ```
    pub fn start(replicas: usize) -> Result<Self, Error> {
        Self::builder().replicas(replicas).start()
    }

    /// The primary (node 0).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let mut client = local.primary().client().unwrap();
    /// client.batch_execute("CREATE TABLE t (id int)").unwrap();
    /// ```
    pub fn primary(&self) -> &LocalNode {
        &self.nodes[0]
    }

    /// The replicas, in order (`replica1` first).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// for replica in local.replicas() {
    ///     println!("{} on port {}", replica.name(), replica.port());
    /// }
    /// ```
    pub fn replicas(&self) -> &[LocalNode] {
        &self.nodes[1..]
    }

    /// Node `i`: 0 is the primary, 1.. the replicas; `None` past the end.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert_eq!(local.node(0).unwrap().name(), "primary");
    /// assert!(local.node(2).is_none());
    /// ```
    pub fn node(&self, i: usize) -> Option<&LocalNode> {
        self.nodes.get(i)
    }

    /// All nodes, the primary first.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert_eq!(local.nodes().len(), 2);
    /// ```
    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// The primary's connection string (through its fault proxy, with
    /// [`LocalClusterBuilder::fault_proxies`]).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let cluster = pgxkit::Cluster::connect(&local.primary_dsn()).unwrap();
    /// ```
    pub fn primary_dsn(&self) -> String {
        self.dsn_of(0)
    }

    /// The replicas' connection strings, in order (through their fault
    /// proxies, with [`LocalClusterBuilder::fault_proxies`]).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let cluster = local
    ///     .replica_dsns()
    ///     .into_iter()
    ///     .fold(pgxkit::Cluster::builder().primary(local.primary_dsn()), |b, dsn| b.replica(dsn))
    ///     .build()
    ///     .unwrap();
    /// ```
    pub fn replica_dsns(&self) -> Vec<String> {
        (1..self.nodes.len()).map(|i| self.dsn_of(i)).collect()
    }

    fn dsn_of(&self, i: usize) -> String {
        match self.proxies.get(i) {
            Some(proxy) => proxy.dsn().to_owned(),
            None => self.nodes[i].dsn(),
        }
    }

    /// Node `i`'s fault proxy (0 is the primary's), when started with
    /// [`LocalClusterBuilder::fault_proxies`]; `None` otherwise.
    ///
    /// ```no_run
    /// use pgxkit::testkit::{Fault, LocalCluster};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let local = LocalCluster::builder().replicas(1).fault_proxies(true).start()?;
    /// let cluster = pgxkit::Cluster::builder()
    ///     .primary(local.primary_dsn())
    ///     .replica(local.replica_dsns()[0].clone())
    ///     .build()?;
    /// local.proxy(1).unwrap().set(Fault::Silent); // the replica hangs
    /// # Ok(()) }
    /// ```
    pub fn proxy(&self, i: usize) -> Option<&FaultProxy> {
        self.proxies.get(i)
    }

    /// The certificate files, when started with [`LocalClusterBuilder::tls`].
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().tls(true).start().unwrap();
    /// let files = local.tls().unwrap();
    /// println!("CA certificate: {}", files.ca_cert.display());
    /// ```
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The generated password of user `postgres`, when started with
    /// [`LocalClusterBuilder::password_auth`] (the DSNs carry it).
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().password_auth(true).start().unwrap();
    /// assert!(local.password().is_some());
    /// ```
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Starts a PgBouncer in front of the primary, in `pool_mode`
    /// (`session`, `transaction` or `statement`), trust authentication,
    /// 4 server connections per database, on a free 127.0.0.1 port.
    /// Needs the `pgbouncer` binary (Debian/Ubuntu package `pgbouncer`).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// let bouncer = local.pgbouncer("transaction").unwrap();
    /// let cluster = pgxkit::Cluster::connect(&bouncer.dsn()).unwrap();
    /// ```
    pub fn pgbouncer(&self, pool_mode: &str) -> Result<PgBouncer, Error> {
        PgBouncer::start(
            &self.runner,
            self.dir.path(),
            self.primary().port(),
            pool_mode,
            self.timeout,
        )
    }

    /// The temporary directory that holds every node's data and log.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// assert!(local.dir().join("primary").exists());
    /// ```
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until every running replica has replayed all WAL the primary
    /// had written when this call began. Bounded by `timeout`; the error
    /// names the replica that did not catch up.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let local = pgxkit::testkit::LocalCluster::start(1).unwrap();
    /// local.primary().client().unwrap().batch_execute("CREATE TABLE t (id int)").unwrap();
    /// local.wait_for_replicas_caught_up(Duration::from_secs(10)).unwrap();
    /// // now every replica has the table
    /// ```
    pub fn wait_for_replicas_caught_up(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let primary = self.primary();
        let lsn = primary.wal_position(&mut primary.client()?)?;
        for replica in self.replicas().iter().filter(|r| r.is_running()) {
            replica.wait_replayed(&lsn, deadline)?;
        }
        Ok(())
    }

    fn add_node(
        &mut self,
        name: String,
        reservation: TcpListener,
        runner: &Arc<Runner>,
    ) -> Result<(), Error> {
        let data_dir = self.dir.path().join(&name);
        let log_path = self.dir.path().join(format!("{name}.log"));
        self.nodes.push(LocalNode::new(
            name,
            reservation,
            data_dir,
            log_path,
            self.dir.path().to_path_buf(),
            self.password.clone(),
            Arc::clone(runner),
            self.timeout,
        )?);
        Ok(())
    }
}

/// Settings for a [`LocalCluster`]; `start()` creates and starts it.
///
/// ```no_run
/// use std::time::Duration;
/// use pgxkit::testkit::LocalCluster;
///
/// # fn main() -> Result<(), pgxkit::testkit::Error> {
/// let cluster = LocalCluster::builder()
///     .replicas(1)
///     .timeout(Duration::from_secs(30))
///     .setting("log_min_duration_statement", "0")
///     .start()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct LocalClusterBuilder {
    replicas: usize,
    bin_dir: Option<PathBuf>,
    temp_root: Option<PathBuf>,
    port: Option<u16>,
    timeout: Duration,
    settings: Vec<(String, String)>,
    tls: bool,
    password_auth: bool,
    client_cert_auth: bool,
    fault_proxies: bool,
}

impl Default for LocalClusterBuilder {
    fn default() -> Self {
        LocalClusterBuilder {
            replicas: 0,
            bin_dir: None,
            temp_root: None,
            port: None,
            timeout: Duration::from_secs(60),
            settings: Vec::new(),
            tls: false,
            password_auth: false,
            client_cert_auth: false,
            fault_proxies: false,
        }
    }
}

impl LocalClusterBuilder {
    /// Puts a [`FaultProxy`] in front of every node: [`LocalCluster::primary_dsn`]
    /// and [`LocalCluster::replica_dsns`] then go through them, and
    /// [`LocalCluster::proxy`] switches each. Replication and
    /// [`LocalNode::client`] do not go through them. Defaults to off.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), pgxkit::testkit::Error> {
    /// let local = pgxkit::testkit::LocalCluster::builder()
    ///     .replicas(2)
    ///     .fault_proxies(true)
    ///     .start()?;
    /// assert!(local.proxy(2).is_some());
    /// # Ok(()) }
    /// ```
    pub fn fault_proxies(mut self, yes: bool) -> Self {
        self.fault_proxies = yes;
        self
    }

    /// How many streaming replicas to start beside the primary. Defaults to 0.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().replicas(2).start().unwrap();
    /// ```
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// The directory holding `initdb`, `postgres` and `pg_basebackup`.
    /// Defaults to `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder()
    ///     .bin_dir("/usr/lib/postgresql/15/bin")
    ///     .start()
    ///     .unwrap();
    /// ```
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Where the cluster's temporary directory is created. Defaults to
    /// [`std::env::temp_dir()`]. The server's OS user must be able to enter it.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder()
    ///     .temp_root("/var/tmp")
    ///     .start()
    ///     .unwrap();
    /// ```
    pub fn temp_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_root = Some(dir.into());
        self
    }

    /// The primary's port. Defaults to a free port chosen at start; the
    /// replicas always get free ports.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().port(25432).start().unwrap();
    /// assert_eq!(local.primary().port(), 25432);
    /// ```
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The bound on every wait: each command, each start, each stop, the
    /// replicas' first streaming. Defaults to 60 seconds.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let local = pgxkit::testkit::LocalCluster::builder()
    ///     .timeout(Duration::from_secs(120))
    ///     .start()
    ///     .unwrap();
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A server setting for every node, written to `postgresql.conf`
    /// (`value` as it would appear there: quote strings, e.g. `"'on'"`).
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder()
    ///     .setting("log_min_duration_statement", "0")
    ///     .start()
    ///     .unwrap();
    /// ```
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Serve TLS (`ssl = on`) with certificates made for this run: a CA, a
    /// server certificate for `localhost`, a client certificate for user
    /// `postgres`, and an unrelated CA (see [`TlsFiles`]). Plaintext
    /// connections stay allowed unless [`client_cert_auth`](Self::client_cert_auth).
    /// Needs the `openssl` command. Defaults to `false`.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().tls(true).start().unwrap();
    /// assert!(local.tls().is_some());
    /// ```
    pub fn tls(mut self, yes: bool) -> Self {
        self.tls = yes;
        self
    }

    /// Require SCRAM-SHA-256 password authentication on TCP, with a password
    /// generated for this run ([`LocalCluster::password`]; the DSNs carry it).
    /// Defaults to `false` (trust).
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().password_auth(true).start().unwrap();
    /// // The DSNs carry the generated password.
    /// let cluster = pgxkit::Cluster::connect(&local.primary_dsn()).unwrap();
    /// ```
    pub fn password_auth(mut self, yes: bool) -> Self {
        self.password_auth = yes;
        self
    }

    /// Require TLS with a client certificate (`hostssl ... cert`) on TCP;
    /// implies [`tls`](Self::tls). Defaults to `false`.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().client_cert_auth(true).start().unwrap();
    /// let files = local.tls().unwrap();
    /// println!("client key: {}", files.client_key.display());
    /// ```
    pub fn client_cert_auth(mut self, yes: bool) -> Self {
        self.client_cert_auth = yes;
        self
    }

    /// Creates the cluster and waits until every node accepts connections and
    /// every replica streams from the primary.
    ///
    /// Blocks for the whole start-up (a few seconds); each step is bounded by
    /// [`timeout`](Self::timeout). On any error everything started so far is
    /// stopped and removed.
    ///
    /// ```no_run
    /// let local = pgxkit::testkit::LocalCluster::builder().replicas(2).start().unwrap();
    /// assert_eq!(local.replicas().len(), 2);
    /// ```
    pub fn start(self) -> Result<LocalCluster, Error> {
        let bin_dir = match &self.bin_dir {
            Some(dir) => {
                process::check_bin_dir(dir)?;
                dir.clone()
            }
            None => process::find_bin_dir()?,
        };
        let root = self.temp_root.clone().unwrap_or_else(std::env::temp_dir);
        orphans::reap(&root);
        let dir = tempfile::Builder::new()
            .prefix("pgxkit-")
            .tempdir_in(&root)
            .map_err(|e| {
                Error::new(
                    "create directory",
                    format!(
                        "cannot create a temporary directory in {}: {e}",
                        root.display()
                    ),
                )
            })?;
        orphans::claim(dir.path()).map_err(|e| {
            Error::new(
                "create directory",
                format!(
                    "cannot write the owner file in {}: {e}",
                    dir.path().display()
                ),
            )
        })?;
        let runner = Arc::new(Runner::new(bin_dir, dir.path().to_path_buf())?);
        runner.hand_over(dir.path())?;
        let mut ports = self.ports()?.into_iter();
        let tls = if self.tls || self.client_cert_auth {
            let files = certs::generate(&dir.path().join("tls"))?;
            for file in [&files.server_cert, &files.server_key, &files.ca_cert] {
                runner.hand_over(file)?;
            }
            Some(files)
        } else {
            None
        };
        let password = self.password_auth.then(|| {
            std::iter::repeat_with(fastrand::alphanumeric)
                .take(24)
                .collect::<String>()
        });
        let mut cluster = LocalCluster {
            proxies: Vec::new(),
            nodes: Vec::with_capacity(self.replicas + 1),
            dir,
            timeout: self.timeout,
            tls,
            password,
            runner: Arc::clone(&runner),
        };

        let first = ports
            .next()
            .ok_or_else(|| Error::new("choose ports", "no port"))?;
        cluster.add_node("primary".to_owned(), first, &runner)?;
        let primary = cluster.primary();
        let data_dir = primary.data_dir().to_string_lossy().into_owned();
        let mut initdb_args = vec![
            "-D".to_owned(),
            data_dir,
            "-U".to_owned(),
            "postgres".to_owned(),
            "--auth=trust".to_owned(),
            "-E".to_owned(),
            "UTF8".to_owned(),
            "--locale=C".to_owned(),
            "--no-sync".to_owned(),
            "--no-instructions".to_owned(),
        ];
        // The password goes in through a file, never through SQL text
        // (the driver logs statements at debug level).
        let pwfile = cluster.dir.path().join("pwfile");
        if let Some(password) = &cluster.password {
            fs::write(&pwfile, password).map_err(|e| {
                Error::new(
                    "set password",
                    format!("cannot write {}: {e}", pwfile.display()),
                )
            })?;
            runner.hand_over(&pwfile)?;
            initdb_args.push(format!("--pwfile={}", pwfile.display()));
        }
        let initdb_args: Vec<&str> = initdb_args.iter().map(String::as_str).collect();
        let initdb = runner
            .run(
                "initdb",
                "initdb",
                &initdb_args,
                primary.log_path(),
                self.timeout,
            )
            .map_err(|e| e.on_node("primary"));
        let _ = fs::remove_file(&pwfile);
        initdb?;
        self.write_settings(primary, &cluster.tls)?;
        self.write_hba(primary)?;
        primary.start()?;

        for (i, reservation) in ports.enumerate() {
            let i = i + 1;
            let primary_port = cluster.primary().port().to_string();
            cluster.add_node(format!("replica{i}"), reservation, &runner)?;
            let replica = &cluster.nodes[i];
            let data_dir = replica.data_dir().to_string_lossy().into_owned();
            runner
                .run(
                    "pg_basebackup",
                    "pg_basebackup",
                    &[
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &primary_port,
                        "-U",
                        "postgres",
                        "-D",
                        &data_dir,
                        "-R",
                        "-X",
                        "stream",
                        "--checkpoint=fast",
                        "--no-sync",
                    ],
                    replica.log_path(),
                    self.timeout,
                )
                .map_err(|e| e.on_node(replica.name()))?;
            replica.start()?;
        }
        for replica in cluster.replicas() {
            replica.wait_streaming()?;
        }
        if self.fault_proxies {
            cluster.proxies = cluster
                .nodes
                .iter()
                .map(LocalNode::fault_proxy)
                .collect::<Result<_, _>>()?;
        }
        Ok(cluster)
    }

    /// Access rules: the kit's own Unix socket and replication are trusted;
    /// TCP clients trust, SCRAM, or TLS with a client certificate.
    fn write_hba(&self, node: &LocalNode) -> Result<(), Error> {
        let path = node.data_dir().join("pg_hba.conf");
        let clients = if self.client_cert_auth {
            "hostssl all all 127.0.0.1/32 cert"
        } else if self.password_auth {
            "host all all 127.0.0.1/32 scram-sha-256"
        } else {
            "host all all 127.0.0.1/32 trust"
        };
        let text = format!(
            "# pgxkit testkit\nlocal all all trust\nhost replication all 127.0.0.1/32 trust\n{clients}\n"
        );
        fs::write(&path, text)
            .map_err(|e| node.error("configure", format!("cannot write {}: {e}", path.display())))
    }

    /// One free loopback port per node, each held by a listener until its
    /// server starts; the primary's may be given.
    fn ports(&self) -> Result<Vec<TcpListener>, Error> {
        // Each listener is held until its server starts, so no two nodes (and
        // no other process's kit, which cannot bind it meanwhile) share one.
        let mut listeners = Vec::with_capacity(self.replicas + 1);
        if let Some(port) = self.port {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
                Error::new(
                    "choose ports",
                    format!("port {port} on 127.0.0.1 is not available: {e}"),
                )
                .on_node("primary")
            })?;
            listeners.push(listener);
        }
        while listeners.len() < self.replicas + 1 {
            listeners.push(free_port("choose ports")?);
        }
        Ok(listeners)
    }

    fn write_settings(&self, node: &LocalNode, tls: &Option<TlsFiles>) -> Result<(), Error> {
        let path = node.data_dir().join("postgresql.conf");
        let quoted = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "''"));
        let mut text = String::from("\n# pgxkit testkit\n");
        text.push_str(&format!(
            "unix_socket_directories = {}\n",
            quoted(node.socket_dir())
        ));
        if let Some(files) = tls {
            text.push_str("ssl = on\n");
            text.push_str(&format!("ssl_cert_file = {}\n", quoted(&files.server_cert)));
            text.push_str(&format!("ssl_key_file = {}\n", quoted(&files.server_key)));
            text.push_str(&format!("ssl_ca_file = {}\n", quoted(&files.ca_cert)));
        }
        for (name, value) in BASE_SETTINGS
            .iter()
            .map(|(n, v)| (*n, *v))
            .chain(self.settings.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        {
            text.push_str(&format!("{name} = {value}\n"));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| node.error("configure", format!("cannot write {}: {e}", path.display())))
    }
}

/// Ports below this are left to well-known services.
const LOWEST_PORT: u16 = 20_000;

/// A listener on a free loopback port below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), held by the caller until the port is
/// handed to a server. A port from `bind(0)` lies inside that range, so in
/// the second or so before the server binds it (initdb runs meanwhile) any
/// outgoing connection on the machine may take it as its local port, and
/// the server then fails with "Address already in use". Falls back to
/// `bind(0)` when the range leaves no room below it.
///
/// A port is handed out once per process: between the listener's drop and
/// the server's bind the port is free, and another test's kit running in
/// parallel would otherwise be able to pick it too.
pub(crate) fn free_port(step: &'static str) -> Result<TcpListener, Error> {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_low = ephemeral_range_start().unwrap_or(32_768);
    if ephemeral_low > LOWEST_PORT + 1_000 {
        // Random, so parallel test processes rarely try the same port; a
        // port in use (another kit's server) fails to bind and is skipped.
        for _ in 0..200 {
            let port = fastrand::u16(LOWEST_PORT..ephemeral_low);
            let mut handed_out = crate::sync::lock(&HANDED_OUT);
            if handed_out.contains(&port) {
                continue;
            }
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                handed_out.push(port);
                return Ok(listener);
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::new(step, format!("no free port on 127.0.0.1: {e}")))
}

/// The first port of the kernel's ephemeral range, where Linux tells.
fn ephemeral_range_start() -> Option<u16> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_lie_below_the_ephemeral_range() {
        let low = ephemeral_range_start().expect("Linux exposes the ephemeral port range");
        if low <= LOWEST_PORT + 1_000 {
            return; // no room below the range here: bind(0) is the fallback
        }
        // Held together, so they must also be distinct.
        let held: Vec<TcpListener> = (0..20).map(|_| free_port("test").unwrap()).collect();
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(
            ports.iter().all(|p| (LOWEST_PORT..low).contains(p)),
            "{ports:?} not in {LOWEST_PORT}..{low}"
        );
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), held.len());
    }
}
