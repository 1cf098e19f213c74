//! Certificates for TLS test clusters, made per run with the `openssl`
//! command: a CA, a server certificate for `localhost` signed by it, a client
//! certificate (CN `postgres`) signed by it, and an unrelated CA for
//! negative tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::Error;

/// The certificate files of a TLS test cluster (PEM; keys in PKCS#8).
///
/// ```no_run
/// # fn main() -> Result<(), pgxkit::testkit::Error> {
/// let cluster = pgxkit::testkit::LocalCluster::builder().tls(true).start()?;
/// let tls = cluster.tls().expect("started with tls(true)");
/// let dsn = format!(
///     "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
///     cluster.primary().port(),
///     tls.ca_cert.display()
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca_cert: PathBuf,
    /// The server's certificate, for `localhost` (not for `127.0.0.1`).
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate for user `postgres`, signed by the CA.
    pub client_cert: PathBuf,
    /// The client certificate's private key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here: verifying against it must fail.
    pub other_ca_cert: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), Error> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::new(
                "make certificates",
                format!("cannot run openssl ({e}); install it (Debian/Ubuntu: `apt-get install openssl`)"),
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::new(
            "make certificates",
            format!(
                "openssl {} failed: {}",
                args.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn make_ca(dir: &Path, name: &str, cn: &str) -> Result<(), Error> {
    let (key, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let mut args = vec![
        "req", "-x509", "-nodes", "-days", "2", "-subj", &subj, "-keyout", &key, "-out", &crt,
    ];
    args.extend(EC);
    openssl(dir, &args)
}

fn make_signed(dir: &Path, name: &str, cn: &str, ext: &str) -> Result<(), Error> {
    let (key, csr, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext)
        .map_err(|e| Error::new("make certificates", format!("cannot write {ext_file}: {e}")))?;
    let mut args = vec![
        "req", "-new", "-nodes", "-subj", &subj, "-keyout", &key, "-out", &csr,
    ];
    args.extend(EC);
    openssl(dir, &args)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ],
    )
}

/// Makes every certificate in `dir` (created if missing).
pub(crate) fn generate(dir: &Path) -> Result<TlsFiles, Error> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            "make certificates",
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    make_ca(dir, "ca", "pgxkit test CA")?;
    make_ca(dir, "other-ca", "pgxkit unrelated CA")?;
    make_signed(
        dir,
        "server",
        "localhost",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )?;
    make_signed(dir, "client", "postgres", "extendedKeyUsage=clientAuth\n")?;
    Ok(TlsFiles {
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
        other_ca_cert: dir.join("other-ca.crt"),
    })
}
