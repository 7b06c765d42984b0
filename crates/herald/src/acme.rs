//! Certificates from an ACME directory (Let's Encrypt by default), with `rustls-acme`: the
//! account and certificates kept in `--acme-cache`, the order validated by TLS-ALPN-01 on the one
//! HTTPS port, and renewal before expiry in the background. New handshakes use the newest
//! certificate; open connections keep theirs. Until the first certificate arrives, handshakes
//! other than the ACME challenge fail.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use rustls::server::ResolvesServerCert;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, EventOk};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The ALPN protocol of TLS-ALPN-01 challenge connections.
pub(crate) const ALPN_ACME: &[u8] = rustls_acme::acme::ACME_TLS_ALPN_NAME;

/// Let's Encrypt's production directory, the default of `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// What `--acme-*` configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub domains: Vec<String>,
    pub directory: String,
    pub contacts: Vec<String>,
    pub cache: Option<PathBuf>,
    /// A PEM CA to trust for the directory (a private ACME server) instead of the web's roots.
    pub ca_root: Option<PathBuf>,
}

impl AcmeSettings {
    /// Checks what can be checked before the server starts: the CA root file.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(path) = &self.ca_root {
            roots(path)?;
        }
        Ok(())
    }
}

fn roots(path: &PathBuf) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

/// Starts ordering (or loading from the cache) and renewing the certificate; returns the resolver
/// rustls asks on every handshake. Progress and failures are logged.
pub(crate) fn start(settings: &AcmeSettings) -> Arc<dyn ResolvesServerCert> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = AcmeConfig::new_with_provider(&settings.domains, provider.clone())
        .directory(&settings.directory)
        .contact(&settings.contacts);
    if let Some(path) = &settings.ca_root {
        match roots(path) {
            Ok(store) => {
                let client = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(store)
                    .with_no_client_auth();
                config = config.client_tls_config(Arc::new(client));
            }
            Err(e) => tracing::error!("--acme-ca-root: {e}"),
        }
    }
    let mut state = config
        .cache_option(settings.cache.clone().map(DirCache::new))
        .state();
    let resolver = state.resolver();
    let domains = settings.domains.join(",");
    tokio::spawn(async move {
        while let Some(event) = state.next().await {
            match event {
                Ok(EventOk::DeployedNewCert) => {
                    tracing::info!(%domains, "ACME: obtained a new certificate; new connections use it");
                }
                Ok(EventOk::DeployedCachedCert) => {
                    tracing::info!(%domains, "ACME: serving the certificate from the cache");
                }
                Ok(other) => tracing::debug!(?other, "ACME"),
                Err(e) => tracing::error!(%domains, "ACME: {e}"),
            }
        }
    });
    resolver
}
