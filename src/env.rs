//! `POSTGRES_*` environment variables, then libpq's `PG*` ones, to a DSN
//! and a cluster configuration.
//!
//! Read only when asked (`from_env`, `dsn_from_env`), never behind the
//! user's back. An empty variable counts as unset.

use std::time::Duration;

use crate::config::ClusterBuilder;
use crate::dsn::{SslMode, parse_duration, percent_encode};
use crate::error::{Error, Result};
use crate::limits;

/// The primary's DSN from `POSTGRES_HOST`, `POSTGRES_PORT`, `POSTGRES_USER`,
/// `POSTGRES_PASSWORD` or `POSTGRES_PASSWORD_FILE`, `POSTGRES_DB`,
/// `POSTGRES_SSLMODE` and `POSTGRES_SSLROOTCERT` / `POSTGRES_SSLCERT` /
/// `POSTGRES_SSLKEY`, each falling back to libpq's `PG*` variable
/// (`PGHOST`, `PGPORT`, ...), with libpq's defaults (the Go library's
/// `GetDSN`); see [`ClusterBuilder::from_env`](crate::ClusterBuilder::from_env)
/// for the table.
///
/// The result holds the password: do not log it (see [`redact_dsn`](crate::redact_dsn)).
///
/// ```no_run
/// let dsn = pgxkit::dsn_from_env()?;
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub fn dsn_from_env() -> Result<String> {
    dsn_from_env_with(|key| std::env::var(key).ok())
}

/// [`dsn_from_env`] with the variables looked up through `lookup`, for
/// configuration held elsewhere and for tests.
///
/// ```
/// let dsn = pgxkit::dsn_from_env_with(|key| match key {
///     "POSTGRES_HOST" => Some("db.internal".into()),
///     "POSTGRES_USER" => Some("app".into()),
///     "POSTGRES_SSLMODE" => Some("require".into()),
///     _ => None,
/// })?;
/// assert_eq!(dsn, "postgres://app@db.internal:5432/app?sslmode=require");
/// # Ok::<(), pgxkit::Error>(())
/// ```
pub fn dsn_from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<String> {
    let env = Env(&lookup);
    let conn = Connection::read(&env)?;
    Ok(conn.dsn(&conn.host, conn.port, &conn.user, conn.password.as_deref()))
}

/// Builds a [`ClusterBuilder`] from the environment; see
/// [`ClusterBuilder::from_env_with`].
impl ClusterBuilder {
    /// A builder configured from `POSTGRES_*` environment variables, then
    /// libpq's `PG*` ones, to be adjusted further before `build()`. Read
    /// only when this is called.
    ///
    /// | variable (first set wins) | meaning | default |
    /// |---|---|---|
    /// | `POSTGRES_HOST`, `PGHOST` | primary host | `localhost` |
    /// | `POSTGRES_PORT`, `PGPORT` | port of every node without its own | `5432` |
    /// | `POSTGRES_USER`, `PGUSER` | user | the OS user (`$USER`), else `postgres` |
    /// | `POSTGRES_PASSWORD`, `POSTGRES_PASSWORD_FILE`, `PGPASSWORD` | password; the file's one trailing newline is dropped; not both `POSTGRES_` ones | none: the password file (`passfile`, `PGPASSFILE`, `~/.pgpass`) |
    /// | `POSTGRES_DB`, `PGDATABASE` | database | the user name |
    /// | `POSTGRES_SSLMODE`, `PGSSLMODE` | `disable`, `prefer`, `require`, `verify-ca`, `verify-full` | `prefer` |
    /// | `POSTGRES_SSLROOTCERT`, `PGSSLROOTCERT`; `POSTGRES_SSLCERT`, `PGSSLCERT`; `POSTGRES_SSLKEY`, `PGSSLKEY` | TLS files (libpq's `sslrootcert`, `sslcert`, `sslkey`) | none |
    /// | `POSTGRES_APPLICATION_NAME`, `PGAPPNAME` | `application_name` | `pgxkit` |
    /// | `POSTGRES_CONNECT_TIMEOUT`, `PGCONNECT_TIMEOUT` | connect timeout in seconds (fractions allowed) | 10 |
    /// | `POSTGRES_MAX_CONNS` | [`max_conns`](Self::max_conns) | CPUs, at least 4 |
    /// | `POSTGRES_MIN_CONNS` | [`min_conns`](Self::min_conns) | 0 |
    /// | `POSTGRES_MAX_CONN_LIFETIME` | [`max_conn_lifetime`](Self::max_conn_lifetime), e.g. `1h` | `1h` |
    /// | `POSTGRES_MAX_CONN_IDLE_TIME` | [`max_conn_idle_time`](Self::max_conn_idle_time), e.g. `30m` | `30m` |
    /// | `POSTGRES_HEALTH_CHECK_PERIOD` | [`health_check_period`](Self::health_check_period), e.g. `1m` | `10s` |
    /// | `POSTGRES_NODES` | every node, `host[:port],...`, roles learnt from the servers (see [`nodes`](Self::nodes)); instead of `POSTGRES_HOST` | none |
    /// | `POSTGRES_REPLICA_HOSTS` | replicas, `host[:port],...` | none |
    /// | `POSTGRES_READ_USER`, `POSTGRES_READ_PASSWORD` | replicas' credentials | the primary's |
    ///
    /// An empty variable counts as unset. A bad value is an
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) error naming the variable.
    ///
    /// ```no_run
    /// let cluster = pgxkit::ClusterBuilder::from_env()?.application_name("worker").build()?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn from_env() -> Result<Self> {
        crate::env::builder_from_env(&|key| std::env::var(key).ok())
    }

    /// [`from_env`](Self::from_env) with the variables looked up through
    /// `lookup` instead of the process environment.
    ///
    /// ```
    /// let builder = pgxkit::ClusterBuilder::from_env_with(|key| match key {
    ///     "POSTGRES_HOST" => Some("db-primary".into()),
    ///     "POSTGRES_REPLICA_HOSTS" => Some("db-replica-1,db-replica-2:6432".into()),
    ///     _ => None,
    /// })?;
    /// # Ok::<(), pgxkit::Error>(())
    /// ```
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        builder_from_env(&lookup)
    }
}

pub(crate) fn builder_from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ClusterBuilder> {
    let env = Env(lookup);
    let conn = Connection::read(&env)?;
    let mut builder = ClusterBuilder::default();
    match env.get("POSTGRES_NODES") {
        Some(_) if env.get("POSTGRES_HOST").is_some() => {
            return Err(Error::config(
                "POSTGRES_NODES: set together with POSTGRES_HOST; give the nodes one way",
            ));
        }
        Some(hosts) => {
            for spec in hosts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (host, port) = split_host("POSTGRES_NODES", spec)?;
                builder = builder.node(conn.dsn(
                    host,
                    port.unwrap_or(conn.port),
                    &conn.user,
                    conn.password.as_deref(),
                ));
            }
            if builder.nodes.is_empty() {
                return Err(Error::config("POSTGRES_NODES: no host in the list"));
            }
        }
        None => {
            builder = builder.primary(conn.dsn(
                &conn.host,
                conn.port,
                &conn.user,
                conn.password.as_deref(),
            ));
        }
    }
    let read_user = env
        .get("POSTGRES_READ_USER")
        .unwrap_or_else(|| conn.user.clone());
    let read_password = env
        .get("POSTGRES_READ_PASSWORD")
        .or_else(|| conn.password.clone());
    if let Some(hosts) = env.get("POSTGRES_REPLICA_HOSTS") {
        for spec in hosts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (host, port) = split_host("POSTGRES_REPLICA_HOSTS", spec)?;
            builder = builder.replica(conn.dsn(
                host,
                port.unwrap_or(conn.port),
                &read_user,
                read_password.as_deref(),
            ));
        }
    }
    let key = "POSTGRES_MAX_CONNS";
    builder.pool.max_conns = env
        .parse_u32(key)?
        .map(|n| limits::conns(key, n))
        .transpose()?;
    let key = "POSTGRES_MIN_CONNS";
    builder.pool.min_conns = env
        .parse_u32(key)?
        .map(|n| limits::at_most_conns(key, n))
        .transpose()?;
    builder.pool.max_conn_lifetime = env.positive_duration("POSTGRES_MAX_CONN_LIFETIME")?;
    builder.pool.max_conn_idle_time = env.positive_duration("POSTGRES_MAX_CONN_IDLE_TIME")?;
    builder.pool.health_check_period = env.positive_duration("POSTGRES_HEALTH_CHECK_PERIOD")?;
    Ok(builder)
}

fn split_host<'a>(key: &str, spec: &'a str) -> Result<(&'a str, Option<u16>)> {
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (spec, None),
    };
    let port = port
        .map(|p| {
            p.parse::<u16>().map_err(|_| {
                Error::config(format!(
                    "{key}: invalid port (expected host[:port],host[:port],...)"
                ))
            })
        })
        .transpose()?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, key: &str) -> Option<String> {
        (self.0)(key).filter(|v| !v.is_empty())
    }

    /// The first of `keys` that is set, with its name (for errors).
    fn first(&self, keys: &[&'static str]) -> Option<(&'static str, String)> {
        keys.iter().find_map(|k| self.get(k).map(|v| (*k, v)))
    }

    fn parse_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| {
                v.trim().parse::<u32>().map_err(|_| {
                    Error::config(format!(
                        "{key}: invalid value: not a whole number from 0 to 4294967295"
                    ))
                })
            })
            .transpose()
    }

    /// A Go-style duration greater than zero, within the limits.
    fn positive_duration(&self, key: &str) -> Result<Option<Duration>> {
        self.get(key)
            .map(|v| {
                let d = parse_duration(&v).map_err(|_| {
                    Error::config(format!(
                        "{key}: invalid value: not a duration such as 500ms, 30s, 5m or 1h"
                    ))
                })?;
                limits::positive(key, d)
            })
            .transpose()
    }
}

/// The connection part of the environment, with libpq's defaults.
struct Connection {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    db: String,
    sslmode: SslMode,
    /// Further DSN keys: TLS files, application name, connect timeout.
    params: Vec<(&'static str, String)>,
}

impl Connection {
    fn read(env: &Env<'_>) -> Result<Self> {
        let host = env
            .first(&["POSTGRES_HOST", "PGHOST"])
            .map_or_else(|| "localhost".to_owned(), |(_, v)| v);
        let port = match env.first(&["POSTGRES_PORT", "PGPORT"]) {
            Some((key, p)) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| Error::config(format!("{key}: invalid value: not a port number")))?,
            None => 5432,
        };
        // libpq's default user is the OS user; its default database, the user.
        let user = env
            .first(&["POSTGRES_USER", "PGUSER"])
            .map(|(_, v)| v)
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "postgres".to_owned());
        let password = match (
            env.get("POSTGRES_PASSWORD"),
            env.get("POSTGRES_PASSWORD_FILE"),
        ) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "POSTGRES_PASSWORD_FILE: both POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are set; set one",
                ));
            }
            (Some(p), None) => Some(p),
            (None, Some(path)) => Some(read_password_file(&path)?),
            (None, None) => env.get("PGPASSWORD"),
        };
        let db = env
            .first(&["POSTGRES_DB", "PGDATABASE"])
            .map_or_else(|| user.clone(), |(_, v)| v);
        let sslmode = match env.first(&["POSTGRES_SSLMODE", "PGSSLMODE"]) {
            Some((key, mode)) => mode.parse::<SslMode>().map_err(|e| e.context(key))?,
            None => SslMode::Prefer,
        };
        let mut params: Vec<(&'static str, String)> = [
            ("sslrootcert", ["POSTGRES_SSLROOTCERT", "PGSSLROOTCERT"]),
            ("sslcert", ["POSTGRES_SSLCERT", "PGSSLCERT"]),
            ("sslkey", ["POSTGRES_SSLKEY", "PGSSLKEY"]),
            (
                "application_name",
                ["POSTGRES_APPLICATION_NAME", "PGAPPNAME"],
            ),
        ]
        .into_iter()
        .filter_map(|(key, vars)| env.first(&vars).map(|(_, v)| (key, v)))
        .collect();
        if let Some((key, secs)) = env.first(&["POSTGRES_CONNECT_TIMEOUT", "PGCONNECT_TIMEOUT"]) {
            // Checked here so the error names the variable, not the DSN key.
            let valid = secs.trim().parse::<f64>().is_ok_and(f64::is_finite);
            if !valid {
                return Err(Error::config(format!(
                    "{key}: invalid value: not a number of seconds"
                )));
            }
            params.push(("connect_timeout", secs.trim().to_owned()));
        }
        Ok(Connection {
            host,
            port,
            user,
            password,
            db,
            sslmode,
            params,
        })
    }

    fn dsn(&self, host: &str, port: u16, user: &str, password: Option<&str>) -> String {
        let credentials = match password {
            Some(p) => format!("{}:{}", percent_encode(user), percent_encode(p)),
            None => percent_encode(user),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            percent_encode(host)
        };
        let mut dsn = format!(
            "postgres://{credentials}@{host}:{port}/{}?sslmode={}",
            percent_encode(&self.db),
            self.sslmode
        );
        for (key, value) in &self.params {
            dsn.push_str(&format!("&{key}={}", percent_encode(value)));
        }
        dsn
    }
}

fn read_password_file(path: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("POSTGRES_PASSWORD_FILE: cannot read {path}")).with_source(e)
    })?;
    // Secrets mounted from files usually end with a newline that is not part of them.
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}
