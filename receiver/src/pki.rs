//! `cis490-receiver pki revoke` (SPEC §16) over the lab PKI directory of SPEC §14:
//! `DIR/ca.pem`, `DIR/ca.key`, each host's current certificate at
//! `DIR/hosts/<HOST_ID>/<HOST_ID>.pem`, and the revocation list `DIR/crl.pem` that
//! `[tls] crl_file` points at. `init`, `issue` and `list` arrive with the certificates issue;
//! `revoke` works on any directory in that layout.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// Days a freshly signed CRL declares itself current (the receiver does not enforce it).
const CRL_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("host id {0:?}: {1}")]
    BadHostId(String, String),
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> PkiError {
    PkiError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, e))
}

fn first_pem_der(path: &Path, text: &str, label: &str) -> Result<Vec<u8>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| file_err(path, format!("no PEM block: {e}")))?;
    if pem.label != label {
        return Err(file_err(
            path,
            format!("holds a {} PEM block, not {label}", pem.label),
        ));
    }
    Ok(pem.contents)
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The host certificate's serial, hex.
    pub serial: String,
    /// Serials in the CRL now (this one included).
    pub total: usize,
    /// False when the certificate was revoked already (the CRL is rewritten all the same).
    pub newly: bool,
    pub crl: PathBuf,
}

/// A revoked serial (DER integer bytes) and when it was revoked (unix seconds).
type RevokedSerial = (Vec<u8>, i64);

/// Serials already in `DIR/crl.pem` with their revocation times, and the list's CRL number
/// (none and 0 when there is no file).
fn revoked_so_far(crl: &Path) -> Result<(Vec<RevokedSerial>, u64), PkiError> {
    let text = match std::fs::read_to_string(crl) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(file_err(crl, e)),
    };
    let der = first_pem_der(crl, &text, "X509 CRL")?;
    let (_, list) = CertificateRevocationList::from_der(&der)
        .map_err(|e| file_err(crl, format!("not a CRL: {e}")))?;
    let number = list
        .crl_number()
        .map(|n| n.to_u64_digits())
        .and_then(|d| if d.len() == 1 { Some(d[0]) } else { None })
        .unwrap_or(0);
    let serials = list
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.timestamp()))
        .collect();
    Ok((serials, number))
}

/// Revokes `host_id`'s current certificate: `DIR/crl.pem` is signed anew by the CA in `DIR`
/// with every serial revoked before plus this one, and written atomically.
pub fn revoke(dir: &Path, host_id: &str) -> Result<Revoked, PkiError> {
    cis490_common::validate_id(host_id)
        .map_err(|e| PkiError::BadHostId(host_id.to_string(), e.to_string()))?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let cert_path = dir
        .join("hosts")
        .join(host_id)
        .join(format!("{host_id}.pem"));
    let ca_pem = read_text(&ca_pem_path)?;
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path)?)
        .map_err(|e| file_err(&ca_key_path, format!("not a usable private key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| file_err(&ca_pem_path, format!("not a usable CA certificate: {e}")))?;
    let cert_text = read_text(&cert_path)?;
    let der = first_pem_der(&cert_path, &cert_text, "CERTIFICATE")?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| file_err(&cert_path, format!("not a certificate: {e}")))?;
    let ca_der = first_pem_der(&ca_pem_path, &ca_pem, "CERTIFICATE")?;
    let (_, ca) = X509Certificate::from_der(&ca_der)
        .map_err(|e| file_err(&ca_pem_path, format!("not a certificate: {e}")))?;
    if let Ok(Some(ku)) = ca.key_usage() {
        if !ku.value.crl_sign() {
            return Err(file_err(
                &ca_pem_path,
                "the CA may not sign CRLs (its key usage lacks cRLSign); the receiver would refuse such a list",
            ));
        }
    }
    if cert.issuer() != ca.subject() {
        return Err(file_err(
            &cert_path,
            format!("was not issued by the CA in {}", ca_pem_path.display()),
        ));
    }
    let serial = cert.raw_serial().to_vec();
    let crl_path = dir.join("crl.pem");
    let (mut list, last_number) = revoked_so_far(&crl_path)?;
    let now = time::OffsetDateTime::now_utc();
    let newly = !list.iter().any(|(s, _)| *s == serial);
    if newly {
        list.push((serial.clone(), now.unix_timestamp()));
    }
    let revoked_certs = list
        .iter()
        .map(|(s, at)| RevokedCertParams {
            serial_number: SerialNumber::from_slice(s),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(CRL_DAYS),
        // Increasing, even for two revocations within one second.
        crl_number: SerialNumber::from((now.unix_timestamp().max(1) as u64).max(last_number + 1)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&issuer)
        .and_then(|c| c.pem())
        .map_err(|e| file_err(&crl_path, format!("cannot sign the CRL: {e}")))?;
    cis490_common::durable::write_atomic(&crl_path, crl.as_bytes())
        .map_err(|e| file_err(&crl_path, e))?;
    Ok(Revoked {
        serial: hex::encode(&serial),
        total: list.len(),
        newly,
        crl: crl_path,
    })
}
