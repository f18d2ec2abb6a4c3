//! A certificate authority made fresh for each test, with server and client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
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
    /// Creates `dir/<name>-ca.pem` and keeps the CA key in memory for signing.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.key")), ca_key.serialize_pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca_file,
            ca_params: p,
            ca_key,
            name: name.to_string(),
        }
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> CertFiles {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
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

    /// A client certificate for `host`.
    pub fn client(&self, host: &str) -> CertFiles {
        self.client_with(host, Naming::DnsSan, Validity::Current)
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
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        params.signed_by(&issuer).unwrap().pem().unwrap()
    }

    /// The CA's own certificate and key, presented as if it were a client certificate.
    pub fn ca_as_client(&self) -> CertFiles {
        let key = self.dir.join(format!("{}-ca.key", self.name));
        CertFiles {
            cert: self.ca_file.clone(),
            key,
        }
    }
}
