//! Loading PEM material and building rustls configurations with the ring provider.
//!
//! Every config goes through `builder_with_provider`: if another crate in the build enables a
//! second provider, rustls' process-default builder would panic at run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use x509_parser::prelude::FromDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key: {detail}")]
    NoKey { path: PathBuf, detail: String },
    #[error("{path}: certificate is not usable as a CA: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {detail}")]
    BadPair {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("{path}: certificate cannot be parsed: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path}: not a usable PEM certificate revocation list: {detail}")]
    BadCrl { path: PathBuf, detail: String },
}

/// The config keys naming a daemon's TLS files, so that a [`TlsError`] can name the key to fix.
#[derive(Debug, Clone, Copy)]
pub struct TlsKeys<'a> {
    pub cert: (&'a Path, &'a str),
    pub key: (&'a Path, &'a str),
    pub ca: (&'a Path, &'a str),
    pub crl: Option<(&'a Path, &'a str)>,
    /// Named when the certificate and the key do not belong together.
    pub pair: &'a str,
}

impl TlsError {
    /// The config key whose file this error is about.
    pub fn config_key<'a>(&self, keys: &TlsKeys<'a>) -> &'a str {
        let by_path = |p: &Path| {
            [Some(keys.ca), keys.crl, Some(keys.key)]
                .into_iter()
                .flatten()
                .find(|(path, _)| *path == p)
                .map_or(keys.cert.1, |(_, key)| key)
        };
        match self {
            TlsError::NoKey { .. } => keys.key.1,
            TlsError::BadCa { .. } => keys.ca.1,
            TlsError::BadPair { .. } => keys.pair,
            TlsError::BadCrl { path, .. } => keys.crl.map_or_else(|| by_path(path), |(_, k)| k),
            TlsError::Read { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::Parse { path, .. } => by_path(path),
        }
    }
}

/// The crypto provider every config in this project uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate of a PEM file (a leaf followed by its intermediates, or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Loads a CA bundle into a root store; every certificate in it must be acceptable.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Paths of a server's TLS material.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
    pub client_ca_file: &'a Path,
    /// PEM CRLs of the client CA: a revoked client certificate fails the handshake.
    pub crl_file: Option<&'a Path>,
}

/// Each CRL must be signed by a CA of `ca_file` that may sign CRLs: one that is not would
/// make every client handshake fail (webpki treats it as an error, not as unknown status).
fn check_crls(crl_file: &Path, ca_file: &Path) -> Result<(), TlsError> {
    let bad = |detail: String| TlsError::BadCrl {
        path: crl_file.to_path_buf(),
        detail,
    };
    let cas = load_certs(ca_file)?;
    let cas: Vec<_> = cas
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| c)
        .collect();
    for der in load_crls(crl_file)? {
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
                .map_err(|e| bad(format!("cannot be parsed: {e}")))?;
        let Some(ca) = cas.iter().find(|ca| ca.subject() == crl.issuer()) else {
            return Err(bad(format!(
                "its issuer {} is not a CA of {}",
                crl.issuer(),
                ca_file.display()
            )));
        };
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.crl_sign() {
                return Err(bad(format!(
                    "its issuer {} may not sign CRLs (no cRLSign key usage)",
                    crl.issuer()
                )));
            }
        }
        crl.verify_signature(ca.public_key()).map_err(|e| {
            bad(format!(
                "its signature does not verify with {}: {e}",
                crl.issuer()
            ))
        })?;
    }
    Ok(())
}

/// Every CRL in a PEM file (at least one).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let bad = |detail: String| TlsError::BadCrl {
        path: path.to_path_buf(),
        detail,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL block".into()));
    }
    Ok(crls)
}

/// Server config that requires a client certificate chaining to `client_ca_file`, speaks
/// TLS 1.2 and 1.3 only, and offers HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(files: &ServerTlsFiles<'_>) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(load_roots(files.client_ca_file)?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(crl_file) = files.crl_file {
        check_crls(crl_file, files.client_ca_file)?;
        // The lab CA signs end-entity certificates directly: only those are looked up, and a
        // certificate of an issuer the file has no CRL for is judged by its chain alone.
        builder = builder
            .with_crls(load_crls(crl_file)?)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder.build().map_err(|e| match files.crl_file {
        Some(crl) if matches!(e, rustls::server::VerifierBuilderError::InvalidCrl(_)) => {
            TlsError::BadCrl {
                path: crl.to_path_buf(),
                detail: e.to_string(),
            }
        }
        _ => TlsError::BadCa {
            path: files.client_ca_file.to_path_buf(),
            detail: e.to_string(),
        },
    })?;
    let certs = load_certs(files.cert_file)?;
    let key = load_key(files.key_file)?;
    let bad_pair = |detail: String| TlsError::BadPair {
        cert: files.cert_file.to_path_buf(),
        key: files.key_file.to_path_buf(),
        detail,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_pair(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad_pair(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Paths of a client's TLS material.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles<'a> {
    pub ca_file: &'a Path,
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Client config presenting a certificate and trusting only `ca_file` for the server.
pub fn client_config(files: &ClientTlsFiles<'_>, alpn_h2: bool) -> Result<ClientConfig, TlsError> {
    let roots = load_roots(files.ca_file)?;
    let certs = load_certs(files.cert_file)?;
    let key = load_key(files.key_file)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::BadCa {
            path: files.ca_file.to_path_buf(),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| TlsError::BadPair {
            cert: files.cert_file.to_path_buf(),
            key: files.key_file.to_path_buf(),
            detail: e.to_string(),
        })?;
    cfg.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(cfg)
}

/// The identity a certificate names: its first DNS subject-alternative name, else its subject CN.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some((*dns).to_string());
            }
        }
    }
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

/// Validity window and identity of a certificate, for `doctor`-style reports.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub identity: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertSummary {
    /// Time left before expiry; `None` once expired.
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.not_after.duration_since(now).ok()
    }
}

fn epoch_to_system(t: i64) -> SystemTime {
    u64::try_from(t).map_or(SystemTime::UNIX_EPOCH, |s| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    })
}

/// When a DER certificate expires; `None` if it does not parse.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(epoch_to_system(parsed.validity().not_after.timestamp()))
}

pub fn summarize(path: &Path) -> Result<CertSummary, TlsError> {
    let certs = load_certs(path)?;
    let first = &certs[0];
    let (_, parsed) =
        x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| TlsError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    Ok(CertSummary {
        identity: identity(first),
        not_before: epoch_to_system(parsed.validity().not_before.timestamp()),
        not_after: epoch_to_system(parsed.validity().not_after.timestamp()),
    })
}
