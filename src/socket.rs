//! A connection's socket, kept so another thread can shut it down.
//!
//! `postgres::Client` owns its socket and does not expose it. A call blocked
//! on a node that keeps its connection open and answers nothing (a hung
//! server, a stopped host, a proxy that forwards nothing) waits for a read
//! that nothing ends: TCP keepalives and `tcp_user_timeout` only act when
//! packets go unacknowledged, and a cancel request goes unanswered too. So
//! when a connection is opened its new socket is found among the process's
//! descriptors (Linux: `/proc/self/fd`) and a duplicate of it kept;
//! `shutdown(2)` on the duplicate ends the driver's blocked read at once and
//! the call fails with a closed connection.
//!
//! The new socket is told apart by taking the socket inodes open before the
//! connect and after it, and keeping those connected to the node's address.
//! Connects to one address are serialised process-wide ([`Peer::gate`]), so
//! two of ours never overlap; a socket other code opens to the same address
//! at the same moment makes the answer ambiguous, and that connection goes
//! without (its deadlines still send cancel requests). Elsewhere than on
//! Linux no socket is ever found.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use postgres::config::Host;

use crate::sync::lock;

/// The address a connection goes to: every address of every host the
/// config names, so a connection to any of them is recognised.
#[derive(Debug, Clone, Default)]
pub(crate) struct Peer {
    tcp: Vec<SocketAddr>,
    unix: Vec<PathBuf>,
}

impl Peer {
    /// Resolves the config's hosts (as the driver will; a name that does
    /// not resolve is left out, and the driver reports it).
    pub(crate) fn of(pg: &postgres::Config) -> Peer {
        let ports = pg.get_ports();
        let port_of = |i: usize| match ports {
            [] => 5432,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(5432),
        };
        let mut peer = Peer::default();
        for (i, ip) in pg.get_hostaddrs().iter().enumerate() {
            peer.tcp.push(SocketAddr::new(*ip, port_of(i)));
        }
        for (i, host) in pg.get_hosts().iter().enumerate() {
            let port = port_of(i);
            match host {
                Host::Tcp(name) => {
                    if let Ok(ip) = name.parse::<IpAddr>() {
                        peer.tcp.push(SocketAddr::new(ip, port));
                    } else if let Ok(addrs) = (name.as_str(), port).to_socket_addrs() {
                        peer.tcp.extend(addrs);
                    }
                }
                #[cfg(unix)]
                Host::Unix(dir) => peer.unix.push(dir.join(format!(".s.PGSQL.{port}"))),
            }
        }
        peer.tcp.sort_unstable();
        peer.tcp.dedup();
        peer
    }

    fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.unix.is_empty()
    }

    /// The gate every connect to this address (a cancel request's too)
    /// passes while it runs and its socket is looked for (see the module
    /// docs); one per address in the process.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        static GATES: Mutex<Vec<(String, Weak<Gate>)>> = Mutex::new(Vec::new());
        let key = format!("{:?}{:?}", self.tcp, self.unix);
        let mut gates = lock(&GATES);
        gates.retain(|(_, weak)| weak.strong_count() > 0);
        if let Some(found) = gates
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, weak)| weak.upgrade())
        {
            return found;
        }
        let made = Arc::new(Gate::default());
        gates.push((key, Arc::downgrade(&made)));
        made
    }
}

/// A lock whose wait is bounded: one connect at a time per address.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    busy: Mutex<bool>,
    free: Condvar,
}

/// Passage through a [`Gate`]; the next one in goes when it drops.
#[derive(Debug)]
pub(crate) struct Entered<'a>(&'a Gate);

impl Gate {
    /// Enters once the connect before has ended, waiting at most `timeout`
    /// (each connect is bounded, so the wait ends; `None` if it does not).
    pub(crate) fn enter(&self, timeout: Duration) -> Option<Entered<'_>> {
        let until = Instant::now().checked_add(timeout);
        let mut busy = lock(&self.busy);
        while *busy {
            let left = until?.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            busy = match self.free.wait_timeout(busy, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        *busy = true;
        Some(Entered(self))
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        *lock(&self.0.busy) = false;
        self.0.free.notify_one();
    }
}

/// The socket inodes open in this process now.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot(HashSet<u64>);

/// Our duplicate of a connection's socket (close-on-exec), closed when
/// dropped; the connection it belongs to holds it, and so does a watch
/// that may shut it down.
#[derive(Debug)]
pub(crate) struct Socket {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::HashSet;
    use std::os::fd::RawFd;

    use nix::fcntl::{FcntlArg, fcntl};
    use nix::sys::socket::{Shutdown, SockaddrStorage, getpeername};

    use super::{Peer, Snapshot, Socket};

    /// Each socket open now: its descriptor and inode.
    fn sockets() -> Vec<(RawFd, u64)> {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        dir.filter_map(|entry| {
            let entry = entry.ok()?;
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
    }

    pub(super) fn snapshot() -> Snapshot {
        Snapshot(sockets().into_iter().map(|(_, inode)| inode).collect())
    }

    /// The sockets opened since `before` that are connected to `peer`: the
    /// one, or `None` when none or several are.
    pub(super) fn find_new(before: &Snapshot, peer: &Peer) -> Option<Socket> {
        if peer.is_empty() {
            return None;
        }
        let mut found = None;
        let mut seen = HashSet::new();
        for (fd, inode) in sockets() {
            if before.0.contains(&inode) || !seen.insert(inode) {
                continue;
            }
            // The descriptor may have been closed and reused since it was
            // listed: the duplicate is checked to be that same socket.
            let Some(socket) = duplicate(fd, inode) else {
                continue;
            };
            if !socket.connected_to(peer) {
                continue;
            }
            if found.is_some() {
                log::debug!("two new sockets to one address; not tracking this connection");
                return None;
            }
            found = Some(socket);
        }
        found
    }

    fn duplicate(fd: RawFd, inode: u64) -> Option<Socket> {
        let dup = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(0)).ok()?;
        let socket = Socket { fd: dup };
        match nix::sys::stat::fstat(dup) {
            Ok(stat) if stat.st_ino == inode => Some(socket),
            _ => None,
        }
    }

    impl Socket {
        fn connected_to(&self, peer: &Peer) -> bool {
            let Ok(addr) = getpeername::<SockaddrStorage>(self.fd) else {
                return false;
            };
            if let Some(v4) = addr.as_sockaddr_in() {
                let addr = std::net::SocketAddr::V4((*v4).into());
                return peer.tcp.contains(&addr);
            }
            if let Some(v6) = addr.as_sockaddr_in6() {
                let addr = std::net::SocketAddr::V6((*v6).into());
                return peer.tcp.contains(&addr);
            }
            match addr.as_unix_addr().and_then(|u| u.path()) {
                Some(path) => peer.unix.iter().any(|p| p == path),
                None => false,
            }
        }
    }

    pub(super) fn shutdown_socket(socket: &Socket) {
        // Fails only when the socket is already disconnected.
        let _ = nix::sys::socket::shutdown(socket.fd, Shutdown::Both);
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            let _ = nix::unistd::close(self.fd);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::{Peer, Snapshot, Socket};

    pub(super) fn snapshot() -> Snapshot {
        Snapshot::default()
    }

    pub(super) fn find_new(_: &Snapshot, _: &Peer) -> Option<Socket> {
        None
    }

    pub(super) fn shutdown_socket(_: &Socket) {}
}

impl Snapshot {
    /// The socket inodes open in this process now (empty elsewhere than
    /// on Linux).
    pub(crate) fn take() -> Snapshot {
        imp::snapshot()
    }

    /// The one socket to `peer` opened since this snapshot.
    pub(crate) fn find_new(&self, peer: &Peer) -> Option<Socket> {
        imp::find_new(self, peer)
    }
}

impl Socket {
    /// Shuts the connection down in both directions: a read blocked on it
    /// ends at once. Never blocks.
    pub(crate) fn shutdown(&self) {
        imp::shutdown_socket(self);
    }
}

/// Every tracked socket of one node, so a node found silent can have all
/// its connections ended.
#[derive(Debug, Default)]
pub(crate) struct Sockets(Mutex<Vec<Weak<Socket>>>);

impl Sockets {
    /// Tracks a new connection's socket.
    pub(crate) fn add(&self, socket: &Arc<Socket>) {
        let mut all = lock(&self.0);
        all.retain(|weak| weak.strong_count() > 0);
        all.push(Arc::downgrade(socket));
    }

    /// Shuts down every tracked socket still open; how many there were.
    pub(crate) fn shutdown_all(&self) -> usize {
        let live: Vec<Arc<Socket>> = {
            let mut all = lock(&self.0);
            all.retain(|weak| weak.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        live.iter().for_each(|s| s.shutdown());
        live.len()
    }
}
