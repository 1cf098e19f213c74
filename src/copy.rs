//! COPY IN and COPY OUT on a pooled connection, with the caller's own
//! reader and writer. A failure of the caller's side (its reader or writer)
//! is kept apart from the connection's, so it comes back as
//! [`ErrorKind::Io`](crate::ErrorKind::Io) with the I/O error as its source.

use std::io::{BufRead, Read, Write};

use crate::error::{Error, ErrorKind, Result};
use crate::info::NodeInfo;
use crate::pool::manager::Conn;

/// The size of each chunk handed from the caller's reader to the server.
const CHUNK: usize = 64 * 1024;

/// The driver's error inside an `io::Error` from its COPY reader or writer
/// (it wraps every one of its own errors so); any other I/O error back.
fn driver_error(err: std::io::Error) -> std::result::Result<postgres::Error, std::io::Error> {
    if !err.get_ref().is_some_and(|e| e.is::<postgres::Error>()) {
        return Err(err);
    }
    match err.into_inner().map(|e| e.downcast::<postgres::Error>()) {
        Some(Ok(pg)) => Ok(*pg),
        _ => Err(std::io::Error::other("COPY failed")),
    }
}

/// `COPY ... FROM STDIN` fed from `data`; the rows copied. When `data`
/// fails, the COPY is aborted (the driver sends CopyFail, so the server
/// rolls the COPY back and the connection stays usable) and the error is
/// put in `failed`.
pub(crate) fn copy_in(
    conn: &mut Conn,
    sql: &str,
    data: &mut dyn Read,
    failed: &mut Option<std::io::Error>,
) -> std::result::Result<u64, postgres::Error> {
    let mut writer = conn.client.copy_in(sql)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                *failed = Some(e);
                drop(writer); // unfinished: the COPY is aborted
                return Ok(0);
            }
        };
        if let Err(e) = writer.write_all(&buf[..n]) {
            return match driver_error(e) {
                Ok(pg) => Err(pg),
                Err(io) => {
                    conn.broken = true;
                    *failed = Some(io);
                    Ok(0)
                }
            };
        }
    }
    writer.finish()
}

/// `COPY ... TO STDOUT` written to `out`; the bytes written. When `out`
/// fails, the rest of the output is not read: the connection is discarded
/// and the error put in `failed`.
pub(crate) fn copy_out(
    conn: &mut Conn,
    sql: &str,
    out: &mut dyn Write,
    failed: &mut Option<std::io::Error>,
) -> std::result::Result<u64, postgres::Error> {
    let mut reader = conn.client.copy_out(sql)?;
    let mut written = 0u64;
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) => match driver_error(e) {
                Ok(pg) => return Err(pg),
                Err(io) => {
                    drop(reader);
                    conn.broken = true;
                    *failed = Some(io);
                    return Ok(written);
                }
            },
        };
        let n = chunk.len();
        if let Err(e) = out.write_all(chunk) {
            drop(reader);
            conn.broken = true;
            *failed = Some(e);
            return Ok(written);
        }
        reader.consume(n);
        written += n as u64;
    }
    if let Err(e) = out.flush() {
        *failed = Some(e);
    }
    Ok(written)
}

/// The operation's result, or the caller's I/O failure that ended it.
pub(crate) fn outcome<T>(
    result: Result<T>,
    failed: Option<std::io::Error>,
    node: &NodeInfo,
    what: &str,
) -> Result<T> {
    match failed {
        Some(io) => Err(Error::new(ErrorKind::Io)
            .with_node(node)
            .with_detail(format!("{what} failed; the COPY was aborted"))
            .with_source(io)),
        None => result,
    }
}
