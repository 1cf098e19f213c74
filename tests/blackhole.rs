//! A real packet-drop black hole: the server runs in a network namespace
//! this test creates, reached over a veth pair; setting the namespace's end
//! of the pair down drops every packet (no RST, no ACK: unlike the fault
//! proxy, the kernel acknowledges nothing). Calls with and without a
//! deadline must still end within their documented bounds.
//!
//! Needs root and `ip` (iproute2). Skipped with a message where the machine
//! does not allow namespaces, unless `PGXKIT_REQUIRE_NETNS=1` (CI sets it),
//! which makes that a failure. Only addresses inside the namespace the test
//! made are used; the namespace, the link and the server are removed on
//! drop.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn bin_dir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|d| d.join("postgres").exists());
    from_pg_config.unwrap_or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("postgres").exists())
            .collect();
        dirs.sort();
        dirs.pop().expect("no PostgreSQL server binaries")
    })
}

/// A namespace with a veth pair to it: `host` on our side, `inside` in it.
struct Netns {
    name: String,
    host_link: String,
    inside_link: String,
    inside: String,
    server: Option<Child>,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let id = std::process::id() % 60_000;
        let net = format!("10.{}.{}", 200 + id / 250 % 50, id % 250);
        let ns = Netns {
            name: format!("pgxkit-{id}"),
            host_link: format!("pgxh{id}"),
            inside_link: format!("pgxn{id}"),
            inside: format!("{net}.2"),
            server: None,
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inside_link,
        ])?;
        ip(&["link", "set", &ns.inside_link, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &ns.host_link])?;
        ip(&["link", "set", &ns.host_link, "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            &ns.inside_link,
        ])?;
        ns.exec(&["ip", "link", "set", &ns.inside_link, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Drops every packet from now on (`up` false) or passes them again.
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.exec(&["ip", "link", "set", &self.inside_link, state])
            .unwrap();
    }

    /// Runs `node`'s data directory as a server inside the namespace.
    fn serve(&mut self, data_dir: &str, socket_dir: &str, port: u16) {
        let postgres = bin_dir().join("postgres");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args([
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
            ])
            .arg(postgres)
            .args(["-D", data_dir, "-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={}", self.inside)])
            .args(["-c", &format!("unix_socket_directories={socket_dir}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            // Immediate shutdown, then make sure.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let until = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn calls_end_within_their_bounds_when_the_network_drops_every_packet() {
    let mut ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) if std::env::var("PGXKIT_REQUIRE_NETNS").as_deref() != Ok("1") => {
            eprintln!("skipped: cannot make a network namespace here ({e})");
            return;
        }
        Err(e) => panic!("PGXKIT_REQUIRE_NETNS=1 and no network namespace: {e}"),
    };
    let local = LocalCluster::start(0).unwrap();
    let node = local.primary();
    node.stop().unwrap();
    let hba = node.data_dir().join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("host all all 10.0.0.0/8 trust\n");
    std::fs::write(&hba, rules).unwrap();
    ns.serve(
        &node.data_dir().to_string_lossy(),
        &node.socket_dir().to_string_lossy(),
        node.port(),
    );
    let dsn = format!(
        "postgres://postgres@{}:{}/postgres?sslmode=disable",
        ns.inside,
        node.port()
    );
    common::wait_for(
        "the server in the namespace",
        Duration::from_secs(30),
        || {
            pgxkit::postgres::Client::connect(
                &format!("{dsn}&connect_timeout=1"),
                pgxkit::postgres::NoTls,
            )
            .is_ok()
        },
    );
    let cluster = Cluster::builder()
        .primary(&dsn)
        .health_check_period(Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    // The calls run on a worker thread (each on a connection that thread
    // used just before), and this thread holds the namespace: a call that
    // is not bounded fails the test after LIMIT, with the network passing
    // again so the worker ends and the namespace is removed.
    const LIMIT: Duration = Duration::from_secs(30);
    let (ready_tx, ready) = mpsc::channel::<()>();
    let (go, go_rx) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel();
    let worker = {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            // Without a deadline: the probes stop answering, and 2 x 1 s
            // later every connection to the node is ended.
            let _: i32 = cluster.query_one("SELECT 1", &[]).unwrap().get(0);
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let started = Instant::now();
            let result = cluster.query_one("SELECT 1", &[]).map(|_| ());
            done_tx.send((result, started.elapsed())).unwrap();
            // Back, then a deadline: ended locally whatever the network does.
            go_rx.recv().unwrap();
            common::wait_for("the node back", Duration::from_secs(20), || {
                cluster.query_one("SELECT 1", &[]).is_ok()
            });
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let started = Instant::now();
            let result = cluster
                .with_timeout(Duration::from_millis(300))
                .query_one("SELECT 1", &[])
                .map(|_| ());
            done_tx.send((result, started.elapsed())).unwrap();
        })
    };
    let outcome = |what: &str| {
        ready.recv_timeout(LIMIT).unwrap();
        ns.link(false);
        go.send(()).unwrap();
        match done.recv_timeout(LIMIT) {
            Ok(outcome) => outcome,
            Err(_) => {
                ns.link(true);
                panic!("{what}: still blocked after {LIMIT:?}");
            }
        }
    };
    let (result, no_deadline) = outcome("a call without a deadline");
    let err = result.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Closed | ErrorKind::Connect),
        "{err:?}"
    );
    assert!(
        no_deadline < Duration::from_millis(3_200),
        "{no_deadline:?}"
    );
    ns.link(true);
    go.send(()).unwrap();
    let (result, with_deadline) = outcome("a call with a 300 ms deadline");
    assert_eq!(result.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(
        with_deadline < Duration::from_millis(350),
        "{with_deadline:?}"
    );
    eprintln!(
        "black hole: a call without a deadline failed after {no_deadline:?}, one with a \
         300 ms deadline after {with_deadline:?}"
    );
    worker.join().unwrap();
    ns.link(true);
    drop(cluster);
}
