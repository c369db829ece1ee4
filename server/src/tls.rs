//! The server's TLS certificate (SPEC §1 `tls_cert_file`, `tls_key_file`): reads the PEM chain and
//! private key, checks that they belong together, and builds the rustls configuration the
//! engine's listener uses — TLS 1.3 and 1.2 with rustls's suites (all AEAD with forward secrecy;
//! it has no others), ALPN `http/1.1`, one chain for every SNI name. Reloads it on SIGHUP (new
//! handshakes use the new chain; a file that does not load keeps the old one). Never logs key
//! material.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{key} {path}: {source}")]
    Read {
        /// `tls_cert_file` or `tls_key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of its kind.
    #[error("{key} {path}: {why}")]
    Parse {
        /// `tls_cert_file` or `tls_key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refuses the pair (e.g. the key is not the certificate's).
    #[error("tls_cert_file and tls_key_file: {0}")]
    Pair(String),
    /// rustls refuses the client configuration for Redis.
    #[error("rediss://: {0}")]
    Client(String),
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// The rustls configuration of the certificate chain at `cert` and the key at `key`.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let parse = |k: &'static str, p: &Path, why: String| TlsError::Parse {
        key: k,
        path: p.to_owned(),
        why,
    };
    let cert_pem = read("tls_cert_file", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse("tls_cert_file", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(parse(
            "tls_cert_file",
            cert,
            "no CERTIFICATE block".to_owned(),
        ));
    }
    let key_pem = read("tls_key_file", key)?;
    // The key's own error text may quote what it read: only its kind is said.
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        parse(
            "tls_key_file",
            key,
            "no usable PRIVATE KEY block".to_owned(),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client configuration for TLS to Redis (`rediss://`): the certificate checked against
/// `ca_file` (else the system's bundle) and the server's host name.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let path = ca_file.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
    let pem = read("redis_ca_file", path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Parse {
            key: "redis_ca_file",
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        // A bundle may hold a certificate rustls cannot use; the others still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsError::Parse {
            key: "redis_ca_file",
            path: path.to_owned(),
            why: "no usable CERTIFICATE block".to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The process's signals, on a thread of their own: SIGINT and SIGTERM start the graceful
/// shutdown; SIGHUP reloads the certificate and key of `tls` for new handshakes (a pair that does
/// not load keeps the old one, logged; without TLS it is logged and ignored).
pub fn handle_signals(
    engine: engine::Control,
    tls: Option<(PathBuf, PathBuf)>,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("ringhub-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal != SIGHUP {
                    engine.shutdown();
                    continue;
                }
                let Some((cert, key)) = &tls else {
                    tracing::info!("SIGHUP: no TLS certificate to reload");
                    continue;
                };
                match load(cert, key) {
                    Ok(config) => {
                        engine.set_tls_config(config);
                        tracing::info!(cert = %cert.display(), "tls certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "tls certificate not reloaded; the old one stays in use"
                    ),
                }
            }
        })?;
    Ok(())
}
