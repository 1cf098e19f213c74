//! DSN parsing: URL (`postgres://user:pw@host:port/db?k=v`) and libpq
//! key=value (`host=db port=5432 user=app`) forms, the pgx `pool_*` keys and
//! the libpq TLS keys that `postgres::Config` does not know, and redaction.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use postgres::config::{ChannelBinding, TargetSessionAttrs};

use crate::error::{Error, Result};

/// libpq's `sslmode`.
///
/// ```
/// use pgxkit::SslMode;
/// assert_eq!("verify-full".parse::<SslMode>().unwrap(), SslMode::VerifyFull);
/// assert!("sometimes".parse::<SslMode>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; no verification.
    /// The libpq default.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is verified only if a root certificate is given.
    Require,
    /// TLS, and the server certificate must chain to a trusted root.
    VerifyCa,
    /// TLS, a trusted chain, and the host name must match the certificate.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling: `disable`, `prefer`, `require`, `verify-ca`, `verify-full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(Error::config(
                    "sslmode: `allow` (plaintext first) is not supported; use `prefer` or `disable`",
                ));
            }
            other => {
                return Err(Error::config(format!(
                    "sslmode: unknown mode `{other}` (expected disable, prefer, require, verify-ca or verify-full)"
                )));
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted root certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// `sslrootcert=system`: the operating system's trust store.
    System,
    /// A PEM file with one or more CA certificates.
    File(PathBuf),
}

/// The TLS part of a DSN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

/// Pool settings given explicitly, by a DSN (`pool_*`, as pgxpool reads
/// them) or by the builder; unset ones fall back to the next source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PoolOverrides {
    pub(crate) max_conns: Option<u32>,
    pub(crate) min_conns: Option<u32>,
    pub(crate) max_conn_lifetime: Option<Duration>,
    pub(crate) max_conn_lifetime_jitter: Option<Duration>,
    pub(crate) max_conn_idle_time: Option<Duration>,
    pub(crate) health_check_period: Option<Duration>,
}

impl PoolOverrides {
    /// Each setting from `self`, else from `fallback`.
    pub(crate) fn or(self, fallback: PoolOverrides) -> PoolOverrides {
        PoolOverrides {
            max_conns: self.max_conns.or(fallback.max_conns),
            min_conns: self.min_conns.or(fallback.min_conns),
            max_conn_lifetime: self.max_conn_lifetime.or(fallback.max_conn_lifetime),
            max_conn_lifetime_jitter: self
                .max_conn_lifetime_jitter
                .or(fallback.max_conn_lifetime_jitter),
            max_conn_idle_time: self.max_conn_idle_time.or(fallback.max_conn_idle_time),
            health_check_period: self.health_check_period.or(fallback.health_check_period),
        }
    }
}

/// A parsed DSN: the driver's config plus what pgxkit handles itself.
/// `Debug` never shows the password (`postgres::Config` redacts it).
#[derive(Debug, Clone)]
pub(crate) struct Dsn {
    pub(crate) pg: postgres::Config,
    pub(crate) pool: PoolOverrides,
    pub(crate) tls: TlsSettings,
}

impl Dsn {
    /// Parses a DSN in URL or key=value form.
    pub(crate) fn parse(dsn: &str) -> Result<Dsn> {
        let trimmed = dsn.trim();
        let pairs = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            url_pairs(trimmed)?
        } else if trimmed.contains("://") {
            return Err(Error::config(
                "DSN: unknown URL scheme (expected postgres:// or postgresql://)",
            ));
        } else {
            keyword_pairs(trimmed)?
        };
        let mut out = Dsn {
            pg: postgres::Config::new(),
            pool: PoolOverrides::default(),
            tls: TlsSettings::default(),
        };
        let mut ports = Vec::new();
        for (key, value) in pairs {
            out.apply(&key, value, &mut ports)?;
        }
        for port in ports {
            out.pg.port(port);
        }
        Ok(out)
    }

    fn apply(&mut self, key: &str, value: String, ports: &mut Vec<u16>) -> Result<()> {
        let pg = &mut self.pg;
        match key {
            "host" => {
                for host in value.split(',').filter(|h| !h.is_empty()) {
                    pg.host(host);
                }
            }
            "hostaddr" => {
                for addr in value.split(',') {
                    let ip = IpAddr::from_str(addr.trim())
                        .map_err(|_| invalid(key, &value, "not an IP address"))?;
                    pg.hostaddr(ip);
                }
            }
            "port" => {
                for port in value.split(',') {
                    ports.push(
                        port.trim()
                            .parse()
                            .map_err(|_| invalid(key, &value, "not a port number"))?,
                    );
                }
            }
            "user" => {
                pg.user(&value);
            }
            "password" => {
                pg.password(value);
            }
            "dbname" => {
                pg.dbname(&value);
            }
            "options" => {
                pg.options(&value);
            }
            "application_name" => {
                pg.application_name(&value);
            }
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| invalid(key, &value, "not a whole number of seconds"))?;
                if secs > 0 {
                    pg.connect_timeout(Duration::from_secs(secs));
                }
            }
            "tcp_user_timeout" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| invalid(key, &value, "not a whole number of milliseconds"))?;
                pg.tcp_user_timeout(Duration::from_millis(ms));
            }
            "keepalives" => {
                pg.keepalives(parse_flag(key, &value)?);
            }
            "keepalives_idle" => {
                pg.keepalives_idle(Duration::from_secs(parse_u32(key, &value)?.into()));
            }
            "keepalives_interval" => {
                pg.keepalives_interval(Duration::from_secs(parse_u32(key, &value)?.into()));
            }
            "keepalives_count" => {
                pg.keepalives_retries(parse_u32(key, &value)?);
            }
            "target_session_attrs" => {
                pg.target_session_attrs(match value.as_str() {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    _ => return Err(invalid(key, &value, "expected any or read-write")),
                });
            }
            "channel_binding" => {
                pg.channel_binding(match value.as_str() {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    _ => return Err(invalid(key, &value, "expected disable, prefer or require")),
                });
            }
            "sslmode" => self.tls.mode = value.parse()?,
            "sslrootcert" => {
                self.tls.root_cert = Some(if value == "system" {
                    RootCert::System
                } else {
                    RootCert::File(PathBuf::from(value))
                });
            }
            "sslcert" => self.tls.cert = Some(PathBuf::from(value)),
            "sslkey" => self.tls.key = Some(PathBuf::from(value)),
            "pool_max_conns" => self.pool.max_conns = Some(parse_u32(key, &value)?),
            "pool_min_conns" => self.pool.min_conns = Some(parse_u32(key, &value)?),
            "pool_max_conn_lifetime" => {
                self.pool.max_conn_lifetime = Some(parse_duration_key(key, &value)?)
            }
            "pool_max_conn_lifetime_jitter" => {
                self.pool.max_conn_lifetime_jitter = Some(parse_duration_key(key, &value)?)
            }
            "pool_max_conn_idle_time" => {
                self.pool.max_conn_idle_time = Some(parse_duration_key(key, &value)?)
            }
            "pool_health_check_period" => {
                self.pool.health_check_period = Some(parse_duration_key(key, &value)?)
            }
            _ => return Err(Error::config(format!("DSN: unknown key `{key}`"))),
        }
        Ok(())
    }

    /// `host:port` of the first host, for naming the node.
    pub(crate) fn address(&self) -> String {
        use postgres::config::Host;
        let host = match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => match self.pg.get_hostaddrs().first() {
                Some(ip) => ip.to_string(),
                None => "localhost".to_owned(),
            },
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

fn invalid(key: &str, value: &str, why: &str) -> Error {
    // Only `password` is secret, and it is never parsed here.
    Error::config(format!("{key}: invalid value `{value}`: {why}"))
}

fn parse_u32(key: &str, value: &str) -> Result<u32> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, "not a non-negative whole number"))
}

fn parse_flag(key: &str, value: &str) -> Result<bool> {
    match value {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(invalid(key, value, "expected 0 or 1")),
    }
}

fn parse_duration_key(key: &str, value: &str) -> Result<Duration> {
    parse_duration(value).map_err(|why| invalid(key, value, &why))
}

/// Parses a Go-style duration: `1h`, `30m`, `1h30m`, `1.5s`, `500ms`, `250us`, `0`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(pgxkit::parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
/// assert_eq!(pgxkit::parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert!(pgxkit::parse_duration("10").is_err()); // a unit is required
/// ```
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err("negative duration".into());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("expected a number in `{s}`"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("bad number in `{s}`"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1e0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => {
                return Err(format!(
                    "missing unit in `{s}` (use e.g. 500ms, 30s, 5m, 1h)"
                ));
            }
            unit => {
                return Err(format!(
                    "unknown unit `{unit}` in `{s}` (use ns, us, ms, s, m or h)"
                ));
            }
        };
        total += number * nanos_per_unit;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(format!("`{s}` is too long"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Splits a URL DSN into key/value pairs (percent-decoded).
fn url_pairs(url: &str) -> Result<Vec<(String, String)>> {
    let after_scheme = &url[url.find("://").map_or(0, |i| i + 3)..];
    let (before_query, query) = match after_scheme.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (after_scheme, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
        None => (before_query, None),
    };
    let mut pairs = Vec::new();
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_owned(), decode("user", user)?));
            }
            if let Some(password) = password {
                // Never echo: a bad escape in the password names only the key.
                let password = percent_decode(password).ok_or_else(|| {
                    Error::config("DSN: invalid percent-encoding in the password")
                })?;
                pairs.push(("password".to_owned(), password));
            }
            hosts
        }
        None => authority,
    };
    let (mut host_list, mut port_list) = (Vec::new(), Vec::new());
    for spec in hosts.split(',').filter(|s| !s.is_empty()) {
        let (host, port) = split_host_port(spec)?;
        host_list.push(decode("host", host)?);
        port_list.push(port.unwrap_or("5432").to_owned());
    }
    if !host_list.is_empty() {
        pairs.push(("host".to_owned(), host_list.join(",")));
        pairs.push(("port".to_owned(), port_list.join(",")));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".to_owned(), decode("dbname", db)?));
    }
    for param in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| Error::config(format!("DSN: query parameter `{param}` has no `=`")))?;
        let key = decode("a query parameter name", key)?;
        let value = if key == "password" {
            percent_decode(value)
                .ok_or_else(|| Error::config("DSN: invalid percent-encoding in the password"))?
        } else {
            decode(&key, value)?
        };
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn split_host_port(spec: &str) -> Result<(&str, Option<&str>)> {
    if let Some(rest) = spec.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| Error::config("host: unterminated `[` in an IPv6 address"))?;
        let port = rest[end + 1..].strip_prefix(':');
        return Ok((&rest[..end], port));
    }
    Ok(match spec.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (spec, None),
    })
}

fn decode(what: &str, s: &str) -> Result<String> {
    percent_decode(s)
        .ok_or_else(|| Error::config(format!("DSN: invalid percent-encoding in {what}")))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a URL component (everything but unreserved characters).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a libpq key=value DSN into pairs, honouring single quotes and
/// backslash escapes.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::config(format!("DSN: `{key}` is missing `=value`")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(unterminated(&key)),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(unterminated(&key)),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => return Err(unterminated(&key)),
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn unterminated(key: &str) -> Error {
    Error::config(format!("{key}: unterminated quoted value"))
}

/// A DSN with its password replaced by `<redacted>`, for logs and messages.
/// Unparsable input is redacted whole.
///
/// ```
/// assert_eq!(
///     pgxkit::redact_dsn("postgres://app:s3cret@db:5432/app?sslmode=require"),
///     "postgres://app:<redacted>@db:5432/app?sslmode=require"
/// );
/// assert_eq!(
///     pgxkit::redact_dsn("host=db password='s3 cret' user=app"),
///     "host=db password=<redacted> user=app"
/// );
/// ```
pub fn redact_dsn(dsn: &str) -> String {
    let trimmed = dsn.trim();
    if let Some(scheme_end) = trimmed.find("://") {
        let (scheme, rest) = trimmed.split_at(scheme_end + 3);
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let authority_end = before_query.find('/').unwrap_or(before_query.len());
        let (authority, path) = before_query.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>@{hosts}"),
                None => format!("{userinfo}@{hosts}"),
            },
            None => authority.to_owned(),
        };
        let query = query.map(|q| {
            q.split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=<redacted>".to_owned(),
                    _ => p.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        return match query {
            Some(q) => format!("{scheme}{authority}{path}?{q}"),
            None => format!("{scheme}{authority}{path}"),
        };
    }
    match keyword_pairs(trimmed) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if k == "password" {
                    "password=<redacted>".to_owned()
                } else if v.is_empty()
                    || v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
                {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unparsable DSN redacted>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::config::Host;

    #[test]
    fn durations_in_go_syntax() {
        let cases = [
            ("1h", 3_600_000),
            ("30m", 1_800_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("1.5s", 1500),
            ("2h45m30s", 9_930_000),
            ("0", 0),
            ("250us", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_duration(text).unwrap().as_millis(), ms, "{text}");
        }
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        for bad in ["", "10", "1x", "-5s", "h", "1h30", "1..5s", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn url_with_everything() {
        let dsn = Dsn::parse(
            "postgres://app%40x:p%40ss@db1:6432,db2/my%20db?sslmode=verify-full&sslrootcert=/ca.pem\
             &pool_max_conns=50&pool_min_conns=10&pool_max_conn_lifetime=1h30m&application_name=svc",
        )
        .unwrap();
        assert_eq!(dsn.pg.get_user(), Some("app@x"));
        assert_eq!(dsn.pg.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(
            dsn.pg.get_hosts(),
            &[Host::Tcp("db1".into()), Host::Tcp("db2".into())]
        );
        assert_eq!(dsn.pg.get_ports(), &[6432, 5432]);
        assert_eq!(dsn.pg.get_dbname(), Some("my db"));
        assert_eq!(dsn.pg.get_application_name(), Some("svc"));
        assert_eq!(dsn.tls.mode, SslMode::VerifyFull);
        assert_eq!(dsn.tls.root_cert, Some(RootCert::File("/ca.pem".into())));
        assert_eq!(dsn.pool.max_conns, Some(50));
        assert_eq!(dsn.pool.min_conns, Some(10));
        assert_eq!(dsn.pool.max_conn_lifetime, Some(Duration::from_secs(5400)));
        assert_eq!(dsn.address(), "db1:6432");
    }

    #[test]
    fn keyword_form_with_quotes() {
        let dsn = Dsn::parse(
            r"host=localhost port=5433 user=app password='it''s' dbname = 'a b' options='-c x=\'y\''",
        );
        // libpq does not double quotes; `''` ends and starts a value: an error here.
        assert!(dsn.is_err());
        let dsn = Dsn::parse(r"host=localhost port=5433 user=app password='it\'s' dbname = 'a b'")
            .unwrap();
        assert_eq!(dsn.pg.get_password(), Some(&b"it's"[..]));
        assert_eq!(dsn.pg.get_dbname(), Some("a b"));
        assert_eq!(dsn.pg.get_ports(), &[5433]);
        assert_eq!(dsn.address(), "localhost:5433");
    }

    #[test]
    fn ipv6_hosts() {
        let dsn = Dsn::parse("postgresql://[::1]:5433/db").unwrap();
        assert_eq!(dsn.pg.get_hosts(), &[Host::Tcp("::1".into())]);
        assert_eq!(dsn.address(), "[::1]:5433");
    }

    #[test]
    fn bad_input_names_the_key_and_never_the_password() {
        let cases = [
            ("postgres://u:Secr3tPw@h:abc/db", "port"),
            ("postgres://u:Secr3tPw@h/db?sslmode=sometimes", "sslmode"),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conns=-1",
                "pool_max_conns",
            ),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conn_lifetime=forever",
                "pool_max_conn_lifetime",
            ),
            ("postgres://u:Secr3tPw@h/db?bogus=1", "bogus"),
            (
                "postgres://u:Secr3tPw@h/db?connect_timeout=soon",
                "connect_timeout",
            ),
            ("mysql://u:Secr3tPw@h/db", "scheme"),
            ("host=h password=Secr3tPw port", "port"),
            ("host=h password='Secr3tPw", "password"),
            ("postgres://u:Secr3t%zzPw@h/db", "password"),
        ];
        for (dsn, key) in cases {
            let err = Dsn::parse(dsn).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains(key), "{dsn}: {text}");
            assert!(!text.contains("Secr3t"), "{dsn}: {text}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_dsn("postgres://u:pw@h/db?password=pw2&x=1"),
            "postgres://u:<redacted>@h/db?password=<redacted>&x=1"
        );
        assert_eq!(redact_dsn("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_dsn("password='a b' host=h"),
            "password=<redacted> host=h"
        );
        assert_eq!(redact_dsn("password='oops"), "<unparsable DSN redacted>");
        let dsn = Dsn::parse("postgres://u:topsecret@h/db").unwrap();
        assert!(!format!("{dsn:?}").contains("topsecret"));
    }
}
