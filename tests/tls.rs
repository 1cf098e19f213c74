//! TLS and secrets against real servers: every sslmode against a TLS and a
//! plaintext server, verification failures, client certificates, SCRAM,
//! bad files, require_tls, and nothing secret in any log line.

mod common;

use std::time::Duration;

use pgxkit::testkit::{LocalCluster, TlsFiles};
use pgxkit::{Cluster, ErrorKind};

fn dsn(host: &str, port: u16, query: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{query}")
}

/// `Some(encrypted)` when a cluster could be built and queried, `None` when
/// connecting failed (with a `Connect` error).
fn outcome(dsn: &str) -> Option<bool> {
    match Cluster::builder()
        .primary(dsn)
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(cluster) => {
            let status = cluster.ssl_status().remove(0).unwrap();
            Some(status.encrypted)
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Connect, "{dsn}: {e:?}");
            None
        }
    }
}

fn ca(tls: &TlsFiles) -> String {
    format!("sslrootcert={}", tls.ca_cert.display())
}

#[test]
fn every_sslmode_against_a_tls_and_a_plaintext_server() {
    let tls_server = LocalCluster::builder().tls(true).start().unwrap();
    let plain_server = LocalCluster::start(0).unwrap();
    let files = tls_server.tls().unwrap();
    let root = ca(files);
    // (query, against TLS server, against plaintext server), as libpq behaves.
    let matrix: [(String, Option<bool>, Option<bool>); 5] = [
        ("sslmode=disable".into(), Some(false), Some(false)),
        ("sslmode=prefer".into(), Some(true), Some(false)),
        ("sslmode=require".into(), Some(true), None),
        (format!("sslmode=verify-ca&{root}"), Some(true), None),
        (format!("sslmode=verify-full&{root}"), Some(true), None),
    ];
    for (query, with_tls, plain) in matrix {
        assert_eq!(
            outcome(&dsn("localhost", tls_server.primary().port(), &query)),
            with_tls,
            "TLS server, {query}"
        );
        assert_eq!(
            outcome(&dsn("localhost", plain_server.primary().port(), &query)),
            plain,
            "plain server, {query}"
        );
    }
}

#[test]
fn verification_rejects_what_it_must_and_only_that() {
    let server = LocalCluster::builder().tls(true).start().unwrap();
    let files = server.tls().unwrap();
    let port = server.primary().port();
    let other = format!("sslrootcert={}", files.other_ca_cert.display());
    let root = ca(files);
    // verify-full: another CA, or a name not in the certificate (127.0.0.1 vs localhost).
    assert_eq!(
        outcome(&dsn(
            "localhost",
            port,
            &format!("sslmode=verify-full&{other}")
        )),
        None
    );
    assert_eq!(
        outcome(&dsn(
            "127.0.0.1",
            port,
            &format!("sslmode=verify-full&{root}")
        )),
        None
    );
    // verify-ca checks the chain but not the name.
    assert_eq!(
        outcome(&dsn(
            "127.0.0.1",
            port,
            &format!("sslmode=verify-ca&{root}")
        )),
        Some(true)
    );
    assert_eq!(
        outcome(&dsn(
            "localhost",
            port,
            &format!("sslmode=verify-ca&{other}")
        )),
        None
    );
    // require without a root certificate verifies nothing; with one, the chain (as libpq).
    assert_eq!(
        outcome(&dsn("127.0.0.1", port, "sslmode=require")),
        Some(true)
    );
    assert_eq!(
        outcome(&dsn("127.0.0.1", port, &format!("sslmode=require&{other}"))),
        None
    );
    assert_eq!(
        outcome(&dsn("127.0.0.1", port, &format!("sslmode=require&{root}"))),
        Some(true)
    );
}

#[test]
fn client_certificates_authenticate() {
    let server = LocalCluster::builder()
        .client_cert_auth(true)
        .start()
        .unwrap();
    let files = server.tls().unwrap();
    let port = server.primary().port();
    let base = format!("sslmode=verify-full&{}", ca(files));
    let with_cert = format!(
        "{base}&sslcert={}&sslkey={}",
        files.client_cert.display(),
        files.client_key.display()
    );
    let cluster = Cluster::builder()
        .primary(dsn("localhost", port, &with_cert))
        .build()
        .unwrap();
    let status = cluster.ssl_status().remove(0).unwrap();
    assert!(
        status.encrypted && status.version.as_deref().unwrap_or("").starts_with("TLS"),
        "{status:?}"
    );
    assert!(status.cipher.is_some());
    // Deadlines work on a TLS-only server (the cancel request uses the same TLS settings).
    let err = cluster
        .with_timeout(Duration::from_millis(200))
        .query("SELECT pg_sleep(5)", &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");

    let err = Cluster::builder()
        .primary(dsn("localhost", port, &base))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert_eq!(
        outcome(&dsn("localhost", port, "sslmode=disable")),
        None,
        "plaintext is refused"
    );
}

#[test]
fn scram_passwords_work_and_never_show() {
    let server = LocalCluster::builder().password_auth(true).start().unwrap();
    let password = server.password().unwrap().to_owned();
    let cluster = Cluster::connect(&server.primary_dsn()).unwrap();
    cluster.execute("SELECT 1", &[]).unwrap();
    let wrong = "Wr0ng-Pa55word";
    let bad_dsn = format!(
        "postgres://postgres:{wrong}@127.0.0.1:{}/postgres",
        server.primary().port()
    );
    let err = Cluster::connect(&bad_dsn).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert_eq!(
        err.code(),
        Some(&pgxkit::postgres::error::SqlState::INVALID_PASSWORD)
    );
    assert!(
        !err.is_retryable(),
        "an authentication failure is not retried"
    );
    let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(
        !shown.contains(&password) && !shown.contains(wrong),
        "{shown}"
    );
    // The password also comes from POSTGRES_PASSWORD_FILE.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), format!("{password}\n")).unwrap();
    let port = server.primary().port().to_string();
    let file = dir.path().join("pw").display().to_string();
    let from_env = pgxkit::ClusterBuilder::from_env_with(|k| match k {
        "POSTGRES_HOST" => Some("127.0.0.1".into()),
        "POSTGRES_PORT" => Some(port.clone()),
        "POSTGRES_USER" | "POSTGRES_DB" => Some("postgres".into()),
        "POSTGRES_PASSWORD_FILE" => Some(file.clone()),
        "POSTGRES_SSLMODE" => Some("disable".into()),
        _ => None,
    })
    .unwrap();
    assert!(!format!("{from_env:?}").contains(&password));
    from_env.build().unwrap().execute("SELECT 1", &[]).unwrap();
}

#[test]
fn bad_tls_files_fail_build_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            format!("sslmode=verify-full&sslrootcert={}", missing.display()),
            "sslrootcert",
            Some(&missing),
        ),
        (
            format!("sslmode=verify-ca&sslrootcert={}", garbage.display()),
            "sslrootcert",
            Some(&garbage),
        ),
        (
            format!("sslmode=require&sslkey={}", garbage.display()),
            "sslkey",
            None,
        ),
        (
            format!(
                "sslmode=require&sslcert={}&sslkey={}",
                garbage.display(),
                garbage.display()
            ),
            "sslkey",
            Some(&garbage),
        ),
        (
            format!(
                "sslmode=require&sslcert={}&sslkey={}",
                missing.display(),
                garbage.display()
            ),
            "sslcert",
            Some(&missing),
        ),
    ];
    for (query, key, file) in cases {
        let err = Cluster::builder()
            .primary(dsn("localhost", 1, &query))
            .lazy_connect(true)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{query}: {err}");
        let text = err.to_string();
        assert!(text.contains(key), "{query}: {text}");
        if let Some(file) = file {
            assert!(
                text.contains(&*file.display().to_string()),
                "{query}: {text}"
            );
        }
    }
}

#[test]
fn require_tls_refuses_what_could_be_plaintext() {
    let server = LocalCluster::builder().tls(true).start().unwrap();
    let port = server.primary().port();
    let err = Cluster::builder()
        .primary(dsn("localhost", port, "sslmode=prefer"))
        .require_tls(true)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("require_tls"), "{err}");
    let cluster = Cluster::builder()
        .primary(dsn("localhost", port, "sslmode=require"))
        .require_tls(true)
        .build()
        .unwrap();
    assert!(
        cluster
            .ssl_status()
            .into_iter()
            .all(|s| s.unwrap().encrypted)
    );
}

#[test]
fn nothing_secret_reaches_any_log_line() {
    common::logs(); // trace level, every crate
    let server = LocalCluster::builder()
        .client_cert_auth(true)
        .password_auth(true)
        .start()
        .unwrap();
    let secret_server = LocalCluster::builder()
        .password_auth(true)
        .replicas(1)
        .start()
        .unwrap();
    let password = secret_server.password().unwrap().to_owned();
    let files = server.tls().unwrap();
    let key_lines: Vec<String> = std::fs::read_to_string(&files.client_key)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(str::to_owned)
        .collect();
    assert!(!key_lines.is_empty());

    // A workload with successes and failures, at trace level.
    let tls_dsn = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        server.primary().port(),
        files.ca_cert.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let tls_cluster = Cluster::builder()
        .primary(&tls_dsn)
        .health_check_period(Duration::from_millis(50))
        .build()
        .unwrap();
    let cluster = Cluster::builder()
        .primary(secret_server.primary_dsn())
        .replica(secret_server.replica_dsns()[0].clone())
        .health_check_period(Duration::from_millis(50))
        .after_operation(pgxkit::hooks::slow_query_log(Duration::ZERO))
        .build()
        .unwrap();
    for c in [&cluster, &tls_cluster] {
        c.execute("SELECT 1", &[]).unwrap();
        c.replica().query("SELECT 1", &[]).unwrap();
        c.execute("SELEC broken", &[]).unwrap_err();
        c.with_timeout(Duration::from_millis(100))
            .query("SELECT pg_sleep(1)", &[])
            .unwrap_err();
        c.transaction(|tx| tx.execute("SELECT 1", &[])).unwrap();
    }
    let wrong = format!(
        "postgres://postgres:Not-{password}@127.0.0.1:{}/postgres",
        secret_server.primary().port()
    );
    Cluster::connect(&wrong).unwrap_err();
    secret_server.replicas()[0].stop().unwrap();
    common::wait_for(
        "the replica to be seen down",
        Duration::from_secs(10),
        || !cluster.health().node("replica1").unwrap().up,
    );
    let dumps = format!(
        "{:?} {:?} {:?} {:?}",
        cluster.health(),
        cluster.stats(),
        Cluster::builder().primary(&wrong).replica(&tls_dsn),
        cluster
    );
    let lines = common::all_logs();
    assert!(lines.len() > 10, "the workload logged nothing?");
    for line in lines.iter().chain(std::iter::once(&dumps)) {
        assert!(!line.contains(&password), "password in: {line}");
        for key_line in &key_lines {
            assert!(!line.contains(key_line.as_str()), "key material in: {line}");
        }
    }
}

/// `psql`'s binary, next to the server's (the server package depends on the
/// client package).
fn psql() -> std::path::PathBuf {
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("psql"));
    let mut candidates: Vec<std::path::PathBuf> = from_pg_config.into_iter().collect();
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin/psql")).collect())
        .unwrap_or_default();
    versions.sort();
    candidates.extend(versions.into_iter().rev());
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("psql not found (it comes with the PostgreSQL server package)")
}

/// What libpq does with `dsn`: `Some(encrypted)` when it connects.
fn libpq_outcome(psql: &std::path::Path, dsn: &str) -> Option<bool> {
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg(psql)
        .args([
            dsn,
            "-XAtqc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGSSLMODE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim() == "t")
}

/// What pgxkit does with `dsn`: `Some(encrypted)` when it connects, `None`
/// when `build()` fails (to connect, or refusing a file as libpq does).
fn pgxkit_outcome(dsn: &str) -> Option<bool> {
    match Cluster::builder()
        .primary(dsn)
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(cluster) => Some(cluster.ssl_status().remove(0).unwrap().encrypted),
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::Connect | ErrorKind::Config),
                "{dsn}: {e:?}"
            );
            None
        }
    }
}

#[test]
fn every_tls_setting_behaves_as_libpq_does() {
    let psql = psql();
    let tls_server = LocalCluster::builder().tls(true).start().unwrap();
    let plain_server = LocalCluster::start(0).unwrap();
    let cert_server = LocalCluster::builder()
        .client_cert_auth(true)
        .start()
        .unwrap();
    let files = tls_server.tls().unwrap().clone();
    let cert_files = cert_server.tls().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let bundle = |files: &TlsFiles, name: &str| {
        let path = dir.path().join(name);
        let mut pem = std::fs::read(&files.other_ca_cert).unwrap();
        pem.extend(std::fs::read(&files.ca_cert).unwrap());
        std::fs::write(&path, pem).unwrap();
        path
    };
    let servers = [
        (
            "TLS",
            tls_server.primary().port(),
            files.clone(),
            bundle(&files, "b1.pem"),
        ),
        (
            "plaintext",
            plain_server.primary().port(),
            files.clone(),
            bundle(&files, "b2.pem"),
        ),
        (
            "hostssl cert",
            cert_server.primary().port(),
            cert_files.clone(),
            bundle(&cert_files, "b3.pem"),
        ),
    ];
    let modes = ["disable", "prefer", "require", "verify-ca", "verify-full"];
    let (mut cells, mut differ) = (0, Vec::new());
    for (server, port, files, bundle) in &servers {
        let roots = [
            ("right CA", Some(files.ca_cert.clone())),
            ("unrelated CA", Some(files.other_ca_cert.clone())),
            ("no CA", None),
            ("bundle", Some(bundle.clone())),
        ];
        for host in ["localhost", "127.0.0.1"] {
            for (root_name, root) in &roots {
                for client_cert in [false, true] {
                    for mode in modes {
                        let mut dsn = format!(
                            "host={host} port={port} user=postgres dbname=postgres sslmode={mode}"
                        );
                        if let Some(root) = root {
                            dsn.push_str(&format!(" sslrootcert={}", root.display()));
                        }
                        if client_cert {
                            dsn.push_str(&format!(
                                " sslcert={} sslkey={}",
                                files.client_cert.display(),
                                files.client_key.display()
                            ));
                        }
                        let (libpq, ours) = (libpq_outcome(&psql, &dsn), pgxkit_outcome(&dsn));
                        cells += 1;
                        if libpq != ours {
                            differ.push(format!(
                                "{server} server, {host}, {root_name}, client cert {client_cert}, \
                                 sslmode={mode}: libpq {libpq:?}, pgxkit {ours:?}"
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cells} cells compared with libpq ({})", psql.display());
    assert!(
        differ.is_empty(),
        "{} of {cells} cells differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

#[test]
fn client_keys_in_every_format_libpq_reads_and_only_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let psql = psql();
    let server = LocalCluster::builder()
        .client_cert_auth(true)
        .start()
        .unwrap();
    let files = server.tls().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sec1 = dir.path().join("client-sec1.key");
    let status = std::process::Command::new("openssl")
        .args(["ec", "-in"])
        .arg(&files.client_key)
        .arg("-out")
        .arg(&sec1)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    std::fs::set_permissions(&sec1, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dsn = |key: &std::path::Path| {
        format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full \
             sslrootcert={} sslcert={} sslkey={}",
            server.primary().port(),
            files.ca_cert.display(),
            files.client_cert.display(),
            key.display()
        )
    };
    // A SEC1 EC key (BEGIN EC PRIVATE KEY): libpq reads it, so do we.
    assert_eq!(libpq_outcome(&psql, &dsn(&sec1)), Some(true));
    assert_eq!(pgxkit_outcome(&dsn(&sec1)), Some(true));
    // A key others can read: libpq refuses it, so do we, naming the key.
    std::fs::set_permissions(&sec1, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(libpq_outcome(&psql, &dsn(&sec1)), None);
    let err = Cluster::builder().primary(dsn(&sec1)).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("sslkey") && shown.contains("group or world"),
        "{shown}"
    );
    // Not a key at all: the error names the formats that are read.
    let junk = dir.path().join("junk.key");
    std::fs::write(&junk, "not a key\n").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = Cluster::builder().primary(dsn(&junk)).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("PKCS#8"), "{err}");
}
