//! A certificate authority made fresh for each test with the receiver's own `pki` code, as a
//! lab admin makes one, plus the odd certificates only tests need.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams,
    SerialNumber,
};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    name: String,
}

/// A certificate and key written as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Validity {
    #[default]
    Current,
    Expired,
    NotYetValid,
}

/// How a client certificate names its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    DnsSan,
    CnOnly,
}

impl Pki {
    /// Makes the CA the way a lab admin does, with `cis490-receiver pki init` (in-process):
    /// `dir/<name>/ca.pem`, `ca.key` and the receiver's certificate for `localhost` and
    /// 127.0.0.1. The CA's parameters are kept for the unusual certificates only tests need
    /// (expired, CN-only, chosen serials, CRLs).
    pub fn new(dir: &Path, name: &str) -> Pki {
        let home = dir.join(name);
        let made = cis490_receiver::pki::init(
            &home,
            &["localhost".to_string(), "127.0.0.1".to_string()],
            3650,
            825,
        )
        .unwrap_or_else(|e| panic!("pki init in {}: {e}", home.display()));
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(home.join("ca.key")).unwrap()).unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(&made.ca).unwrap(), ca_key).unwrap();
        Pki {
            dir: home,
            ca_file: made.ca,
            issuer,
            name: name.to_string(),
        }
    }

    /// The receiver certificate `pki init` made (for `localhost` and 127.0.0.1).
    pub fn receiver(&self) -> CertFiles {
        CertFiles {
            cert: self.dir.join("receiver.pem"),
            key: self.dir.join("receiver.key"),
        }
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{file_stem}.pem", self.name)),
            key: self.dir.join(format!("{}-{file_stem}.key", self.name)),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, stem: &str) -> CertFiles {
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "cis490 receiver");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(stem, p)
    }

    /// A client certificate for `host`, issued as a lab admin does with `cis490-receiver pki
    /// issue` (in-process) into `hosts/<host>/`; each call renews it. A `host` that is no valid
    /// host id (which `pki issue` refuses) is signed directly, for the tests of such names.
    pub fn client(&self, host: &str) -> CertFiles {
        if cis490_common::validate_id(host).is_err() {
            return self.client_with(host, Naming::DnsSan, Validity::Current);
        }
        let issued = cis490_receiver::pki::issue(&self.dir, host, 397, None)
            .unwrap_or_else(|e| panic!("pki issue {host}: {e}"));
        CertFiles {
            cert: issued.cert,
            key: issued.key,
        }
    }

    pub fn client_with(&self, host: &str, naming: Naming, validity: Validity) -> CertFiles {
        let sans = match naming {
            Naming::DnsSan => vec![host.to_string()],
            Naming::CnOnly => vec![],
        };
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, host);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        match validity {
            Validity::Current => {}
            Validity::Expired => {
                p.not_before = date_time_ymd(2000, 1, 1);
                p.not_after = date_time_ymd(2001, 1, 1);
            }
            Validity::NotYetValid => {
                p.not_before = date_time_ymd(2090, 1, 1);
                p.not_after = date_time_ymd(2091, 1, 1);
            }
        }
        let stem = format!("client-{host}-{naming:?}-{validity:?}");
        self.issue(&stem, p)
    }

    /// A client certificate for `host` with a chosen serial number (for revocation tests),
    /// written under its own name so other certificates of the host are left alone.
    pub fn client_serial(&self, host: &str, serial: u64) -> CertFiles {
        let mut p = CertificateParams::new(vec![host.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, host);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(SerialNumber::from(serial));
        self.issue(&format!("client-{host}-serial-{serial}"), p)
    }

    /// A PEM CRL signed by this CA revoking `serials` (none: an empty, valid list).
    pub fn crl(&self, serials: &[u64]) -> String {
        // Fixed dates around any day these tests run on (CRL expiry is not enforced).
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2090, 1, 1),
            crl_number: SerialNumber::from(serials.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from(s),
                    revocation_time: date_time_ymd(2020, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    /// The CA's own certificate and key, presented as if it were a client certificate.
    pub fn ca_as_client(&self) -> CertFiles {
        let key = self.dir.join("ca.key");
        CertFiles {
            cert: self.ca_file.clone(),
            key,
        }
    }
}
