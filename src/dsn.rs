//! DSN parsing: URL (`postgres://user:pw@host:port/db?k=v`) and libpq
//! key=value (`host=db port=5432 user=app`) forms. pgxkit reads its own keys
//! (`pool_*`, the TLS keys, the password) and hands the driver's keys to
//! `postgres::Config`; a libpq key neither implements is an error. Redaction.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::limits;

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
    ///
    /// ```
    /// assert_eq!(pgxkit::SslMode::VerifyFull.as_str(), "verify-full");
    /// ```
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
            _ => {
                return Err(Error::config(
                    "sslmode: unknown mode (expected disable, prefer, require, verify-ca or verify-full)",
                ));
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
    /// `passfile`: where to look for a password the DSN does not give.
    pub(crate) passfile: Option<PathBuf>,
}

/// The keys pgxkit reads itself; everything in [`DRIVER_KEYS`] goes to
/// `postgres::Config`.
const OWN_KEYS: &[(&str, OwnKey)] = &[
    ("password", OwnKey::Password),
    ("connect_timeout", OwnKey::ConnectTimeout),
    ("tcp_user_timeout", OwnKey::TcpUserTimeout),
    ("keepalives_count", OwnKey::KeepalivesCount),
    ("fallback_application_name", OwnKey::FallbackApplicationName),
    ("passfile", OwnKey::Passfile),
    ("sslmode", OwnKey::Sslmode),
    ("sslrootcert", OwnKey::Sslrootcert),
    ("sslcert", OwnKey::Sslcert),
    ("sslkey", OwnKey::Sslkey),
    ("pool_max_conns", OwnKey::PoolMaxConns),
    ("pool_min_conns", OwnKey::PoolMinConns),
    ("pool_max_conn_lifetime", OwnKey::PoolMaxConnLifetime),
    (
        "pool_max_conn_lifetime_jitter",
        OwnKey::PoolMaxConnLifetimeJitter,
    ),
    ("pool_max_conn_idle_time", OwnKey::PoolMaxConnIdleTime),
    ("pool_health_check_period", OwnKey::PoolHealthCheckPeriod),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnKey {
    Password,
    ConnectTimeout,
    TcpUserTimeout,
    KeepalivesCount,
    FallbackApplicationName,
    Passfile,
    Sslmode,
    Sslrootcert,
    Sslcert,
    Sslkey,
    PoolMaxConns,
    PoolMinConns,
    PoolMaxConnLifetime,
    PoolMaxConnLifetimeJitter,
    PoolMaxConnIdleTime,
    PoolHealthCheckPeriod,
}

/// The keys handed to the driver as they are, with what a valid value is.
const DRIVER_KEYS: &[(&str, &str)] = &[
    ("host", "a host name or socket directory, or a list of them"),
    ("hostaddr", "an IP address, or a list of them"),
    ("port", "a port number, or a list of them"),
    ("user", "a user name"),
    ("dbname", "a database name"),
    ("options", "server options"),
    ("application_name", "a name"),
    ("keepalives", "0 or 1"),
    ("keepalives_idle", "a whole number of seconds"),
    ("keepalives_interval", "a whole number of seconds"),
    ("keepalives_retries", "a whole number"),
    ("target_session_attrs", "any, read-write or read-only"),
    ("channel_binding", "disable, prefer or require"),
    ("load_balance_hosts", "disable or random"),
];

/// libpq keys neither pgxkit nor the driver implements: an error that says
/// so, rather than a setting silently ignored.
const UNSUPPORTED_KEYS: &[&str] = &[
    "service",
    "servicefile",
    "gssencmode",
    "gsslib",
    "gssdelegation",
    "krbsrvname",
    "sslnegotiation",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslpassword",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
    "requirepeer",
    "require_auth",
    "client_encoding",
    "replication",
];

impl Dsn {
    /// Parses a DSN in URL or key=value form. An error names the key (or
    /// the position of what could not be read) and never repeats DSN text.
    #[cfg(test)]
    pub(crate) fn parse(dsn: &str) -> Result<Dsn> {
        let (driver, own) = parts(dsn)?;
        Dsn::from_parts(&driver, own)
    }

    /// Parses a DSN as [`parse`](Self::parse) does, into one `Dsn` per
    /// host it lists (`host=a,b` or `postgres://a,b/db`), each with that
    /// host's port and address and everything else the DSN says, without
    /// `target_session_attrs` and `load_balance_hosts`: each becomes a node
    /// of its own, whose role the cluster learns.
    pub(crate) fn parse_each_host(dsn: &str) -> Result<Vec<Dsn>> {
        let (driver, own) = parts(dsn)?;
        let list = |key: &str| -> Vec<String> {
            driver
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.split(',').map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let (hosts, addrs, ports) = (list("host"), list("hostaddr"), list("port"));
        let n = hosts.len().max(addrs.len());
        if n <= 1 {
            return Ok(vec![Dsn::from_parts(&driver, own)?]);
        }
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(Error::config(format!(
                "hostaddr: {} addresses for {} hosts (give one per host)",
                addrs.len(),
                hosts.len()
            )));
        }
        if ports.len() > 1 && ports.len() != n {
            return Err(Error::config(format!(
                "port: {} ports for {n} hosts (give one, or one per host)",
                ports.len()
            )));
        }
        (0..n)
            .map(|i| {
                let mut one: Vec<(&'static str, String)> = driver
                    .iter()
                    .filter(|(k, _)| {
                        !matches!(
                            *k,
                            "host"
                                | "hostaddr"
                                | "port"
                                | "target_session_attrs"
                                | "load_balance_hosts"
                        )
                    })
                    .cloned()
                    .collect();
                for (key, values) in [("host", &hosts), ("hostaddr", &addrs)] {
                    if let Some(v) = values.get(i) {
                        one.push((key, v.clone()));
                    }
                }
                if let Some(port) = ports.get(i).or(ports.first()) {
                    one.push(("port", port.clone()));
                }
                Dsn::from_parts(&one, own.clone())
            })
            .collect()
    }

    fn from_parts(driver: &[(&'static str, String)], own: Own) -> Result<Dsn> {
        let mut out = Dsn {
            pg: driver_config(driver)?,
            pool: PoolOverrides::default(),
            tls: TlsSettings::default(),
            passfile: None,
        };
        own.apply(&mut out)?;
        Ok(out)
    }
}

/// A DSN's keys: the driver's (each once, its last value) and pgxkit's own.
fn parts(dsn: &str) -> Result<(Vec<(&'static str, String)>, Own)> {
    let (pairs, first_query) = split(dsn.trim())?;
    // libpq: a key given twice takes its last value.
    let mut driver: Vec<(&'static str, String)> = Vec::new();
    let mut own = Own::default();
    for (index, (key, value)) in pairs.into_iter().enumerate() {
        if let Some(&(name, own_key)) = OWN_KEYS.iter().find(|(k, _)| *k == key) {
            own.set(name, own_key, value);
        } else if let Some(&(driver_key, _)) = DRIVER_KEYS.iter().find(|(k, _)| *k == key) {
            if driver_key == "host" && !plain_hosts(&value) {
                return Err(Error::config(
                    "host: not a host name, IP address or socket directory \
                         (is a quote misplaced?)",
                ));
            }
            driver.retain(|(k, _)| *k != driver_key);
            driver.push((driver_key, value));
        } else if let Some(unsupported) = UNSUPPORTED_KEYS.iter().find(|k| **k == key) {
            return Err(Error::config(format!(
                "{unsupported}: a libpq key that pgxkit does not support"
            )));
        } else {
            let place = match first_query {
                Some(first) => format!("query parameter {}", index.saturating_sub(first) + 1),
                None => format!("parameter {}", index + 1),
            };
            return Err(unknown_key(&place, &key));
        }
    }
    Ok((driver, own))
}

impl Dsn {
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

/// Whether a `host` value is a list of host names, IP addresses or socket
/// directories: nothing with whitespace, `=`, quotes or `@`, which a
/// misplaced quote would sweep in from the pairs after it (the password
/// among them), and which no host has.
fn plain_hosts(value: &str) -> bool {
    !value
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '=' | '\'' | '"' | '@'))
        && value
            .split(',')
            .all(|host| !host.contains('/') || host.starts_with('/'))
}

/// The values of pgxkit's own keys, applied after the driver's (the last
/// of each wins).
#[derive(Default, Clone)]
struct Own(Vec<(&'static str, OwnKey, String)>);

impl Own {
    fn set(&mut self, name: &'static str, key: OwnKey, value: String) {
        self.0.retain(|(_, k, _)| *k != key);
        self.0.push((name, key, value));
    }

    fn apply(self, out: &mut Dsn) -> Result<()> {
        let mut application_name_set = out.pg.get_application_name().is_some();
        for (key, which, value) in self.0 {
            let pg = &mut out.pg;
            match which {
                OwnKey::Password => {
                    pg.password(value);
                }
                OwnKey::ConnectTimeout => {
                    // libpq: seconds, zero or negative for none (we keep
                    // our default then: nothing waits unbounded).
                    let secs: f64 = value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite())
                        .ok_or_else(|| invalid(key, "not a number of seconds"))?;
                    if secs > 0.0 {
                        let d = Duration::try_from_secs_f64(secs)
                            .map_err(|_| invalid(key, "too long"))?;
                        pg.connect_timeout(limits::positive(key, d)?);
                    }
                }
                OwnKey::TcpUserTimeout => {
                    // libpq: milliseconds (the driver's own parser reads seconds).
                    let ms: u64 = value
                        .trim()
                        .parse()
                        .map_err(|_| invalid(key, "not a whole number of milliseconds"))?;
                    if ms > 0 {
                        pg.tcp_user_timeout(limits::socket_timeout(
                            key,
                            Duration::from_millis(ms),
                        )?);
                    }
                }
                OwnKey::KeepalivesCount => {
                    pg.keepalives_retries(parse_u32(key, &value)?);
                }
                OwnKey::FallbackApplicationName => {
                    if !application_name_set {
                        pg.application_name(&value);
                        application_name_set = true;
                    }
                }
                OwnKey::Passfile => out.passfile = Some(PathBuf::from(value)),
                OwnKey::Sslmode => out.tls.mode = value.parse()?,
                OwnKey::Sslrootcert => {
                    out.tls.root_cert = Some(if value == "system" {
                        RootCert::System
                    } else {
                        RootCert::File(PathBuf::from(value))
                    });
                }
                OwnKey::Sslcert => out.tls.cert = Some(PathBuf::from(value)),
                OwnKey::Sslkey => out.tls.key = Some(PathBuf::from(value)),
                OwnKey::PoolMaxConns => {
                    out.pool.max_conns = Some(limits::conns(key, parse_u32(key, &value)?)?)
                }
                OwnKey::PoolMinConns => {
                    out.pool.min_conns = Some(limits::at_most_conns(key, parse_u32(key, &value)?)?)
                }
                OwnKey::PoolMaxConnLifetime => {
                    out.pool.max_conn_lifetime =
                        Some(limits::positive(key, parse_duration_key(key, &value)?)?)
                }
                OwnKey::PoolMaxConnLifetimeJitter => {
                    out.pool.max_conn_lifetime_jitter =
                        Some(limits::duration(key, parse_duration_key(key, &value)?)?)
                }
                OwnKey::PoolMaxConnIdleTime => {
                    out.pool.max_conn_idle_time =
                        Some(limits::positive(key, parse_duration_key(key, &value)?)?)
                }
                OwnKey::PoolHealthCheckPeriod => {
                    out.pool.health_check_period =
                        Some(limits::positive(key, parse_duration_key(key, &value)?)?)
                }
            }
        }
        Ok(())
    }
}

/// The driver's config from the keys it implements, each value quoted as
/// libpq's key=value form wants. A value the driver refuses is reported
/// by its key, never by its text.
fn driver_config(pairs: &[(&'static str, String)]) -> Result<postgres::Config> {
    let quoted = |(key, value): &(&'static str, String)| {
        format!(
            "{key}='{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        )
    };
    let text = pairs.iter().map(quoted).collect::<Vec<_>>().join(" ");
    if let Ok(config) = text.parse::<postgres::Config>() {
        return Ok(config);
    }
    // Find which one: each alone.
    for pair in pairs {
        if quoted(pair).parse::<postgres::Config>().is_err() {
            let what = DRIVER_KEYS
                .iter()
                .find(|(k, _)| *k == pair.0)
                .map_or("a valid value", |(_, what)| *what);
            return Err(invalid(pair.0, &format!("expected {what}")));
        }
    }
    Err(Error::config(
        "the driver refused the combination of connection keys",
    ))
}

/// An unknown key, named only when it is close to one we know (it could be
/// a piece of a mistyped password otherwise).
fn unknown_key(place: &str, key: &str) -> Error {
    let known = OWN_KEYS
        .iter()
        .map(|(k, _)| k)
        .chain(DRIVER_KEYS.iter().map(|(k, _)| k))
        .chain(UNSUPPORTED_KEYS);
    let suggestion = known
        .map(|k| (edit_distance(k, key), *k))
        .filter(|(d, k)| *d <= 2 && *d < k.len() / 2)
        .min();
    match suggestion {
        Some((_, k)) => Error::config(format!("unknown key in {place} (did you mean `{k}`?)")),
        None => Error::config(format!(
            "unknown key in {place} (keys are libpq's, such as host or sslmode, or pgxkit's pool_*)"
        )),
    }
}

/// Levenshtein distance, for suggesting a key.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// A key whose value is wrong; the value itself is never repeated (in a
/// malformed DSN it can be a piece of the password).
fn invalid(key: &str, why: &str) -> Error {
    Error::config(format!("{key}: invalid value: {why}"))
}

fn parse_u32(key: &str, value: &str) -> Result<u32> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, "not a whole number from 0 to 4294967295"))
}

fn parse_duration_key(key: &str, value: &str) -> Result<Duration> {
    parse_duration(value).map_err(|_| invalid(key, "not a duration such as 500ms, 30s, 5m or 1h"))
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

/// Pairs of key and value, and for a URL the index of the first pair from
/// its query string.
type Pairs = (Vec<(String, String)>, Option<usize>);

/// Splits a DSN into key/value pairs: a URL (`postgres://` or
/// `postgresql://`) or libpq's key=value form.
fn split(dsn: &str) -> Result<Pairs> {
    if let Some(rest) = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
    {
        return url_pairs(rest);
    }
    let scheme_like = dsn.find(':').is_some_and(|i| {
        i > 0
            && dsn[..i]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
    });
    if dsn.contains("://") || (scheme_like && !dsn[..dsn.find(':').unwrap_or(0)].contains('=')) {
        return Err(Error::config(
            "not a postgres:// or postgresql:// URL, and not key=value pairs",
        ));
    }
    Ok((keyword_pairs(dsn)?, None))
}

/// Splits what follows a URL's `postgres://` into key/value pairs
/// (percent-decoded).
fn url_pairs(after_scheme: &str) -> Result<Pairs> {
    let (before_query, query) = match after_scheme.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (after_scheme, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], Some(&before_query[i + 1..])),
        None => (before_query, None),
    };
    if path.is_some_and(|p| p.contains('@')) {
        // `user:pa/ss@host`: the `/` cut the password, which would then be
        // read as a host and port.
        return Err(Error::config(
            "an `@` after the first `/`: write `/` in a user name or password as %2F, \
             and `@` in a database name as %40",
        ));
    }
    let mut pairs = Vec::new();
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_owned(), decode("the user name", user)?));
            }
            if let Some(password) = password {
                pairs.push(("password".to_owned(), decode("the password", password)?));
            }
            hosts
        }
        None => authority,
    };
    let (mut host_list, mut port_list) = (Vec::new(), Vec::new());
    for spec in hosts.split(',').filter(|s| !s.is_empty()) {
        let (host, port) = split_host_port(spec)?;
        let bracketed = spec.starts_with('[');
        let host_ok = host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b"-._~%".contains(&b) || (bracketed && b == b':')
        });
        if !host_ok {
            return Err(Error::config(
                "host: not a host name, IP address or %-encoded socket directory \
                 (write `:`, `/` or `@` in a password as %3A, %2F, %40)",
            ));
        }
        let host = decode("a host", host)?;
        if !plain_hosts(&host) {
            return Err(Error::config(
                "host: not a host name, IP address or socket directory \
                 (is an `@` missing after the password?)",
            ));
        }
        host_list.push(host);
        port_list.push(decode("a port", port.unwrap_or("5432"))?);
    }
    if !host_list.is_empty() {
        pairs.push(("host".to_owned(), host_list.join(",")));
        pairs.push(("port".to_owned(), port_list.join(",")));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".to_owned(), decode("the database name", db)?));
    }
    let first_query = pairs.len();
    for (n, param) in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| Error::config(format!("query parameter {} has no `=`", n + 1)))?;
        let key = decode("a query parameter name", key)?;
        let value = decode("a query parameter value", value)?;
        pairs.push((key, value));
    }
    Ok((pairs, Some(first_query)))
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

/// Percent-decodes one part of a URL; the error says which part, never its text.
fn decode(what: &str, s: &str) -> Result<String> {
    percent_decode(s).ok_or_else(|| Error::config(format!("invalid percent-encoding in {what}")))
}

/// Strict where the `percent-encoding` crate is lenient: a `%` not
/// followed by two hex digits is an error, not kept as it is; so is a
/// result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

/// What a URL component keeps as it is: RFC 3986's unreserved characters.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a URL component (everything but unreserved characters).
pub(crate) fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Splits a libpq key=value DSN into pairs, honouring single quotes and
/// backslash escapes. Errors name a key only once it is known to be one
/// (it ended at `=`) and otherwise say which word could not be read.
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
            return Err(Error::config(format!(
                "word {} is not a key=value pair (a URL starts with postgres://)",
                pairs.len() + 1
            )));
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
                        None => return Err(unterminated(pairs.len(), &key)),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(unterminated(pairs.len(), &key)),
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
                        None => return Err(unterminated(pairs.len(), &key)),
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn unterminated(index: usize, key: &str) -> Error {
    if is_known_key(key) {
        Error::config(format!("{key}: unterminated quoted value"))
    } else {
        Error::config(format!(
            "the value of parameter {} is an unterminated quoted string",
            index + 1
        ))
    }
}

/// A DSN with its password replaced by `<redacted>`, for logs and messages.
///
/// In a URL everything between `://` and the last `@` is hidden (the user
/// name too: in a malformed URL it can hold the password), and so is an
/// authority that is not plainly `host[:port]`. Only known keys are shown
/// with their values (`password` never); anything else is `<redacted>`. A
/// key=value string that cannot be read is redacted whole.
///
/// ```
/// assert_eq!(
///     pgxkit::redact_dsn("postgres://app:s3cret@db:5432/app?sslmode=require"),
///     "postgres://<redacted>@db:5432/app?sslmode=require"
/// );
/// assert_eq!(
///     pgxkit::redact_dsn("postgres://app:s3cret/PW@db/app"),
///     "postgres://<redacted>@db/app"
/// );
/// assert_eq!(
///     pgxkit::redact_dsn("host=db password='s3 cret' user=app"),
///     "host=db password=<redacted> user=app"
/// );
/// ```
#[must_use]
pub fn redact_dsn(dsn: &str) -> String {
    let trimmed = dsn.trim();
    let scheme_end = trimmed.find("://").filter(|&end| {
        let scheme = &trimmed[..end];
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if let Some(scheme_end) = scheme_end {
        let (scheme, rest) = trimmed.split_at(scheme_end + 3);
        let (credentials, rest) = match rest.rfind('@') {
            Some(at) => ("<redacted>@", &rest[at + 1..]),
            None => ("", rest),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) =
            before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
        // Shown only when plainly `host[:port],...` and `/dbname`: in a
        // mangled URL either can hold a piece of the password.
        let plain_hosts = authority
            .split(',')
            .all(|spec| match split_host_port(spec) {
                Ok((host, port)) => {
                    host.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || b"-._".contains(&b)
                            || (spec.starts_with('[') && b == b':')
                    }) && port
                        .is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                }
                Err(_) => false,
            });
        let authority = if plain_hosts { authority } else { "<redacted>" };
        let plain_path = plain_hosts
            && path
                .get(1..)
                .unwrap_or("")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b));
        let path = if plain_path { path } else { "/<redacted>" };
        let mut out = format!("{scheme}{credentials}{authority}{path}");
        if let Some(q) = query {
            let shown: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, value)) if shown(key, value) => format!("{key}={value}"),
                    Some((key, _)) if is_known_key(key) => format!("{key}=<redacted>"),
                    _ => "<redacted>".to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&shown.join("&"));
        }
        return out;
    }
    match keyword_pairs(trimmed) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if k == "password" {
                    "password=<redacted>".to_owned()
                } else if !is_known_key(&k) {
                    "<redacted>".to_owned()
                } else if !shown(&k, &v) {
                    format!("{k}=<redacted>")
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

/// Whether `redact_dsn` shows a pair: a key we know, other than the
/// password, whose value does not look like two pairs run together (an
/// `=` outside `options`, or the word "password" anywhere), which a missing
/// space or `&` makes of `user=app password=...`.
fn shown(key: &str, value: &str) -> bool {
    key != "password"
        && is_known_key(key)
        && (key == "options" || !value.contains('='))
        && !value.to_ascii_lowercase().contains("password")
}

/// One of the keys pgxkit, the driver or libpq knows (safe to name).
fn is_known_key(key: &str) -> bool {
    OWN_KEYS.iter().any(|(k, _)| *k == key)
        || DRIVER_KEYS.iter().any(|(k, _)| *k == key)
        || UNSUPPORTED_KEYS.contains(&key)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b%C3%A9").as_deref(), Some("a b\u{e9}"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        for bad in ["%", "%4", "%zz", "a%g1", "%e9", "%C3"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
        assert_eq!(percent_encode("a b/é~-._"), "a%20b%2F%C3%A9~-._");
    }

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
            ("postgres://u:Secr3tPw@h:99999/db", "port"),
            ("postgres://u:Secr3tPw@h/db?sslmode=sometimes", "sslmode"),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conns=-1",
                "pool_max_conns",
            ),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conns=0",
                "pool_max_conns",
            ),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conns=4294967295",
                "pool_max_conns",
            ),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conn_lifetime=forever",
                "pool_max_conn_lifetime",
            ),
            (
                "postgres://u:Secr3tPw@h/db?pool_max_conn_lifetime=100000h",
                "pool_max_conn_lifetime",
            ),
            (
                "postgres://u:Secr3tPw@h/db?sslmode=require&bogus=1",
                "query parameter 2",
            ),
            (
                "postgres://u:Secr3tPw@h/db?sslmod=require",
                "did you mean `sslmode`",
            ),
            (
                "postgres://u:Secr3tPw@h/db?connect_timeout=soon",
                "connect_timeout",
            ),
            ("postgres://u:Secr3tPw@h/db?passfile=x&service=a", "service"),
            (
                "postgres://u:Secr3tPw@h/db?gssencmode=disable",
                "not support",
            ),
            (
                "postgres://u:Secr3tPw@h/db?target_session_attrs=primary",
                "target_session_attrs",
            ),
            ("mysql://u:Secr3tPw@h/db", "postgres://"),
            ("host=h password=Secr3tPw port", "word 3"),
            ("host=h password='Secr3tPw", "password: unterminated"),
            ("postgres://u:Secr3t%zzPw@h/db", "password"),
            ("postgres://u:Secr3tPw%4@h/db", "password"),
            ("postgres://u:Secr3tPw%e9@h/db", "password"),
            // From the issue: a typo'd scheme, no scheme, a `/` in the password.
            ("postgres:app:Secr3tPW@localhost/app", "postgres://"),
            ("app:Secr3tPW@localhost", "key=value"),
            ("postgres://app:Secr3t/PW@localhost/app", "%2F"),
            ("postgres:/app:Secr3tPW@h/db?sslmode", "postgres://"),
            // Found by tests/secrets.rs: a quote after `host=` swept the
            // rest, password and all, into the host (shown as the node's
            // address).
            (
                "host='127.0.0.1 port=1 user=app password=//Secr3tPW/' dbname=app",
                "host",
            ),
            // And a URL with neither `:` nor `@` around the password (a
            // socket directory is absolute; a host has no `/`).
            ("postgresql://appSecr3tPW%2F127.0.0.1:1/app", "host"),
        ];
        for (dsn, key) in cases {
            let err = Dsn::parse(dsn).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains(key), "{dsn}: {text}");
            assert!(!text.contains("Secr3t"), "{dsn}: {text}");
        }
    }

    #[test]
    fn the_drivers_own_keys_pass_through() {
        use postgres::config::{LoadBalanceHosts, TargetSessionAttrs};
        let dsn = Dsn::parse(
            "postgres://u@h1,h2/db?target_session_attrs=read-only&load_balance_hosts=random\
             &connect_timeout=2.5&keepalives_count=4&tcp_user_timeout=1500",
        )
        .unwrap();
        assert_eq!(
            dsn.pg.get_target_session_attrs(),
            TargetSessionAttrs::ReadOnly
        );
        assert_eq!(dsn.pg.get_load_balance_hosts(), LoadBalanceHosts::Random);
        assert_eq!(
            dsn.pg.get_connect_timeout(),
            Some(&Duration::from_millis(2500))
        );
        assert_eq!(dsn.pg.get_keepalives_retries(), Some(4));
        assert_eq!(
            dsn.pg.get_tcp_user_timeout(),
            Some(&Duration::from_millis(1500))
        );
        // libpq: the last of a key given twice wins.
        let dsn = Dsn::parse("host=a port=1 port=2 application_name=x fallback_application_name=y")
            .unwrap();
        assert_eq!(dsn.pg.get_ports(), &[2]);
        assert_eq!(dsn.pg.get_application_name(), Some("x"));
        let dsn = Dsn::parse("host=a fallback_application_name=y").unwrap();
        assert_eq!(dsn.pg.get_application_name(), Some("y"));
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_dsn("postgres://u:pw@h/db?password=pw2&sslmode=require"),
            "postgres://<redacted>@h/db?password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_dsn("postgres://u@h/db"),
            "postgres://<redacted>@h/db"
        );
        assert_eq!(redact_dsn("postgres://h:5433/db"), "postgres://h:5433/db");
        assert_eq!(
            redact_dsn("password='a b' host=h"),
            "password=<redacted> host=h"
        );
        assert_eq!(redact_dsn("password='oops"), "<unparsable DSN redacted>");
        // From the issue: a `/` in the password, a missing `@`, a key typo.
        assert_eq!(
            redact_dsn("postgres://app:s3cret/PW@localhost/app"),
            "postgres://<redacted>@localhost/app"
        );
        assert_eq!(
            redact_dsn("postgres://app:s3cret/app"),
            "postgres://<redacted>/<redacted>"
        );
        assert_eq!(redact_dsn("host=h passwd=s3cret"), "host=h <redacted>");
        assert_eq!(
            redact_dsn("postgres://h/db?x&passwd=s3cret"),
            "postgres://h/db?<redacted>&<redacted>"
        );
        let dsn = Dsn::parse("postgres://u:topsecret@h/db").unwrap();
        assert!(!format!("{dsn:?}").contains("topsecret"));
    }
}
