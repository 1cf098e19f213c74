//! libpq `sslmode` semantics on top of native-tls and postgres-native-tls.
//!
//! | sslmode | encrypted | chain verified | host name verified |
//! |---|---|---|---|
//! | `disable` | no | - | - |
//! | `prefer` | if the server offers TLS (and, with `sslrootcert`, its chain verifies; else plaintext) | only with `sslrootcert` | no |
//! | `require` | yes | only with `sslrootcert` | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |

use std::path::Path;
use std::sync::Mutex;

use native_tls::{Certificate, Identity, TlsConnector};
use postgres::config::SslMode as PgSslMode;
use postgres::{CancelToken, NoTls};
use postgres_native_tls::MakeTlsConnector;

use crate::dsn::{RootCert, SslMode, TlsSettings};
use crate::error::{Error, Result};
use crate::sync::lock;

/// How connections to one node are opened: in the clear (`sslmode=disable`)
/// or through a native-tls connector.
#[derive(Clone)]
pub(crate) enum Tls {
    Off,
    On {
        connector: MakeTlsConnector,
        /// `prefer` with `sslrootcert`: a server whose certificate does not
        /// verify is connected to in plaintext instead (as libpq does).
        plaintext_fallback: bool,
    },
}

impl Tls {
    /// Opens a connection (bounded by `pg`'s connect timeout; twice that
    /// when a `prefer` connection falls back to plaintext).
    pub(crate) fn connect(
        &self,
        pg: &postgres::Config,
    ) -> Result<postgres::Client, postgres::Error> {
        match self {
            Tls::Off => pg.connect(NoTls),
            Tls::On {
                connector,
                plaintext_fallback,
            } => match pg.connect(connector.clone()) {
                Err(e) if *plaintext_fallback && is_handshake_failure(&e) => {
                    let mut plain = pg.clone();
                    plain.ssl_mode(PgSslMode::Disable);
                    plain.connect(NoTls)
                }
                result => result,
            },
        }
    }

    /// How many connects one [`connect`](Self::connect) may make.
    pub(crate) fn attempts(&self) -> u32 {
        match self {
            Tls::On {
                plaintext_fallback: true,
                ..
            } => 2,
            _ => 1,
        }
    }

    /// Sends a cancel request for the statement running under `token`.
    pub(crate) fn cancel(&self, token: &CancelToken) -> Result<(), postgres::Error> {
        match self {
            Tls::Off => token.cancel_query(NoTls),
            Tls::On { connector, .. } => token.cancel_query(connector.clone()),
        }
    }
}

/// The driver's fixed text for a failed TLS handshake (its error kind is
/// private): a certificate that does not verify, among others.
fn is_handshake_failure(err: &postgres::Error) -> bool {
    err.to_string()
        .starts_with("error performing TLS handshake")
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Off => "Tls::Off",
            Tls::On { .. } => "Tls::On",
        })
    }
}

/// The connectors built so far in one `build()`, shared by nodes with the
/// same TLS settings: a native-tls connector parses the system CA bundle
/// twice whatever the settings (~35 ms of CPU per connector here). Not kept
/// across builds when they read files, so a rotated certificate file is
/// read by the next build; those that read no file are (see [`FILELESS`]).
#[derive(Default)]
pub(crate) struct Connectors(Vec<(TlsSettings, MakeTlsConnector)>);

/// Connectors whose settings name no file (`prefer` or `require` without
/// certificates, or `sslrootcert=system`), kept for the process: nothing
/// they depend on changes between builds but the system trust store.
static FILELESS: Mutex<Vec<(TlsSettings, MakeTlsConnector)>> = Mutex::new(Vec::new());

/// Sets the driver's ssl mode for one node and returns how to connect to it.
/// Every file is read here, so a missing or bad file fails `build()`.
pub(crate) fn connector(
    tls: &TlsSettings,
    pg: &mut postgres::Config,
    built: &mut Connectors,
) -> Result<Tls> {
    pg.ssl_mode(match tls.mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    if tls.mode == SslMode::Disable {
        return Ok(Tls::Off);
    }
    let plaintext_fallback = tls.mode == SslMode::Prefer && tls.root_cert.is_some();
    if let Some((_, connector)) = built.0.iter().find(|(settings, _)| settings == tls) {
        return Ok(Tls::On {
            connector: connector.clone(),
            plaintext_fallback,
        });
    }
    let fileless = tls.cert.is_none()
        && tls.key.is_none()
        && !matches!(tls.root_cert, Some(RootCert::File(_)));
    let cached = || {
        lock(&FILELESS)
            .iter()
            .find(|(settings, _)| settings == tls)
            .map(|(_, c)| c.clone())
    };
    let connector = match fileless.then(cached).flatten() {
        Some(connector) => connector,
        None => {
            // Built outside the lock: it takes tens of milliseconds.
            let connector = native_connector(tls)?;
            if fileless {
                lock(&FILELESS).push((tls.clone(), connector.clone()));
            }
            connector
        }
    };
    built.0.push((tls.clone(), connector.clone()));
    Ok(Tls::On {
        connector,
        plaintext_fallback,
    })
}

fn native_connector(tls: &TlsSettings) -> Result<MakeTlsConnector> {
    let mut builder = TlsConnector::builder();
    // libpq verifies the chain whenever a root certificate is given, in
    // every mode that uses TLS (and `prefer` then falls back to plaintext
    // when it does not verify, see `Tls::connect`).
    let verify_chain = match tls.mode {
        SslMode::Disable => false,
        SslMode::Prefer | SslMode::Require => tls.root_cert.is_some(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            if tls.root_cert.is_none() {
                return Err(Error::config(format!(
                    "sslrootcert: sslmode={} needs sslrootcert (a PEM file of trusted CAs, or `system`)",
                    tls.mode
                )));
            }
            true
        }
    };
    builder.danger_accept_invalid_certs(!verify_chain);
    builder.danger_accept_invalid_hostnames(tls.mode != SslMode::VerifyFull);
    if let Some(RootCert::File(path)) = &tls.root_cert {
        builder.disable_built_in_roots(true);
        for cert in read_certificates("sslrootcert", path)? {
            builder.add_root_certificate(cert);
        }
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read_file("sslcert", cert)?;
            check_key_permissions(key)?;
            let key_pem = pkcs8(key, &read_file("sslkey", key)?)?;
            let identity = Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
                Error::config(format!(
                    "sslkey: {} with {}: not a usable PEM certificate and key pair ({e})",
                    key.display(),
                    cert.display()
                ))
            })?;
            builder.identity(identity);
        }
        (None, Some(_)) => return Err(Error::config("sslkey: set without sslcert")),
        (Some(_), None) => return Err(Error::config("sslcert: set without sslkey")),
        (None, None) => {}
    }
    let connector = builder
        .build()
        .map_err(|e| Error::config(format!("sslmode: cannot set up TLS: {e}")))?;
    Ok(MakeTlsConnector::new(connector))
}

/// libpq's rule for a private key file: a regular file that group and
/// others cannot read (owned by the current user), or at most `u=rw,g=r`
/// (0640) when owned by root.
fn check_key_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::config(format!("sslkey: cannot read {}", path.display())).with_source(e)
        })?;
        if !meta.is_file() {
            return Err(Error::config(format!(
                "sslkey: {} is not a regular file",
                path.display()
            )));
        }
        let mode = meta.mode();
        let own = meta.uid() == nix::unistd::geteuid().as_raw();
        let too_open = if own {
            mode & 0o077 != 0
        } else {
            meta.uid() == 0 && mode & 0o037 != 0
        };
        if too_open {
            return Err(Error::config(format!(
                "sslkey: {} has group or world access ({:o}); it must be u=rw (0600) or less \
                 if owned by the current user, or u=rw,g=r (0640) or less if owned by root \
                 (as libpq requires)",
                path.display(),
                mode & 0o777
            )));
        }
    }
    Ok(())
}

/// The key as PKCS#8 PEM, which native-tls takes: libpq also reads PKCS#1
/// RSA keys (`BEGIN RSA PRIVATE KEY`) and SEC1 EC keys (`BEGIN EC PRIVATE
/// KEY`), so those are converted here (with OpenSSL, which native-tls uses
/// on these platforms).
fn pkcs8(path: &Path, pem: &[u8]) -> Result<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("-----BEGIN PRIVATE KEY-----") {
        return Ok(pem.to_vec());
    }
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || text.contains("ENCRYPTED") {
        return Err(Error::config(format!(
            "sslkey: {} is encrypted; pgxkit has no sslpassword: decrypt it \
             (openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8)",
            path.display()
        )));
    }
    convert_to_pkcs8(pem).map_err(|why| {
        Error::config(format!(
            "sslkey: {}: not a PEM private key pgxkit can read ({why}); PKCS#8 \
             (BEGIN PRIVATE KEY), PKCS#1 RSA and SEC1 EC keys are; convert with \
             openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8",
            path.display()
        ))
    })
}

#[cfg(not(any(target_os = "macos", target_os = "ios", target_os = "windows")))]
fn convert_to_pkcs8(pem: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let key = openssl::pkey::PKey::private_key_from_pem(pem).map_err(|e| e.to_string())?;
    key.private_key_to_pem_pkcs8().map_err(|e| e.to_string())
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "windows"))]
fn convert_to_pkcs8(_pem: &[u8]) -> std::result::Result<Vec<u8>, String> {
    Err("only PKCS#8 keys on this platform".to_owned())
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::config(format!("{key}: cannot read {}: {e}", path.display())))
}

/// Every certificate in a PEM file; at least one.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<Certificate>> {
    let bytes = read_file(key, path)?;
    let text = String::from_utf8_lossy(&bytes);
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs = Vec::new();
    let mut rest = &*text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let block = &rest[start..start + len + END.len()];
        let cert = Certificate::from_pem(block.as_bytes()).map_err(|e| {
            Error::config(format!(
                "{key}: {}: bad PEM certificate: {e}",
                path.display()
            ))
        })?;
        certs.push(cert);
        rest = &rest[start + len + END.len()..];
    }
    if certs.is_empty() {
        return Err(Error::config(format!(
            "{key}: {}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode) -> TlsSettings {
        TlsSettings {
            mode,
            ..TlsSettings::default()
        }
    }

    #[test]
    fn disable_builds_no_connector_and_equal_settings_share_one() {
        let mut built = Connectors::default();
        let mut pg = postgres::Config::new();
        let off = connector(&settings(SslMode::Disable), &mut pg, &mut built).unwrap();
        assert!(matches!(off, Tls::Off));
        assert_eq!(pg.get_ssl_mode(), PgSslMode::Disable);
        assert!(built.0.is_empty());

        for mode in [SslMode::Prefer, SslMode::Require, SslMode::Prefer] {
            let on = connector(&settings(mode), &mut pg, &mut built).unwrap();
            assert!(matches!(on, Tls::On { .. }));
        }
        assert_eq!(pg.get_ssl_mode(), PgSslMode::Prefer);
        let modes: Vec<SslMode> = built.0.iter().map(|(s, _)| s.mode).collect();
        assert_eq!(modes, [SslMode::Prefer, SslMode::Require]);
    }

    #[test]
    fn pkcs1_and_sec1_keys_become_pkcs8() {
        let dir = std::path::Path::new("/key");
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let pkcs1 = rsa.private_key_to_pem().unwrap();
        assert!(String::from_utf8_lossy(&pkcs1).contains("BEGIN RSA PRIVATE KEY"));
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let sec1 = openssl::ec::EcKey::generate(&group)
            .unwrap()
            .private_key_to_pem()
            .unwrap();
        assert!(String::from_utf8_lossy(&sec1).contains("BEGIN EC PRIVATE KEY"));
        for pem in [pkcs1, sec1] {
            let converted = pkcs8(dir, &pem).unwrap();
            assert!(String::from_utf8_lossy(&converted).starts_with("-----BEGIN PRIVATE KEY-----"));
            assert_eq!(
                pkcs8(dir, &converted).unwrap(),
                converted,
                "PKCS#8 is kept as it is"
            );
        }
        let err = pkcs8(dir, b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n").unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_its_key_even_after_a_shared_connector() {
        let mut built = Connectors::default();
        let mut pg = postgres::Config::new();
        connector(&settings(SslMode::Require), &mut pg, &mut built).unwrap();
        let missing = TlsSettings {
            root_cert: Some(RootCert::File("/nonexistent/pgxkit-ca.pem".into())),
            ..settings(SslMode::Require)
        };
        let err = connector(&missing, &mut pg, &mut built).unwrap_err();
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }
}
