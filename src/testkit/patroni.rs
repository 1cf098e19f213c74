//! A real HA manager for failover tests: etcd plus N Patroni nodes, each
//! running its own PostgreSQL, on free 127.0.0.1 ports, as the `postgres`
//! OS user when this process is root, removed when dropped.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::error::Error;
use super::process::{self, POLL, Runner};
use super::{free_port, orphans};

/// A Patroni cluster (etcd as its DCS), running until dropped.
///
/// Timings are short for tests (`ttl` 10 s, `loop_wait` 1 s,
/// `retry_timeout` 4 s: Patroni needs `loop_wait + 2 * retry_timeout <=
/// ttl`), so a killed leader is replaced about 10 s later. Every wait is
/// bounded by the builder's [`timeout`](PatroniClusterBuilder::timeout).
/// Needs the `patroni` and `etcd` binaries (Debian: `apt-get install
/// patroni etcd-server`).
///
/// ```no_run
/// use pgxkit::testkit::PatroniCluster;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ha = PatroniCluster::builder().nodes(3).start()?;
/// let cluster = pgxkit::Cluster::builder().nodes(ha.dsns()).build()?;
/// let leader = ha.leader().expect("a leader");
/// ha.node(leader).kill()?; // Patroni elects another within its ttl
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PatroniCluster {
    nodes: Vec<PatroniNode>,
    etcd: Mutex<Option<Child>>,
    timeout: Duration,
    // Last: dropped after everything that runs in it has stopped.
    dir: tempfile::TempDir,
}

/// One Patroni node: the Patroni process, and the PostgreSQL it runs.
#[derive(Debug)]
pub struct PatroniNode {
    name: String,
    pg_port: u16,
    api_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    timeout: Duration,
}

/// Options for [`PatroniCluster`].
///
/// ```no_run
/// let ha = pgxkit::testkit::PatroniCluster::builder()
///     .nodes(3)
///     .synchronous(true)
///     .start()
///     .unwrap();
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PatroniClusterBuilder {
    nodes: usize,
    synchronous: bool,
    timeout: Duration,
    bin_dir: Option<PathBuf>,
}

impl PatroniCluster {
    /// A builder: 3 nodes, asynchronous replication, 120 s timeout.
    ///
    /// ```no_run
    /// let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// ```
    pub fn builder() -> PatroniClusterBuilder {
        PatroniClusterBuilder {
            nodes: 3,
            synchronous: false,
            timeout: Duration::from_secs(120),
            bin_dir: None,
        }
    }

    /// The nodes, in order (`node1`, `node2`, ...).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// for node in ha.nodes() {
    ///     println!("{} on {}", node.name(), node.port());
    /// }
    /// ```
    pub fn nodes(&self) -> &[PatroniNode] {
        &self.nodes
    }

    /// Node `i`.
    ///
    /// # Panics
    /// When there is no node `i`.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// println!("{}", ha.node(0).dsn());
    /// ```
    pub fn node(&self, i: usize) -> &PatroniNode {
        &self.nodes[i]
    }

    /// Every node's DSN, for [`ClusterBuilder::nodes`](crate::ClusterBuilder::nodes).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// let cluster = pgxkit::Cluster::builder().nodes(ha.dsns()).build().unwrap();
    /// ```
    pub fn dsns(&self) -> Vec<String> {
        self.nodes.iter().map(PatroniNode::dsn).collect()
    }

    /// One libpq multi-host DSN naming every node
    /// (`postgres://postgres@127.0.0.1:P1,127.0.0.1:P2,.../postgres`).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// let cluster = pgxkit::Cluster::connect(&ha.multi_host_dsn()).unwrap();
    /// ```
    pub fn multi_host_dsn(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.pg_port))
            .collect();
        format!("postgres://postgres@{}/postgres", hosts.join(","))
    }

    /// The index of the node Patroni says is the running leader now
    /// (its REST API answers 200 to `GET /primary`), if any.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// assert!(ha.leader().is_some());
    /// ```
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.is_leader())
    }

    /// Waits until a node other than `not` is the running leader; its
    /// index, and when that was first seen (polled every 20 ms).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// let old = ha.leader().unwrap();
    /// ha.node(old).kill().unwrap();
    /// let (new, at) = ha.wait_for_leader(Some(old)).unwrap();
    /// ```
    pub fn wait_for_leader(&self, not: Option<usize>) -> Result<(usize, Instant), Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let leader = self
                .nodes
                .iter()
                .enumerate()
                .find(|&(i, n)| Some(i) != not && n.is_leader());
            if let Some((i, _)) = leader {
                return Ok((i, Instant::now()));
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    "wait for leader",
                    format!("no new leader within {:?}", self.timeout),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until every node other than the leader is a running replica
    /// (`GET /replica` answers 200).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// ha.wait_for_replicas().unwrap();
    /// ```
    pub fn wait_for_replicas(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let leader = self.leader();
            let ready = leader.is_some()
                && self
                    .nodes
                    .iter()
                    .enumerate()
                    .all(|(i, n)| Some(i) == leader || n.get("/replica") == Some(200));
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    "wait for replicas",
                    format!("not every replica running within {:?}", self.timeout),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// In synchronous mode: waits until a node is the synchronous standby
    /// (`GET /sync` answers 200); its index.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().synchronous(true).start().unwrap();
    /// let standby = ha.wait_for_sync_standby().unwrap();
    /// ```
    pub fn wait_for_sync_standby(&self) -> Result<usize, Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.nodes.iter().position(|n| n.get("/sync") == Some(200)) {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    "wait for sync standby",
                    format!("no synchronous standby within {:?}", self.timeout),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// A planned switchover from the current leader to node `candidate`
    /// (Patroni's `POST /switchover`); returns once Patroni accepted it.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// ha.switchover(1).unwrap();
    /// ```
    pub fn switchover(&self, candidate: usize) -> Result<(), Error> {
        let leader = self
            .leader()
            .ok_or_else(|| Error::new("switchover", "no leader"))?;
        let body = format!(
            "{{\"leader\": \"{}\", \"candidate\": \"{}\"}}",
            self.nodes[leader].name, self.nodes[candidate].name
        );
        let (status, text) = self.nodes[leader]
            .request("POST", "/switchover", &body, self.timeout)
            .map_err(|e| Error::new("switchover", e))?;
        if status == 200 {
            Ok(())
        } else {
            Err(Error::new(
                "switchover",
                format!("Patroni answered {status}: {text}"),
            ))
        }
    }

    /// The cluster's directory (configurations, data, logs).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// println!("{}", ha.dir().display());
    /// ```
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl PatroniClusterBuilder {
    /// How many nodes. Defaults to 3.
    ///
    /// ```no_run
    /// let ha = pgxkit::testkit::PatroniCluster::builder().nodes(2).start().unwrap();
    /// ```
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Patroni's `synchronous_mode`: a commit is acknowledged only once a
    /// synchronous standby has it, and only that standby may be promoted.
    /// Defaults to `false`.
    ///
    /// ```no_run
    /// let ha = pgxkit::testkit::PatroniCluster::builder().synchronous(true).start().unwrap();
    /// ```
    pub fn synchronous(mut self, yes: bool) -> Self {
        self.synchronous = yes;
        self
    }

    /// Bound on every wait (start-up, leader election, stop). Defaults to 120 s.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let ha = pgxkit::testkit::PatroniCluster::builder().timeout(Duration::from_secs(60)).start().unwrap();
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The PostgreSQL server binaries Patroni runs. Defaults to the ones
    /// [`LocalCluster`](super::LocalCluster) finds.
    ///
    /// ```no_run
    /// let ha = pgxkit::testkit::PatroniCluster::builder()
    ///     .bin_dir("/usr/lib/postgresql/15/bin")
    ///     .start()
    ///     .unwrap();
    /// ```
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Starts etcd, then every Patroni node, and waits until one is the
    /// leader and every other a running replica.
    ///
    /// ```no_run
    /// let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// ```
    pub fn start(self) -> Result<PatroniCluster, Error> {
        const STEP: &str = "start patroni";
        if self.nodes == 0 {
            return Err(Error::new(STEP, "nodes(0): a cluster needs a node"));
        }
        let patroni = find_binary("patroni", "patroni")?;
        let etcd = find_binary("etcd", "etcd-server")?;
        let bin_dir = match self.bin_dir {
            Some(dir) => {
                process::check_bin_dir(&dir)?;
                dir
            }
            None => process::find_bin_dir()?,
        };
        let root = std::env::temp_dir();
        orphans::reap(&root);
        let dir = tempfile::Builder::new()
            .prefix("pgxkit-patroni-")
            .tempdir_in(&root)
            .map_err(|e| Error::new(STEP, format!("cannot create a directory: {e}")))?;
        orphans::claim(dir.path())
            .map_err(|e| Error::new(STEP, format!("cannot write the owner file: {e}")))?;
        let runner = Runner::new(bin_dir.clone(), dir.path().to_path_buf())?;
        runner.hand_over(dir.path())?;
        let port = || -> Result<u16, Error> {
            // Released at once: etcd and Patroni bind their own; each
            // port is handed out once per process.
            free_port(STEP)?
                .local_addr()
                .map(|a| a.port())
                .map_err(|e| Error::new(STEP, e.to_string()))
        };

        let etcd_dir = dir.path().join("etcd");
        make_dir(&etcd_dir, &runner)?;
        let (client, peer) = (port()?, port()?);
        let etcd_child = runner
            .command_path(&etcd, &etcd_dir.join("etcd.log"))?
            .args([
                "--name",
                "e1",
                "--data-dir",
                &etcd_dir.join("data").to_string_lossy(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("e1=http://127.0.0.1:{peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .spawn()
            .map_err(|e| Error::new(STEP, format!("cannot run etcd: {e}")))?;
        write_file(
            &etcd_dir.join("etcd.pid"),
            &format!("{}\n", etcd_child.id()),
        )?;
        let mut cluster = PatroniCluster {
            nodes: Vec::new(),
            etcd: Mutex::new(Some(etcd_child)),
            timeout: self.timeout,
            dir,
        };
        wait_listening(client, self.timeout, STEP, &etcd_dir.join("etcd.log"))?;

        let scope = format!("pgxkit-{client}");
        for i in 1..=self.nodes {
            let name = format!("node{i}");
            let node_dir = cluster.dir.path().join(&name);
            make_dir(&node_dir, &runner)?;
            let (pg_port, api_port) = (port()?, port()?);
            let config = node_dir.join("patroni.yml");
            write_file(
                &config,
                &patroni_config(&PatroniConfig {
                    scope: &scope,
                    name: &name,
                    dir: &node_dir,
                    bin_dir: &bin_dir,
                    etcd_port: client,
                    pg_port,
                    api_port,
                    synchronous: self.synchronous,
                }),
            )?;
            runner.hand_over(&config)?;
            let child = runner
                .command_path(&patroni, &node_dir.join("patroni.log"))?
                .arg(&config)
                .spawn()
                .map_err(|e| Error::new(STEP, format!("cannot run patroni: {e}")))?;
            write_file(&node_dir.join("patroni.pid"), &format!("{}\n", child.id()))?;
            cluster.nodes.push(PatroniNode {
                name,
                pg_port,
                api_port,
                dir: node_dir,
                child: Mutex::new(Some(child)),
                timeout: self.timeout,
            });
            if i == 1 {
                // The first bootstraps the cluster; the others copy it.
                cluster
                    .wait_for_leader(None)
                    .map_err(|e| e.with_log(&cluster.nodes[0].log_path()))?;
            }
        }
        cluster.wait_for_replicas()?;
        if self.synchronous && self.nodes > 1 {
            cluster.wait_for_sync_standby()?;
        }
        Ok(cluster)
    }
}

impl PatroniNode {
    /// `node1`, `node2`, ... (Patroni's member name).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// assert_eq!(ha.node(0).name(), "node1");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port its PostgreSQL listens on (127.0.0.1).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// println!("{}", ha.node(0).port());
    /// ```
    pub fn port(&self) -> u16 {
        self.pg_port
    }

    /// Its PostgreSQL's DSN (user and database `postgres`, trust).
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// let cluster = pgxkit::Cluster::connect(&ha.node(0).dsn()).unwrap();
    /// ```
    pub fn dsn(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port)
    }

    /// Patroni's log file.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// let log = std::fs::read_to_string(ha.node(0).log_path()).unwrap();
    /// ```
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    /// Whether Patroni says this node is the running leader.
    fn is_leader(&self) -> bool {
        self.get("/primary") == Some(200)
    }

    /// The status of `GET path` on its REST API; `None` when it does not answer.
    fn get(&self, path: &str) -> Option<u16> {
        self.request("GET", path, "", Duration::from_secs(2))
            .ok()
            .map(|(status, _)| status)
    }

    /// One HTTP/1.0 request to its REST API, bounded by `timeout`.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.api_port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("cannot reach Patroni on {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {response:.80}"))?;
        let text = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok((status, text))
    }

    /// Kills the node as a crash would: SIGKILL to Patroni, its PostgreSQL
    /// and every process below them; returns once they are gone.
    ///
    /// ```no_run
    /// # let ha = pgxkit::testkit::PatroniCluster::builder().start().unwrap();
    /// ha.node(ha.leader().unwrap()).kill().unwrap();
    /// ```
    pub fn kill(&self) -> Result<(), Error> {
        let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        // Patroni's PostgreSQL need not be its child: found by its pid file.
        let mut all = descendants(child.id());
        if let Some(postmaster) = self.postmaster() {
            all.push(postmaster);
            all.extend(descendants(postmaster));
        }
        let _ = child.kill();
        for &pid in &all {
            process::send_signal(pid, Signal::SIGKILL);
        }
        let deadline = Instant::now() + self.timeout;
        let reaped = process::wait_exit(&mut child, deadline).is_some();
        if reaped && process::wait_gone(&all, deadline) {
            Ok(())
        } else {
            Err(Error::new("kill", "processes still alive after SIGKILL").on_node(&self.name))
        }
    }

    /// The pid of its PostgreSQL's postmaster, from `postmaster.pid`.
    fn postmaster(&self) -> Option<u32> {
        let text = fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        process::is_alive(pid).then_some(pid)
    }

    /// Stops Patroni (SIGTERM: it stops its PostgreSQL first), then kills
    /// whatever is left.
    fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut all = descendants(child.id());
        if let Some(postmaster) = self.postmaster() {
            all.push(postmaster);
            all.extend(descendants(postmaster));
        }
        process::send_signal(child.id(), Signal::SIGTERM);
        if process::wait_exit(&mut child, Instant::now() + self.timeout).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for &pid in &all {
            process::send_signal(pid, Signal::SIGKILL);
        }
        let _ = process::wait_gone(&all, Instant::now() + self.timeout);
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.stop();
        }
        let etcd = self
            .etcd
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut child) = etcd {
            process::send_signal(child.id(), Signal::SIGTERM);
            if process::wait_exit(&mut child, Instant::now() + self.timeout).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Every process below `pid`, children first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for child in process::children_of(parent) {
            if !out.contains(&child) {
                out.push(child);
                next.push(child);
            }
        }
    }
    out
}

struct PatroniConfig<'a> {
    scope: &'a str,
    name: &'a str,
    dir: &'a Path,
    bin_dir: &'a Path,
    etcd_port: u16,
    pg_port: u16,
    api_port: u16,
    synchronous: bool,
}

fn patroni_config(c: &PatroniConfig<'_>) -> String {
    let PatroniConfig {
        scope,
        name,
        dir,
        bin_dir,
        etcd_port,
        pg_port,
        api_port,
        synchronous,
    } = c;
    let dir = dir.display();
    let bin_dir = bin_dir.display();
    format!(
        "scope: {scope}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: {synchronous}
    postgresql:
      use_pg_rewind: false
      parameters:
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 256MB
  initdb:
    - encoding: UTF8
    - locale: C
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {dir}/data
  bin_dir: {bin_dir}
  pgpass: {dir}/pgpass
  authentication:
    replication:
      username: postgres
    superuser:
      username: postgres
  parameters:
    unix_socket_directories: '{dir}'
    max_connections: 200
    shared_buffers: 32MB
    fsync: 'off'
    full_page_writes: 'off'
    wal_receiver_status_interval: 1s
    wal_retrieve_retry_interval: 200ms
watchdog:
  mode: off
"
    )
}

fn find_binary(name: &str, package: &str) -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::new(
                "start patroni",
                format!("no {name} binary found; install it (Debian/Ubuntu: `apt-get install {package}`)"),
            )
        })
}

fn make_dir(dir: &Path, runner: &Runner) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            "start patroni",
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    runner.hand_over(dir)
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|e| {
        Error::new(
            "start patroni",
            format!("cannot write {}: {e}", path.display()),
        )
    })
}

/// Waits until something accepts connections on `port`.
fn wait_listening(
    port: u16,
    timeout: Duration,
    step: &'static str,
    log: &Path,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() >= deadline {
            return Err(
                Error::new(step, format!("nothing listens on {addr} after {timeout:?}"))
                    .with_log(log),
            );
        }
        thread::sleep(POLL);
    }
    Ok(())
}
