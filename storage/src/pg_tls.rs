//! TLS to PostgreSQL: the `sslmode` of a `database_url` as libpq reads it — `disable`, `prefer`
//! and `require` (encrypted, the certificate not checked), `verify-ca` (the chain checked
//! against the roots), `verify-full` (the chain and the host name) — carried out with rustls.
//! The roots are `database_ca_file` when given, else the system's bundle
//! (`/etc/ssl/certs/ca-certificates.crt`). The PostgreSQL client knows only `disable`, `prefer`
//! and `require`: the mode is read and taken out of the URL here, the client gets `require` for
//! the verifying modes, and the verification happens in the certificate verifier below.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// The system's bundle of trusted roots (Debian and its derivatives).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, the certificate not checked (libpq's default).
    Prefer,
    /// TLS, the certificate not checked.
    Require,
    /// TLS, the certificate chain checked against the roots.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// The setting the PostgreSQL client is given.
    fn for_client(self) -> &'static str {
        match self {
            Self::Disable => "sslmode=disable",
            Self::Prefer => "sslmode=prefer",
            Self::Require | Self::VerifyCa | Self::VerifyFull => "sslmode=require",
        }
    }
}

/// Reads `sslmode` out of a connection string's `parts` (`prefer` when absent, as libpq): the
/// mode, and the other parts followed by what the client is given.
fn take_mode<'a>(parts: impl Iterator<Item = &'a str>) -> Result<(SslMode, Vec<&'a str>), String> {
    let mut mode = SslMode::Prefer;
    let mut kept = Vec::new();
    for part in parts {
        match part.split_once('=') {
            Some(("sslmode", value)) => {
                mode = SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "sslmode `{value}` is not one of disable, prefer, require, verify-ca, \
                         verify-full"
                    )
                })?;
            }
            _ => kept.push(part),
        }
    }
    kept.push(mode.for_client());
    Ok((mode, kept))
}

/// The `sslmode` of a URL (`prefer` when absent, as libpq) and the URL as the client must read
/// it; `Err` names an unknown mode.
pub fn split_sslmode(url: &str) -> Result<(SslMode, String), String> {
    if !url.contains("://") {
        // The key=value form: `host=… sslmode=verify-full …`.
        let (mode, kept) = take_mode(url.split_whitespace())?;
        return Ok((mode, kept.join(" ")));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((SslMode::Prefer, url.to_owned()));
    };
    let (mode, kept) = take_mode(query.split('&'))?;
    Ok((mode, format!("{base}?{}", kept.join("&"))))
}

/// The roots: `ca_file`, or the system's bundle (empty when it is missing).
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let path = ca_file.unwrap_or(Path::new(SYSTEM_ROOTS));
    let mut roots = RootCertStore::empty();
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if ca_file.is_some() => return Err(format!("{}: {e}", path.display())),
        Err(_) => return Ok(roots),
    };
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        // A bundle may hold a certificate rustls cannot use; the others still count.
        let _ = roots.add(cert);
    }
    if roots.is_empty() && ca_file.is_some() {
        return Err(format!("{}: no usable CERTIFICATE block", path.display()));
    }
    Ok(roots)
}

/// The rustls client configuration for `mode` (none for `disable`).
pub fn client_config(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, String> {
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(Unchecked(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(roots(ca_file)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(config))
}

/// `prefer`/`require`: any certificate (as libpq), the handshake's signatures still checked.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain checked, a name mismatch forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_read_and_the_client_told_what_it_knows() {
        let (mode, url) = split_sslmode("postgres://u@h/db?sslmode=verify-full&options=x").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(url, "postgres://u@h/db?options=x&sslmode=require");
        let (mode, url) = split_sslmode("postgres://u@h/db").unwrap();
        assert_eq!((mode, url.as_str()), (SslMode::Prefer, "postgres://u@h/db"));
        let (mode, _) = split_sslmode("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(mode, SslMode::Disable);
        let bad = split_sslmode("postgres://u@h/db?sslmode=allow-anything").unwrap_err();
        assert!(bad.contains("allow-anything"), "{bad}");
        let (mode, kv) = split_sslmode("host=h user=u sslmode=verify-ca options='-c x'").unwrap();
        assert_eq!(mode, SslMode::VerifyCa);
        assert!(
            kv.starts_with("host=h user=u") && kv.ends_with("sslmode=require"),
            "{kv}"
        );
    }

    #[test]
    fn verifying_modes_need_readable_roots() {
        let missing = client_config(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem")));
        assert!(missing.unwrap_err().contains("/nonexistent/ca.pem"));
        assert!(client_config(SslMode::Disable, None).unwrap().is_none());
        assert!(client_config(SslMode::Require, None).unwrap().is_some());
    }
}
