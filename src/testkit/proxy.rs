//! An in-process TCP fault proxy, in the manner of Toxiproxy: it sits in
//! front of a server and, switched at run time, passes traffic, delays it,
//! limits its bandwidth, resets every connection, refuses new ones, or goes
//! silent (accepts, keeps every socket open, forwards nothing in either
//! direction: what a hung server, a frozen host or a stuck proxy looks like
//! to a client, whose kernel still acknowledges what it sends).
//!
//! Everything runs on the proxy's own threads, which poll their sockets with
//! short timeouts so that each loop notices a mode change or the proxy's drop
//! within [`POLL`]; dropping the proxy closes every socket and joins every
//! thread.

use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Error;
use crate::sync::lock;

/// How often every proxy loop looks at its mode and stop flag.
const POLL: Duration = Duration::from_millis(10);

/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with traffic.
///
/// ```no_run
/// use std::time::Duration;
/// use pgxkit::testkit::{Fault, LocalCluster};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let local = LocalCluster::start(1)?;
/// let proxy = local.replicas()[0].fault_proxy()?;
/// proxy.set(Fault::Latency(Duration::from_millis(50)));
/// proxy.set(Fault::Silent);   // the replica "hangs"
/// proxy.set(Fault::Pass);     // and comes back; nothing was lost
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward everything as it comes. The default.
    Pass,
    /// Hold each chunk this long before forwarding it, both ways.
    Latency(Duration),
    /// At most this many bytes per second, each way.
    Bandwidth(u64),
    /// Forward nothing, either way, and read nothing (so the kernel's
    /// buffers fill); keep every socket open; accept new connections and
    /// do the same with them. Back to [`Pass`](Fault::Pass), what was held
    /// flows on.
    Silent,
    /// Reset every connection (RST) at once, and every new one as it comes.
    Reset,
    /// Refuse new connections (the listening socket is closed, so a
    /// connect gets ECONNREFUSED); existing ones go on as with `Pass`.
    Refuse,
}

struct Shared {
    target: SocketAddr,
    /// The listening socket; `None` while refusing.
    listener: Mutex<Option<TcpListener>>,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    /// Every open connection's two sockets, by connection, to reset them
    /// all at once.
    sockets: Mutex<Vec<(u64, TcpStream)>>,
    /// The id of the next connection.
    next_id: std::sync::atomic::AtomicU64,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }
}

/// An in-process TCP fault proxy in front of one server, in the manner of
/// Toxiproxy, switched at run time by [`set`](Self::set) (see [`Fault`]).
/// Listens on `127.0.0.1` on a port of its own; [`dsn`](Self::dsn) is the
/// node's DSN through it. Its threads poll every 10 ms, so a change takes
/// effect within that; dropping it closes every connection and joins them.
///
/// ```no_run
/// let local = pgxkit::testkit::LocalCluster::start(0)?;
/// let proxy: pgxkit::testkit::FaultProxy = local.primary().fault_proxy()?;
/// proxy.set(pgxkit::testkit::Fault::Silent); // accepts, forwards nothing: a silent node
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FaultProxy {
    port: u16,
    dsn: String,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("target", &self.shared.target)
            .field("fault", &self.shared.fault())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy in front of `target`; `dsn` is the target's DSN, whose
    /// port is replaced by the proxy's for [`dsn`](Self::dsn).
    pub(crate) fn start(target: SocketAddr, dsn: &str) -> Result<FaultProxy, Error> {
        let listener = bind(0)?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::new("start fault proxy", e.to_string()))?
            .port();
        let shared = Arc::new(Shared {
            target,
            listener: Mutex::new(Some(listener)),
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            pumps: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("pgxkit-proxy-accept".to_owned())
                .spawn(move || accept_loop(&shared, port))
                .map_err(|e| Error::new("start fault proxy", e.to_string()))?
        };
        Ok(FaultProxy {
            port,
            dsn: dsn.replacen(&format!(":{}/", target.port()), &format!(":{port}/"), 1),
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The port the proxy listens on (on `127.0.0.1`).
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// let proxy = local.primary().fault_proxy().unwrap();
    /// assert_ne!(proxy.port(), local.primary().port());
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxied node's DSN, through the proxy.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// let proxy = local.primary().fault_proxy().unwrap();
    /// let cluster = pgxkit::Cluster::connect(proxy.dsn()).unwrap();
    /// ```
    pub fn dsn(&self) -> &str {
        &self.dsn
    }

    /// Switches what the proxy does, at once for every connection.
    /// [`Fault::Reset`] resets every open connection before it returns.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// # let proxy = local.primary().fault_proxy().unwrap();
    /// proxy.set(pgxkit::testkit::Fault::Silent);
    /// ```
    pub fn set(&self, fault: Fault) {
        *lock(&self.shared.fault) = fault;
        match fault {
            Fault::Reset => reset_all(&self.shared),
            // Closed here, so a connect after this call is refused.
            Fault::Refuse => drop(lock(&self.shared.listener).take()),
            _ => {}
        }
    }

    /// What the proxy does now.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// # let proxy = local.primary().fault_proxy().unwrap();
    /// assert_eq!(proxy.fault(), pgxkit::testkit::Fault::Pass);
    /// ```
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Connections open through the proxy now.
    ///
    /// ```no_run
    /// # let local = pgxkit::testkit::LocalCluster::start(0).unwrap();
    /// # let proxy = local.primary().fault_proxy().unwrap();
    /// assert_eq!(proxy.connections(), 0);
    /// ```
    pub fn connections(&self) -> usize {
        lock(&self.shared.sockets).len() / 2
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, socket) in lock(&self.shared.sockets).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let pumps: Vec<_> = lock(&self.shared.pumps).drain(..).collect();
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn bind(port: u16) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| Error::new("start fault proxy", format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::new("start fault proxy", e.to_string()))?;
    Ok(listener)
}

/// Accepts until stopped; while refusing, the listening socket is closed
/// (by [`FaultProxy::set`]) and opened again, on the same port, once the
/// fault changes.
fn accept_loop(shared: &Arc<Shared>, port: u16) {
    while !shared.stop.load(SeqCst) {
        let refusing = shared.fault() == Fault::Refuse;
        let accepted = {
            let mut listener = lock(&shared.listener);
            if listener.is_none() && !refusing {
                // Bounded: one attempt per poll until the port is ours again.
                *listener = bind(port).ok();
            }
            listener.as_ref().map(TcpListener::accept)
        };
        match accepted {
            Some(Ok((client, _))) => serve(shared, client),
            Some(Err(_)) | None => std::thread::sleep(POLL),
        }
        // Reap pumps that ended.
        lock(&shared.pumps).retain(|p| !p.is_finished());
    }
}

/// Connects `client` to the target and starts its two pumps.
fn serve(shared: &Arc<Shared>, client: TcpStream) {
    if shared.fault() == Fault::Reset {
        reset(&client);
        return;
    }
    let Ok(server) = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) else {
        reset(&client);
        return;
    };
    let clones = (
        client.try_clone(),
        server.try_clone(),
        server.try_clone(),
        client.try_clone(),
    );
    let (Ok(c_read), Ok(s_write), Ok(s_read), Ok(c_write)) = clones else {
        return;
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL));
    }
    let id = shared.next_id.fetch_add(1, SeqCst);
    lock(&shared.sockets).extend([(id, client), (id, server)]);
    for (from, to, name) in [
        (c_read, s_write, "pgxkit-proxy-up"),
        (s_read, c_write, "pgxkit-proxy-down"),
    ] {
        let shared_for_pump = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || pump(&shared_for_pump, id, from, to));
        if let Ok(handle) = spawned {
            lock(&shared.pumps).push(handle);
        }
    }
}

/// Copies `from` to `to` as the fault says, until either side closes or
/// the proxy stops.
fn pump(shared: &Shared, id: u64, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while !shared.stop.load(SeqCst) {
        let fault = shared.fault();
        if fault == Fault::Silent {
            std::thread::sleep(POLL);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => continue,
            Err(_) => break,
        };
        // The fault may have changed while reading: what was read is held
        // until the proxy passes again, or dropped with a reset.
        let mut fault = shared.fault();
        while fault == Fault::Silent && !shared.stop.load(SeqCst) {
            std::thread::sleep(POLL);
            fault = shared.fault();
        }
        match fault {
            Fault::Latency(d) => sleep_unless_stopped(shared, d),
            Fault::Bandwidth(bytes_per_second) => {
                let secs = n as f64 / bytes_per_second.max(1) as f64;
                sleep_unless_stopped(shared, Duration::from_secs_f64(secs.min(60.0)));
            }
            Fault::Reset => break,
            Fault::Pass | Fault::Silent | Fault::Refuse => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    forget(shared, id);
}

/// Sleeps `d`, in steps, returning early when the proxy stops.
fn sleep_unless_stopped(shared: &Shared, d: Duration) {
    let until = Instant::now() + d;
    while !shared.stop.load(SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL));
    }
}

/// Drops a closed connection's sockets from the list of open ones (by
/// connection: a reset socket no longer knows its peer's address).
fn forget(shared: &Shared, id: u64) {
    lock(&shared.sockets).retain(|(of, _)| *of != id);
}

fn reset_all(shared: &Shared) {
    for (_, socket) in lock(&shared.sockets).drain(..) {
        reset(&socket);
    }
}

/// Closes `socket` with an RST (SO_LINGER 0) rather than a FIN.
fn reset(socket: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(socket, Linger, &linger);
    let _ = socket.shutdown(Shutdown::Both);
}
