//! COPY IN and COPY OUT against a real server: a million rows each way with
//! their counts checked and memory flat, a failing reader or writer (the
//! COPY aborted, the cluster still usable), transactions, hooks and
//! deadlines.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgxkit::hooks::OperationKind;
use pgxkit::testkit::LocalCluster;
use pgxkit::{Cluster, ErrorKind};

const ROWS: u64 = 1_000_000;

/// `n` rows of text COPY input, made as they are read (never held whole):
/// `id<TAB>a 20-character pad`.
struct Generated {
    next: u64,
    n: u64,
    /// The part of the last row that did not fit the caller's buffer.
    pending: Vec<u8>,
    /// Fail with this after so many bytes.
    fail_after: Option<usize>,
    sent: usize,
}

const PAD: &[u8] = b"\txxxxxxxxxxxxxxxxxxxx\n";

impl Generated {
    fn new(n: u64) -> Self {
        Generated {
            next: 0,
            n,
            pending: Vec::new(),
            fail_after: None,
            sent: 0,
        }
    }

    fn row(&mut self, into: &mut Vec<u8>) {
        self.next += 1;
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = self.next;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        into.extend_from_slice(&digits[i..]);
        into.extend_from_slice(PAD);
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.fail_after.is_some_and(|limit| self.sent >= limit) {
            return Err(std::io::Error::other("the source went away"));
        }
        let mut chunk = std::mem::take(&mut self.pending);
        while chunk.len() < buf.len() && self.next < self.n {
            self.row(&mut chunk);
        }
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.pending = chunk.split_off(n);
        self.sent += n;
        Ok(n)
    }
}

/// Counts what it is given (bytes, lines), keeps none of it; fails after
/// `fail_after` bytes if set.
#[derive(Default)]
struct Counting {
    bytes: u64,
    lines: u64,
    fail_after: Option<u64>,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.fail_after.is_some_and(|limit| self.bytes >= limit) {
            return Err(std::io::Error::other("the disk is full"));
        }
        self.bytes += buf.len() as u64;
        self.lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn count(cluster: &Cluster) -> i64 {
    cluster
        .query_one("SELECT count(*) FROM big", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_million_rows_in_and_out_counted_with_flat_memory() {
    let local = LocalCluster::start(0).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cluster = {
        let seen = Arc::clone(&seen);
        Cluster::builder()
            .primary(local.primary_dsn())
            .after_operation(move |op| {
                seen.lock()
                    .unwrap()
                    .push((op.kind(), op.rows(), op.error().is_none()));
                Ok(())
            })
            .build()
            .unwrap()
    };
    cluster
        .batch_execute("CREATE TABLE big (id bigint, pad text)")
        .unwrap();

    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let copied = cluster
        .copy_in("COPY big (id, pad) FROM STDIN", Generated::new(ROWS))
        .unwrap();
    let took_in = started.elapsed();
    assert_eq!(copied, ROWS);
    assert_eq!(count(&cluster), ROWS as i64);

    let started = Instant::now();
    let mut out = Counting::default();
    let written = cluster.copy_out("COPY big TO STDOUT", &mut out).unwrap();
    let took_out = started.elapsed();
    assert_eq!(out.lines, ROWS);
    assert_eq!(written, out.bytes);
    assert!(out.bytes > 25 * ROWS, "{} bytes", out.bytes);
    // ~30 MB went each way; neither was held whole.
    let grown_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!(
        "copy: {ROWS} rows in {took_in:?}, {} MB out in {took_out:?}; peak RSS grew {grown_mib} MiB",
        out.bytes / 1_000_000
    );
    assert!(grown_mib < 16, "peak RSS grew {grown_mib} MiB");

    let seen = seen.lock().unwrap();
    assert!(
        seen.contains(&(OperationKind::CopyIn, Some(ROWS), true)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(k, _, ok)| *k == OperationKind::CopyOut && *ok),
        "{seen:?}"
    );
}

#[test]
fn a_failing_reader_or_writer_aborts_the_copy_and_leaves_the_cluster_usable() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    cluster
        .batch_execute("CREATE TABLE big (id bigint PRIMARY KEY, pad text)")
        .unwrap();

    // The reader fails half way: nothing is copied.
    let mut source = Generated::new(100_000);
    source.fail_after = Some(1_000_000);
    let err = cluster
        .copy_in("COPY big (id, pad) FROM STDIN", source)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err:?}");
    assert!(err.to_string().contains("the source went away"), "{err}");
    assert_eq!(count(&cluster), 0);

    cluster
        .copy_in("COPY big (id, pad) FROM STDIN", Generated::new(100_000))
        .unwrap();
    // The writer fails half way: the connection is discarded, the next call works.
    let broken_before = cluster.stats().primary().unwrap().pool.closed_broken;
    let mut out = Counting {
        fail_after: Some(100_000),
        ..Counting::default()
    };
    let err = cluster
        .copy_out("COPY big TO STDOUT", &mut out)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err:?}");
    assert!(err.to_string().contains("the disk is full"), "{err}");
    assert_eq!(
        cluster.stats().primary().unwrap().pool.closed_broken,
        broken_before + 1
    );
    assert_eq!(count(&cluster), 100_000);

    // A COPY statement the server refuses is the server's error.
    let err = cluster
        .copy_in("COPY nowhere FROM STDIN", &b"1\n"[..])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err:?}");
    assert_eq!(
        err.code(),
        Some(&pgxkit::postgres::error::SqlState::UNDEFINED_TABLE)
    );
}

#[test]
fn copy_in_a_transaction_rolls_back_with_it_and_copy_is_bounded_by_the_deadline() {
    let local = LocalCluster::start(0).unwrap();
    let cluster = Cluster::connect(&local.primary_dsn()).unwrap();
    cluster
        .batch_execute("CREATE TABLE big (id bigint PRIMARY KEY, pad text)")
        .unwrap();
    let result: pgxkit::Result<()> = cluster.transaction(|tx| -> pgxkit::Result<_> {
        assert_eq!(
            tx.copy_in("COPY big (id, pad) FROM STDIN", Generated::new(1_000))?,
            1_000
        );
        let mut out = Vec::new();
        tx.copy_out("COPY (SELECT count(*) FROM big) TO STDOUT", &mut out)?;
        assert_eq!(out, b"1000\n");
        // An error after the COPY: the whole transaction rolls back.
        tx.execute("SELECT 1 / 0", &[]).map(|_| ())
    });
    assert!(result.is_err());
    assert_eq!(count(&cluster), 0);

    // A COPY OUT far too long for its deadline ends at it.
    let started = Instant::now();
    let err = cluster
        .with_timeout(Duration::from_millis(300))
        .copy_out(
            "COPY (SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g) TO STDOUT",
            Counting::default(),
        )
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(took < Duration::from_millis(350), "{took:?}");
    assert_eq!(count(&cluster), 0);
}
