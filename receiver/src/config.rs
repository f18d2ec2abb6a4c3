//! `receiver.toml` (SPEC §6): every key with its default, unknown keys rejected by name, and a
//! validation pass that loads certificates and probes the store before anything is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/cis490/receiver.toml";
pub const ENV_PATH: &str = "CIS490_RECEIVER_CONFIG";

pub const DEFAULT_REMEDIATION: &str = "cd /opt/cis490 && sudo -u cis490 git pull origin main\nsudo /opt/cis490/scripts/install-lab-host.sh";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    #[serde(default = "default_store_dir")]
    pub store_dir: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub version_gate: GateConfig,
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

/// `[fleet]` (SPEC §11).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A host with no request for this long is `silent`.
    pub silent_after_s: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            silent_after_s: 21_600,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9490))
}
fn default_store_dir() -> PathBuf {
    PathBuf::from("/var/lib/cis490/store")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
    /// PEM CRLs; reloaded on SIGHUP (SPEC §16).
    pub crl_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub tokens_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_uncompressed_bytes: u64,
    pub max_concurrent_uploads: usize,
    pub header_timeout_s: u64,
    pub body_idle_timeout_s: u64,
    /// Longest tar entry name admitted (SPEC §16).
    pub max_path_bytes: usize,
    /// Largest uncompressed/compressed ratio once 1 MiB is decoded (SPEC §16).
    pub max_compression_ratio: u64,
    /// Upload slots one host may hold at once (SPEC §16).
    pub max_uploads_per_host: usize,
    /// Slowest body accepted, over any 60 s window after the first 60 s (SPEC §16).
    pub min_body_bytes_per_s: u64,
    /// Open connections; more are closed before the TLS handshake (SPEC §16).
    pub max_connections: usize,
    /// TLS handshakes running at once (SPEC §16).
    pub max_handshakes: usize,
    /// A connection with no request for this long is closed (SPEC §16).
    pub idle_timeout_s: u64,
    /// How long the received prefix of an interrupted upload is kept for a resume (SPEC §13).
    pub resume_keep_s: u64,
    /// Most bytes held for resumes; the oldest prefixes are dropped first (SPEC §13).
    pub resume_max_bytes: u64,
    /// Memory the uploads' zstd decoders may hold together (docs/receiver.md); an upload whose
    /// decoder does not fit waits, then gets 503 `overloaded`.
    pub decoder_memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 30,
            max_uncompressed_bytes: 128 << 30,
            max_concurrent_uploads: 64,
            header_timeout_s: 10,
            body_idle_timeout_s: 60,
            max_path_bytes: crate::tarwalk::DEFAULT_MAX_PATH_BYTES,
            max_compression_ratio: crate::ingest::DEFAULT_MAX_COMPRESSION_RATIO,
            max_uploads_per_host: 8,
            min_body_bytes_per_s: 16384,
            max_connections: 1024,
            max_handshakes: 64,
            idle_timeout_s: 300,
            resume_keep_s: 86400,
            resume_max_bytes: 64 << 30,
            decoder_memory_bytes: crate::decoders::DEFAULT_BUDGET,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Fs,
    S3,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub kind: StoreKind,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    #[serde(default)]
    pub prefix: String,
    pub access_key_file: Option<PathBuf>,
    pub secret_key_file: Option<PathBuf>,
    /// Seconds between background scrubs of the store (SPEC §15); 0 turns them off.
    #[serde(default = "default_scrub_interval_s")]
    pub scrub_interval_s: u64,
    /// Read rate of a scrub, background or `scrub` (0: no limit).
    #[serde(default = "default_scrub_max_bytes_per_s")]
    pub scrub_max_bytes_per_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Fs,
            endpoint: None,
            region: None,
            bucket: None,
            prefix: String::new(),
            access_key_file: None,
            secret_key_file: None,
            scrub_interval_s: default_scrub_interval_s(),
            scrub_max_bytes_per_s: default_scrub_max_bytes_per_s(),
        }
    }
}

fn default_scrub_interval_s() -> u64 {
    604_800
}
fn default_scrub_max_bytes_per_s() -> u64 {
    50_000_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    pub enabled: bool,
    pub window: usize,
    pub refresh_interval_s: u64,
    pub branch: String,
    pub repo_path: Option<PathBuf>,
    pub remediation: String,
    pub forgejo: Option<ForgejoConfig>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            enabled: true,
            window: 100,
            refresh_interval_s: 5,
            branch: "main".into(),
            repo_path: None,
            remediation: DEFAULT_REMEDIATION.into(),
            forgejo: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgejoConfig {
    pub base_url: String,
    pub owner: String,
    pub repo: String,
    pub token_file: Option<PathBuf>,
    /// Extra CA bundle for a Forgejo behind a private CA; the system roots are used otherwise.
    pub ca_file: Option<PathBuf>,
    /// Lets a token go to an `http://` base_url (SPEC §16); off by default.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    pub keep_days: u64,
    pub max_bytes: u64,
    /// Most entries kept, oldest dropped first (SPEC §16); 0 = no count limit.
    pub max_entries: u64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            keep_days: 30,
            max_bytes: 10 << 30,
            max_entries: 100_000,
        }
    }
}

pub use cis490_common::config_file::ConfigError;
use cis490_common::config_file::{self, Validate};

/// Longest timeout accepted: deadlines are computed as now + timeout.
const MAX_TIMEOUT_S: u64 = 365 * 86_400;

impl Config {
    /// Reads, parses and validates the file. What the config names (certificates, key
    /// files, the store) is checked when the receiver is set up (`setup`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        config_file::load(path)
    }

    /// Parses and validates a config's text.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        config_file::parse(path, text)
    }
}

impl Validate for Config {
    /// Checks values that parse but cannot work.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |k: &str, m: &str| Err(ConfigError::new(path, k, m));
        if self.fleet.silent_after_s == 0 || self.fleet.silent_after_s > MAX_TIMEOUT_S {
            return err(
                "fleet.silent_after_s",
                "must be between 1 and 31536000 (a year)",
            );
        }
        if self.store.scrub_interval_s > MAX_TIMEOUT_S {
            return err(
                "store.scrub_interval_s",
                "must be at most 31536000 (a year)",
            );
        }
        if self.limits.max_body_bytes == 0 {
            return err("limits.max_body_bytes", "must be greater than 0");
        }
        if self.limits.max_uncompressed_bytes == 0 {
            return err("limits.max_uncompressed_bytes", "must be greater than 0");
        }
        if self.limits.max_concurrent_uploads == 0 {
            return err("limits.max_concurrent_uploads", "must be greater than 0");
        }
        if self.limits.header_timeout_s == 0 {
            return err("limits.header_timeout_s", "must be greater than 0");
        }
        if self.limits.body_idle_timeout_s == 0 {
            return err("limits.body_idle_timeout_s", "must be greater than 0");
        }
        if !(101..=1 << 20).contains(&self.limits.max_path_bytes) {
            return err(
                "limits.max_path_bytes",
                "must be between 101 and 1048576 (names up to 100 bytes fit a tar header)",
            );
        }
        if self.limits.decoder_memory_bytes < crate::decoders::MIN_BUDGET {
            return err(
                "limits.decoder_memory_bytes",
                "must be at least 4194304 (4 MiB: one decoder of a 2 MiB window, zstd level 3's)",
            );
        }
        if self.limits.max_uploads_per_host == 0 {
            return err("limits.max_uploads_per_host", "must be greater than 0");
        }
        if self.limits.max_connections == 0 {
            return err("limits.max_connections", "must be greater than 0");
        }
        if self.limits.max_handshakes == 0 {
            return err("limits.max_handshakes", "must be greater than 0");
        }
        if self.limits.idle_timeout_s == 0 {
            return err("limits.idle_timeout_s", "must be greater than 0");
        }
        for (key, v) in [
            ("limits.header_timeout_s", self.limits.header_timeout_s),
            (
                "limits.body_idle_timeout_s",
                self.limits.body_idle_timeout_s,
            ),
            ("limits.idle_timeout_s", self.limits.idle_timeout_s),
        ] {
            if v > MAX_TIMEOUT_S {
                return err(key, "must be at most 31536000 (a year)");
            }
        }
        if self.version_gate.window == 0 {
            return err("version_gate.window", "must be greater than 0");
        }
        if self.version_gate.refresh_interval_s == 0 {
            return err("version_gate.refresh_interval_s", "must be greater than 0");
        }
        if self.version_gate.branch.trim().is_empty() {
            return err("version_gate.branch", "must not be empty");
        }
        if self.store.kind == StoreKind::S3 {
            let st = &self.store;
            match st.endpoint.as_deref() {
                None => return err("store.endpoint", "is required when store.kind = \"s3\""),
                Some(e) if !(e.starts_with("https://") || e.starts_with("http://")) => {
                    return err("store.endpoint", "must start with https:// or http://")
                }
                _ => {}
            }
            if st.bucket.as_deref().is_none_or(|b| b.trim().is_empty()) {
                return err("store.bucket", "is required when store.kind = \"s3\"");
            }
            if st.access_key_file.is_none() {
                return err(
                    "store.access_key_file",
                    "is required when store.kind = \"s3\"",
                );
            }
            if st.secret_key_file.is_none() {
                return err(
                    "store.secret_key_file",
                    "is required when store.kind = \"s3\"",
                );
            }
            let p = &st.prefix;
            if !p.is_empty()
                && (!p.ends_with('/')
                    || p.starts_with('/')
                    || p.contains("//")
                    || p.split('/').any(|seg| seg == "." || seg == ".."))
            {
                return err(
                    "store.prefix",
                    "must be empty or like \"lab1/\" (ends with /, no leading /, no empty, . or .. segments)",
                );
            }
        }
        if let Some(f) = &self.version_gate.forgejo {
            if !(f.base_url.starts_with("https://") || f.base_url.starts_with("http://")) {
                return err(
                    "version_gate.forgejo.base_url",
                    "must start with https:// or http://",
                );
            }
            if f.base_url.starts_with("http://") && f.token_file.is_some() && !f.allow_insecure_http
            {
                return err(
                    "version_gate.forgejo.base_url",
                    "is http:// while token_file is set: the token would cross the network in clear text (use https://, or set allow_insecure_http = true)",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[tls]
cert_file = "/c.pem"
key_file = "/k.pem"
client_ca_file = "/ca.pem"
"#;

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::parse(Path::new("r.toml"), MIN).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9490");
        assert_eq!(c.limits.max_body_bytes, 32 << 30);
        assert_eq!(c.limits.max_uncompressed_bytes, 128 << 30);
        assert_eq!(c.limits.max_concurrent_uploads, 64);
        assert_eq!(c.limits.header_timeout_s, 10);
        assert_eq!(c.limits.body_idle_timeout_s, 60);
        assert!(c.version_gate.enabled);
        assert_eq!(c.version_gate.window, 100);
        assert_eq!(c.version_gate.refresh_interval_s, 5);
        assert_eq!(c.version_gate.branch, "main");
        assert_eq!(c.quarantine.keep_days, 30);
        assert_eq!(c.quarantine.max_bytes, 10 << 30);
        assert_eq!(c.store.kind, StoreKind::Fs);
    }

    #[test]
    fn hardening_defaults_follow_spec_section_16_and_the_example_file_says_the_same() {
        let c = Config::parse(Path::new("r.toml"), MIN).unwrap();
        let l = &c.limits;
        assert_eq!(l.max_path_bytes, 4096);
        assert_eq!(l.max_compression_ratio, 1000);
        assert_eq!(l.max_uploads_per_host, 8);
        assert_eq!(l.min_body_bytes_per_s, 16384);
        assert_eq!(l.resume_keep_s, 86400);
        assert_eq!(l.resume_max_bytes, 64 << 30);
        assert_eq!(l.max_connections, 1024);
        assert_eq!(l.max_handshakes, 64);
        assert_eq!(l.idle_timeout_s, 300);
        assert_eq!(l.decoder_memory_bytes, 24 << 20);
        assert_eq!(c.quarantine.max_entries, 100_000);
        assert!(c.tls.crl_file.is_none());
        let example = include_str!("../../etc/receiver.toml.example");
        let e = Config::parse(Path::new("receiver.toml.example"), example).unwrap();
        assert_eq!(format!("{:?}", e.limits), format!("{:?}", c.limits));
        assert_eq!(e.quarantine.max_entries, c.quarantine.max_entries);
    }

    #[test]
    fn hardening_values_that_cannot_work_name_their_key() {
        for (extra, key) in [
            ("[limits]\nmax_path_bytes = 100\n", "limits.max_path_bytes"),
            ("[limits]\nmax_path_bytes = 2000000\n", "limits.max_path_bytes"),
            ("[limits]\nmax_uploads_per_host = 0\n", "limits.max_uploads_per_host"),
            ("[limits]\ndecoder_memory_bytes = 4194303\n", "limits.decoder_memory_bytes"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nmax_handshakes = 0\n", "limits.max_handshakes"),
            ("[limits]\nidle_timeout_s = 0\n", "limits.idle_timeout_s"),
            ("[limits]\nidle_timeout_s = 99999999999\n", "limits.idle_timeout_s"),
            ("[limits]\nbody_idle_timeout_s = 99999999999\n", "limits.body_idle_timeout_s"),
            (
                "[version_gate.forgejo]\nbase_url = \"http://f.lab\"\nowner = \"o\"\nrepo = \"r\"\ntoken_file = \"/t\"\n",
                "version_gate.forgejo.base_url",
            ),
        ] {
            let text = format!("{MIN}{extra}");
            let e = Config::parse(Path::new("r.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        // The same Forgejo URL with the explicit opt-in, or without a token, is accepted.
        for extra in [
            "[version_gate.forgejo]\nbase_url = \"http://f.lab\"\nowner = \"o\"\nrepo = \"r\"\ntoken_file = \"/t\"\nallow_insecure_http = true\n",
            "[version_gate.forgejo]\nbase_url = \"http://f.lab\"\nowner = \"o\"\nrepo = \"r\"\n",
        ] {
            let text = format!("{MIN}{extra}");
            Config::parse(Path::new("r.toml"), &text).unwrap();
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = format!("{MIN}\n[limits]\nmax_body_byte = 3\n");
        let e = Config::parse(Path::new("/etc/r.toml"), &text).unwrap_err();
        let line = e.to_string();
        assert!(line.starts_with("/etc/r.toml: line "), "{line}");
        assert!(line.contains("max_body_byte"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn wrong_types_name_the_line() {
        let text = format!("{MIN}\n[version_gate]\nwindow = \"ten\"\n");
        let e = Config::parse(Path::new("r.toml"), &text).unwrap_err();
        assert!(e.to_string().contains("`window`"), "{e}");
    }

    #[test]
    fn zero_window_is_rejected() {
        let text = format!("{MIN}\n[version_gate]\nwindow = 0\n");
        let e = Config::parse(Path::new("r.toml"), &text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.toml: version_gate.window: must be greater than 0"
        );
    }

    #[test]
    fn s3_store_keys_are_checked_by_name() {
        let full = "[store]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"b\"\naccess_key_file = \"/k\"\nsecret_key_file = \"/s\"\n";
        let ok = Config::parse(Path::new("r.toml"), &format!("{MIN}\n{full}")).unwrap();
        assert_eq!(ok.store.prefix, "");
        let cases = [
            ("endpoint = \"http://127.0.0.1:3900\"\n", "", "r.toml: store.endpoint: is required when store.kind = \"s3\""),
            ("endpoint = \"http://127.0.0.1:3900\"", "endpoint = \"ftp://x\"", "r.toml: store.endpoint: must start with https:// or http://"),
            ("bucket = \"b\"\n", "", "r.toml: store.bucket: is required when store.kind = \"s3\""),
            ("access_key_file = \"/k\"\n", "", "r.toml: store.access_key_file: is required when store.kind = \"s3\""),
            ("secret_key_file = \"/s\"\n", "", "r.toml: store.secret_key_file: is required when store.kind = \"s3\""),
            ("bucket = \"b\"", "bucket = \"b\"\nprefix = \"lab1\"", "r.toml: store.prefix: must be empty or like \"lab1/\" (ends with /, no leading /, no empty, . or .. segments)"),
            ("bucket = \"b\"", "bucket = \"b\"\nprefix = \"a//b/\"", "r.toml: store.prefix: must be empty or like \"lab1/\" (ends with /, no leading /, no empty, . or .. segments)"),
            ("bucket = \"b\"", "bucket = \"b\"\nprefix = \"../x/\"", "r.toml: store.prefix: must be empty or like \"lab1/\" (ends with /, no leading /, no empty, . or .. segments)"),
        ];
        for (from, to, want) in cases {
            let text = format!("{MIN}\n{}", full.replace(from, to));
            assert_eq!(
                Config::parse(Path::new("r.toml"), &text)
                    .unwrap_err()
                    .to_string(),
                want
            );
        }
        let good_prefix = full.replace("bucket = \"b\"", "bucket = \"b\"\nprefix = \"lab1/raw/\"");
        Config::parse(Path::new("r.toml"), &format!("{MIN}\n{good_prefix}")).unwrap();
        let bad_kind = format!("{MIN}\n[store]\nkind = \"nfs\"\n");
        let e = Config::parse(Path::new("r.toml"), &bad_kind).unwrap_err();
        assert!(e.to_string().contains("nfs"), "{e}");
    }
}
