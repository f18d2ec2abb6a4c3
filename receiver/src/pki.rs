//! `cis490-receiver pki` (SPEC §14, §16): the lab's certificates made in-process with rcgen, in
//! one directory: `DIR/ca.pem`, `DIR/ca.key`, the receiver's `DIR/receiver.pem`/`.key`, each
//! host's current certificate at `DIR/hosts/<HOST_ID>/<HOST_ID>.pem` (with its key and a copy of
//! the CA), and the revocation list `DIR/crl.pem` that `[tls] crl_file` points at. Keys are
//! written owner-only through the durable-write helper.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
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
    #[error("{0} already holds a CA (ca.pem or ca.key); nothing was changed (use a new directory, or `pki issue` to add hosts)")]
    CaExists(PathBuf),
    #[error("{0}")]
    Usage(String),
}

/// Default lifetimes (days): the CA, the receiver's server certificate, a host's certificate.
pub const CA_DAYS: u32 = 3650;
pub const SERVER_DAYS: u32 = 825;
pub const HOST_DAYS: u32 = 397;
/// `pki list` exits 1 when a certificate expires within this many days.
pub const WARN_DAYS: i64 = 30;

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
    // The name alone is not enough: every `pki init` names its CA alike, so a certificate of
    // another lab's CA would match. Its signature must verify with this CA's key.
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
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

fn validity(days: u32) -> Result<(time::OffsetDateTime, time::OffsetDateTime), PkiError> {
    if days == 0 {
        return Err(PkiError::Usage("--days must be at least 1".into()));
    }
    // A little slack backwards so that a host whose clock runs behind accepts it at once.
    let now = time::OffsetDateTime::now_utc();
    Ok((
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    ))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER integer without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn sign_err(path: &Path, e: rcgen::Error) -> PkiError {
    file_err(path, format!("cannot make the certificate: {e}"))
}

fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    cis490_common::durable::write_atomic(path, text.as_bytes()).map_err(|e| file_err(path, e))
}

fn write_key(path: &Path, key: &KeyPair) -> Result<(), PkiError> {
    cis490_common::durable::write_atomic_private(path, key.serialize_pem().as_bytes())
        .map_err(|e| file_err(path, e))
}

/// A name for the receiver's certificate: an IP address or a DNS name.
fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(PkiError::Usage(format!(
            "--name {name:?} is neither an IP address nor a DNS name"
        )));
    }
    rcgen::string::Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|e| PkiError::Usage(format!("--name {name:?}: {e}")))
}

/// The names `init` puts in the receiver's certificate when none is given.
pub fn default_names() -> Vec<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut names = Vec::new();
    if !host.is_empty() && host != "localhost" {
        names.push(host);
    }
    names.push("localhost".into());
    names
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialised {
    pub ca: PathBuf,
    pub server: PathBuf,
    pub server_key: PathBuf,
    pub names: Vec<String>,
}

/// `pki init`: a new CA and the receiver's server certificate in `dir`. Refuses, changing
/// nothing, when `dir` already holds a CA.
pub fn init(
    dir: &Path,
    names: &[String],
    ca_days: u32,
    server_days: u32,
) -> Result<Initialised, PkiError> {
    let (ca_pem, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if ca_pem.exists() || ca_key_path.exists() {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    let names: Vec<String> = if names.is_empty() {
        default_names()
    } else {
        names.to_vec()
    };
    let sans = names
        .iter()
        .map(|n| san(n))
        .collect::<Result<Vec<_>, _>>()?;
    let (ca_from, ca_until) = validity(ca_days)?;
    let (srv_from, srv_until) = validity(server_days)?;
    // Everything is made before anything is written.
    let ca_key = KeyPair::generate().map_err(|e| sign_err(&ca_key_path, e))?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "cis490 lab CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = ca_from;
    ca.not_after = ca_until;
    ca.serial_number = Some(random_serial());
    let ca_cert = ca
        .clone()
        .self_signed(&ca_key)
        .map_err(|e| sign_err(&ca_pem, e))?;
    let issuer = Issuer::new(ca, &ca_key);
    let server_path = dir.join("receiver.pem");
    let server_key_path = dir.join("receiver.key");
    let server_key = KeyPair::generate().map_err(|e| sign_err(&server_key_path, e))?;
    let mut srv = CertificateParams::default();
    srv.subject_alt_names = sans;
    srv.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    srv.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    srv.not_before = srv_from;
    srv.not_after = srv_until;
    srv.serial_number = Some(random_serial());
    let server = srv
        .signed_by(&server_key, &issuer)
        .map_err(|e| sign_err(&server_path, e))?;

    let created = !dir.exists();
    cis490_common::durable::create_dir_durable(dir).map_err(|e| file_err(dir, e))?;
    if created {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| file_err(dir, e))?;
    }
    // The key first: a ca.pem without its key would make the next `init` refuse for nothing.
    write_key(&ca_key_path, &ca_key)?;
    write_public(&ca_pem, &ca_cert.pem())?;
    write_key(&server_key_path, &server_key)?;
    write_public(&server_path, &server.pem())?;
    Ok(Initialised {
        ca: ca_pem,
        server: server_path,
        server_key: server_key_path,
        names,
    })
}

/// What `issue` made.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
    /// A certificate of this host was at `cert` before: this one replaces it.
    pub renewed: bool,
}

fn load_issuer(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), PkiError> {
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_pem = read_text(&ca_pem_path)?;
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path)?)
        .map_err(|e| file_err(&ca_key_path, format!("not a usable private key: {e}")))?;
    // A key that is not the certificate's would sign certificates no receiver accepts.
    let ca_der = first_pem_der(&ca_pem_path, &ca_pem, "CERTIFICATE")?;
    let (_, ca_cert) = X509Certificate::from_der(&ca_der)
        .map_err(|e| file_err(&ca_pem_path, format!("not a certificate: {e}")))?;
    let key_bytes = rcgen::PublicKeyData::der_bytes(&ca_key);
    if ca_cert.public_key().subject_public_key.data.as_ref() != key_bytes {
        return Err(file_err(
            &ca_key_path,
            format!(
                "is not the key of the CA certificate {}",
                ca_pem_path.display()
            ),
        ));
    }
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| file_err(&ca_pem_path, format!("not a usable CA certificate: {e}")))?;
    Ok((ca_pem, issuer))
}

/// `pki issue`: a client certificate for `host_id` (DNS SAN and CN = `host_id`, clientAuth),
/// signed by the CA in `dir`, written to `out` (default `dir/hosts/<host_id>/`).
pub fn issue(dir: &Path, host_id: &str, days: u32, out: Option<&Path>) -> Result<Issued, PkiError> {
    cis490_common::validate_id(host_id)
        .map_err(|e| PkiError::BadHostId(host_id.to_string(), e.to_string()))?;
    let (ca_pem, issuer) = load_issuer(dir)?;
    let out = out.map_or_else(|| dir.join("hosts").join(host_id), Path::to_path_buf);
    let cert_path = out.join(format!("{host_id}.pem"));
    let key_path = out.join(format!("{host_id}.key"));
    let (from, until) = validity(days)?;
    let key = KeyPair::generate().map_err(|e| sign_err(&key_path, e))?;
    let mut p = CertificateParams::default();
    let name = rcgen::string::Ia5String::try_from(host_id)
        .map_err(|e| PkiError::BadHostId(host_id.to_string(), e.to_string()))?;
    p.subject_alt_names = vec![SanType::DnsName(name)];
    p.distinguished_name.push(DnType::CommonName, host_id);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = from;
    p.not_after = until;
    let serial = random_serial();
    p.serial_number = Some(serial.clone());
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| sign_err(&cert_path, e))?;
    let renewed = cert_path.exists();
    let ca_copy = out.join("ca.pem");
    let bundle = [
        (key_path.clone(), key.serialize_pem(), true),
        (cert_path.clone(), cert.pem(), false),
        (ca_copy.clone(), ca_pem, false),
    ];
    write_bundle(&out, &bundle)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        ca: ca_copy,
        serial: hex::encode(serial.as_ref()),
        renewed,
    })
}

/// Writes a host's key, certificate and CA copy so that a crash at any moment leaves either
/// the old bundle or the new one, never a key beside a certificate it does not belong to.
/// The bundle is made complete in a sibling directory, then swapped with `out` in one
/// `renameat2(RENAME_EXCHANGE)`; a new `out` is renamed into place. An `out` that holds other
/// files (a `--out` shared with something else) is written file by file instead.
fn write_bundle(out: &Path, files: &[(PathBuf, String, bool)]) -> Result<(), PkiError> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let ours: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|(p, _, _)| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let shared = std::fs::read_dir(out).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| !ours.contains(&e.file_name()))
    });
    let write_all = |dir: &Path| -> Result<(), PkiError> {
        for (path, text, private) in files {
            let target = dir.join(path.file_name().unwrap_or_default());
            if *private {
                cis490_common::durable::write_atomic_private(&target, text.as_bytes())
            } else {
                cis490_common::durable::write_atomic(&target, text.as_bytes())
            }
            .map_err(|e| file_err(&target, e))?;
        }
        Ok(())
    };
    cis490_common::durable::create_dir_durable(parent).map_err(|e| file_err(parent, e))?;
    if shared {
        return write_all(out);
    }
    let staging = parent.join(format!(".{name}.new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(|e| file_err(&staging, e))?;
    let result = write_all(&staging).and_then(|()| {
        if out.exists() {
            renameat2(
                AT_FDCWD,
                &staging,
                AT_FDCWD,
                out,
                RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| file_err(out, format!("cannot swap in the new bundle: {e}")))?;
        } else {
            std::fs::rename(&staging, out).map_err(|e| file_err(out, e))?;
        }
        cis490_common::durable::fsync_dir(parent).map_err(|e| file_err(parent, e))
    });
    // After a swap the staging name holds the old bundle; after a failure, the new one.
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// One certificate as `pki list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub file: PathBuf,
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    pub days_left: i64,
    pub revoked: bool,
}

fn describe(path: &Path, revoked: &[Vec<u8>], now: SystemTime) -> Result<Listed, PkiError> {
    let text = read_text(path)?;
    let der = first_pem_der(path, &text, "CERTIFICATE")?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| file_err(path, format!("not a certificate: {e}")))?;
    let not_after = cert.validity().not_after.timestamp();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(not_after.max(0) as u64);
    Ok(Listed {
        file: path.to_path_buf(),
        subject: cert.subject().to_string(),
        serial: hex::encode(cert.raw_serial()),
        not_after: cis490_common::timefmt::rfc3339(at),
        days_left: (not_after - now_s).div_euclid(86_400),
        revoked: revoked.iter().any(|s| s.as_slice() == cert.raw_serial()),
    })
}

/// `pki list`: the CA, the receiver's certificate and every host's current certificate in
/// `dir`, soonest expiry first, and one line per file that could not be read.
pub fn list(dir: &Path) -> Result<(Vec<Listed>, Vec<String>), PkiError> {
    let (revoked, _) = revoked_so_far(&dir.join("crl.pem"))?;
    let revoked: Vec<Vec<u8>> = revoked.into_iter().map(|(s, _)| s).collect();
    let now = SystemTime::now();
    let mut files = vec![dir.join("ca.pem")];
    if dir.join("receiver.pem").exists() {
        files.push(dir.join("receiver.pem"));
    }
    let hosts = dir.join("hosts");
    if let Ok(entries) = std::fs::read_dir(&hosts) {
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for h in names {
            let p = hosts.join(&h).join(format!("{h}.pem"));
            if p.exists() {
                files.push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    for f in &files {
        match describe(f, &revoked, now) {
            Ok(l) => out.push(l),
            Err(e) => unreadable.push(e.to_string()),
        }
    }
    out.sort_by_key(|l| l.days_left);
    Ok((out, unreadable))
}
