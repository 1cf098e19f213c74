//! No input leaks the password or brings the process down: DSNs built around
//! a known password, then mangled at random (typo'd schemes, a missing `@`,
//! stray `/`, `?`, `#`, `%`, quotes, unicode, duplicate keys, huge numbers),
//! through `build()`, `redact_dsn`, the builder's `Debug` and `from_env_with`.
//!
//! 20,000 cases each by default (CI); `PGXKIT_PROPTEST_CASES=1000000` for a
//! long local run. Nothing here connects anywhere: the primary is lazy and
//! replicas from the environment are IP literals on closed loopback ports.

use std::collections::HashMap;
use std::error::Error as _;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use pgxkit::{Cluster, ClusterBuilder, redact_dsn};

/// What must never be shown. Mutations may cut into it; the check then
/// covers what is left of the password around the cut.
const CANARY: &str = "Zq7Xk9Wm";

fn cases() -> u32 {
    std::env::var("PGXKIT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

const SPECIALS: &[char] = &[
    '/', '@', ':', '?', '#', '%', '&', '=', '\'', ' ', '\\', ',', '[', ']', 'é', '😀', '+', '!',
];

fn password() -> impl Strategy<Value = String> {
    let piece = || proptest::collection::vec(proptest::sample::select(SPECIALS), 0..3);
    (piece(), piece()).prop_map(|(a, b)| {
        let mut pw: String = a.into_iter().collect();
        pw.push_str(CANARY);
        pw.extend(b);
        pw
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Query parameters or key=value pairs, some valid, some not.
fn extras() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::collection::vec(
        proptest::sample::select(vec![
            "sslmode=disable",
            "sslmode=require",
            "sslmode=bogus",
            "pool_max_conns=4294967295",
            "pool_max_conns=0",
            "pool_max_conns=3",
            "pool_min_conns=99999",
            "pool_max_conn_lifetime=9999999h",
            "pool_max_conn_lifetime=1h",
            "pool_health_check_period=0",
            "connect_timeout=2.5",
            "connect_timeout=1e300",
            "connect_timeout=-1",
            "tcp_user_timeout=99999999999",
            "keepalives_idle=99999999999999",
            "target_session_attrs=read-only",
            "load_balance_hosts=random",
            "application_name=x",
            "port=99999",
            "port=1",
            "host=127.0.0.1",
            "hostaddr=300.1.1.1",
            "service=x",
            "nonsense=1",
            "sslrootcert=/nonexistent/ca.pem",
            "sslkey=/nonexistent/k.pem",
            "password=",
        ]),
        0..4,
    )
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize),
    Insert(usize, char),
    Duplicate(usize, usize),
    Swap(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), proptest::sample::select(SPECIALS)).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<usize>(), 1usize..12).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        any::<usize>().prop_map(Edit::Swap),
    ];
    proptest::collection::vec(edit, 0..3)
}

fn apply(dsn: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = dsn.chars().collect();
    for edit in edits {
        if chars.is_empty() {
            break;
        }
        let n = chars.len();
        match *edit {
            Edit::Delete(i) => {
                chars.remove(i % n);
            }
            Edit::Insert(i, c) => chars.insert(i % (n + 1), c),
            Edit::Duplicate(i, len) => {
                let start = i % n;
                let piece: Vec<char> = chars[start..(start + len).min(n)].to_vec();
                let at = (start + len).min(n);
                chars.splice(at..at, piece);
            }
            Edit::Swap(i) if n >= 2 => chars.swap(i % (n - 1), i % (n - 1) + 1),
            Edit::Swap(_) => {}
        }
    }
    chars.into_iter().collect()
}

fn dsn() -> impl Strategy<Value = String> {
    let scheme = proptest::sample::select(vec![
        "postgres://",
        "postgresql://",
        "postgres:",
        "postgres:/",
        "postgresql//",
        "mysql://",
        "",
    ]);
    let hosts = proptest::sample::select(vec![
        "127.0.0.1:1",
        "[::1]:1",
        "h1:1,h2:2",
        "127.0.0.1:99999",
        "127.0.0.1",
        "",
    ]);
    let url = (scheme, password(), any::<bool>(), hosts, extras()).prop_map(
        |(scheme, pw, encode, hosts, extras)| {
            let pw = if encode { percent_encode(&pw) } else { pw };
            let query = if extras.is_empty() {
                String::new()
            } else {
                format!("?{}", extras.join("&"))
            };
            format!("{scheme}app:{pw}@{hosts}/app{query}")
        },
    );
    let keyword = (password(), any::<bool>(), extras()).prop_map(|(pw, quote, extras)| {
        let pw = if quote {
            format!("'{}'", pw.replace('\\', "\\\\").replace('\'', "\\'"))
        } else {
            pw
        };
        format!(
            "host=127.0.0.1 port=1 user=app password={pw} dbname=app {}",
            extras.join(" ")
        )
    });
    (prop_oneof![url, keyword], edits()).prop_map(|(dsn, edits)| apply(&dsn, &edits))
}

/// The password's canary must be in none of `shown`.
fn assert_hidden(input: &str, shown: &[String]) -> Result<(), TestCaseError> {
    for text in shown {
        prop_assert!(
            !text.contains(CANARY),
            "password shown for {input:?}: {text}"
        );
    }
    Ok(())
}

/// Every `Display` and `Debug` of an error and its sources.
fn error_texts(err: &pgxkit::Error) -> Vec<String> {
    let mut texts = vec![err.to_string(), format!("{err:?}")];
    let mut source = err.source();
    while let Some(s) = source {
        texts.push(s.to_string());
        texts.push(format!("{s:?}"));
        source = s.source();
    }
    texts
}

/// What a build shows: (error texts, everything else: the builder's
/// `Debug`, the cluster's, its stats and health).
fn built_texts(builder: ClusterBuilder) -> (Vec<String>, Vec<String>) {
    let mut shown = vec![format!("{builder:?}")];
    let mut errors = Vec::new();
    match builder.lazy_connect(true).build() {
        Ok(cluster) => {
            shown.push(format!("{cluster:?}"));
            shown.push(format!("{:?}", cluster.stats()));
            shown.push(format!("{:?}", cluster.health()));
        }
        Err(e) => errors.extend(error_texts(&e)),
    }
    (errors, shown)
}

#[test]
fn no_dsn_shows_its_password_or_panics() {
    runner()
        .run(&dsn(), |dsn| {
            let (errors, mut shown) = built_texts(Cluster::builder().primary(dsn.clone()));
            shown.push(redact_dsn(&dsn));
            // Errors never repeat DSN text at all.
            assert_hidden(&dsn, &errors)?;
            // Elsewhere a URL's hosts are shown, and they are what follows
            // the last `@` (documented): when a mutation left the password
            // there, nothing can tell it from a host name.
            let host_is_password = dsn.contains("://")
                && dsn
                    .rsplit_once('@')
                    .is_some_and(|(_, after)| after.contains(CANARY));
            if !host_is_password {
                assert_hidden(&dsn, &shown)?;
            }
            Ok(())
        })
        .unwrap();
}

fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "",
            "0",
            "-1",
            "4294967295",
            "99999999999999999999",
            "1y",
            "1h",
            "abc",
            "prefer",
            "verify-full",
            "allow",
            " ",
            "%zz",
            "127.0.0.1:1",
            "127.0.0.1:x",
            "[::1]:1,,",
            "1e9h",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,12}",
        "\\PC{0,6}",
    ]
}

#[test]
fn no_environment_shows_its_password_or_panics() {
    const VARS: &[&str] = &[
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_USER",
        "POSTGRES_DB",
        "POSTGRES_SSLMODE",
        "POSTGRES_SSLROOTCERT",
        "POSTGRES_READ_USER",
        "POSTGRES_MAX_CONNS",
        "POSTGRES_MIN_CONNS",
        "POSTGRES_MAX_CONN_LIFETIME",
        "POSTGRES_MAX_CONN_IDLE_TIME",
        "POSTGRES_HEALTH_CHECK_PERIOD",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGSSLMODE",
        "PGAPPNAME",
        "PGCONNECT_TIMEOUT",
    ];
    let replica_hosts = proptest::option::of(proptest::sample::select(vec![
        "127.0.0.1:1",
        "127.0.0.1:x",
        "[::1]:1,,127.0.0.1:99999",
        ",",
    ]));
    let env = (
        proptest::collection::vec((proptest::sample::select(VARS), hostile_value()), 0..6),
        password(),
        (any::<bool>(), any::<bool>()),
        replica_hosts,
    );
    runner()
        .run(
            &env,
            |(vars, password, (as_read_password, pg_password), replicas)| {
                let mut env: HashMap<&str, String> = vars.into_iter().collect();
                let key = ["POSTGRES_READ_PASSWORD", "POSTGRES_PASSWORD", "PGPASSWORD"]
                    [usize::from(as_read_password) + usize::from(pg_password)];
                env.insert(key, password);
                if let Some(hosts) = replicas {
                    env.insert("POSTGRES_REPLICA_HOSTS", hosts.to_owned());
                }
                let input = format!("{env:?}");
                let mut texts = match ClusterBuilder::from_env_with(|k| env.get(k).cloned()) {
                    Ok(builder) => {
                        let (mut errors, shown) =
                            built_texts(builder.connect_timeout(std::time::Duration::from_secs(2)));
                        errors.extend(shown);
                        errors
                    }
                    Err(e) => error_texts(&e),
                };
                if let Ok(dsn) = pgxkit::dsn_from_env_with(|k| env.get(k).cloned()) {
                    texts.push(redact_dsn(&dsn));
                }
                assert_hidden(&input, &texts)
            },
        )
        .unwrap();
}
