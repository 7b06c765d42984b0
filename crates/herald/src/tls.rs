//! HTTPS: the server's certificate chain and key, read from PEM files with errors that name the
//! file and the problem, and swapped in place on reload (SIGHUP or a change of the files), so new
//! connections get the new pair while open ones keep theirs. A bad new pair is refused with a log
//! line and the pair in use stays. Also the rustls settings every TLS listener uses (ALPN `h2`
//! then `http/1.1`, secrets extractable for `sealed.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN name of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// How often the certificate files are checked for a change.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The PEM files of the server's certificate chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate and key cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid PEM: {source}")]
    Pem { path: PathBuf, source: pem::Error },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
    )]
    NoKey { path: PathBuf },
    #[error("{path}: unsupported private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{path}: the first certificate is not valid X.509: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("the certificate in {path} expired on {expired}")]
    Expired { path: PathBuf, expired: String },
    #[error("the key in {key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// Reads and checks the pair: PEM syntax, a certificate, a key rustls can sign with, the key
/// belonging to the first certificate, and that certificate not expired.
pub fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: files.cert.clone(),
            source,
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    check_validity(&files.cert, leaf)?;
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: files.key.clone(),
        },
        source => TlsError::Pem {
            path: files.key.clone(),
            source,
        },
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: files.key.clone(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
    }
    Ok(Arc::new(certified))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// An expired leaf is refused; one not valid yet only warns (clocks differ).
fn check_validity(path: &Path, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let validity = cert.validity();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if validity.not_after.timestamp() < now {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            expired: validity.not_after.to_string(),
        });
    }
    if validity.not_before.timestamp() > now {
        tracing::warn!(
            path = %path.display(),
            not_before = %validity.not_before,
            "the TLS certificate is not valid yet"
        );
    }
    Ok(())
}

/// The pair in use, replaced whole by [`Certificates::reload`]; rustls asks it on every handshake.
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of the files when last loaded (or tried).
    seen: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl Certificates {
    /// Loads the pair; an error names the file and the problem.
    pub fn open(files: TlsFiles) -> Result<Certificates, TlsError> {
        let seen = modified(&files);
        let current = load(&files)?;
        Ok(Certificates {
            files,
            current: RwLock::new(current),
            seen: Mutex::new(seen),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Loads the files again; on success new handshakes use the new pair, on error the old one
    /// stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.seen.lock() = modified(&self.files);
        let fresh = load(&self.files)?;
        *self.current.write() = fresh;
        Ok(())
    }

    /// Whether either file changed since it was last loaded.
    fn changed(&self) -> bool {
        *self.seen.lock() != modified(&self.files)
    }

    /// Reloads on SIGHUP and whenever the files change, logging the outcome, for as long as the
    /// process runs.
    pub(crate) fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let signalled = async {
                    match hangup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let signalled = std::future::pending::<Option<()>>();
                let cause = tokio::select! {
                    _ = signalled => "SIGHUP",
                    _ = tick.tick() => {
                        if !self.changed() {
                            continue;
                        }
                        "the files changed"
                    }
                };
                match self.reload() {
                    Ok(()) => tracing::info!(
                        cert = %self.files.cert.display(),
                        cause,
                        "reloaded the TLS certificate; new connections use it"
                    ),
                    Err(e) => tracing::error!(
                        cause,
                        "refused the new TLS certificate, keeping the one in use: {e}"
                    ),
                }
            }
        });
    }
}

fn modified(files: &TlsFiles) -> (Option<SystemTime>, Option<SystemTime>) {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (m(&files.cert), m(&files.key))
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// rustls settings for the listener: certificates from `resolver`, ALPN `h2` then `http/1.1`
/// (plus `extra_alpn`, e.g. the ACME challenge protocol).
pub(crate) fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    extra_alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    config
        .alpn_protocols
        .extend(extra_alpn.iter().map(|p| p.to_vec()));
    // The lean path takes an event stream's TLS 1.3 connection over from rustls (`sealed.rs`).
    config.enable_secret_extraction = true;
    Arc::new(config)
}
