//! `lab-host.toml` (SPEC §6): every key with its default, unknown keys rejected by name, and a
//! check of every value. The files it names are read later, by whoever needs them: the
//! certificates and the token by `host::transport`, `data_dir` by the commands that use it,
//! `[metrics] textfile` and `listen` by `run` before it starts (`cli::ship`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pack::{Compression, Mode};

pub const DEFAULT_PATH: &str = "/etc/cis490/lab-host.toml";
pub const ENV_PATH: &str = "CIS490_SHIPPER_CONFIG";
/// Where the lab's code is installed unless `[receiver] install_root` says otherwise.
pub const DEFAULT_INSTALL_ROOT: &str = "/opt/cis490";
/// Upper bound on `[shipping] concurrency`: far above what one host's disk and link can use,
/// and low enough that the slot semaphores and the in-hand queue stay small.
pub const MAX_CONCURRENCY: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host_id: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    pub receiver: ReceiverConfig,
    #[serde(default)]
    pub shipping: Shipping,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/cis490")
}

/// One URL or a list tried in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    One(String),
    Many(Vec<String>),
}

impl Urls {
    pub fn list(&self) -> Vec<String> {
        match self {
            Urls::One(u) => vec![u.clone()],
            Urls::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub url: Urls,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub token_file: Option<PathBuf>,
    #[serde(default = "d10")]
    pub connect_timeout_s: u64,
    #[serde(default = "d60")]
    pub idle_timeout_s: u64,
    /// The lab's code checkout: its HEAD is sent as `X-Cis490-Host-Commit` and asked about by
    /// `ping` and `doctor` (SPEC §11).
    #[serde(default = "default_install_root")]
    pub install_root: PathBuf,
}

fn default_install_root() -> PathBuf {
    PathBuf::from(DEFAULT_INSTALL_ROOT)
}

fn d10() -> u64 {
    10
}
fn d60() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shipping {
    pub scan_interval_s: u64,
    pub settle_s: u64,
    pub concurrency: usize,
    /// "auto" (default) or "level"; checked by `validate`, read through [`Shipping::mode`].
    pub compression: String,
    pub zstd_level: i32,
    /// The highest level `compression = "auto"` moves to when the link is the slower stage.
    pub zstd_max_level: i32,
    pub zstd_threads: u32,
    pub max_backoff_s: u64,
    pub bandwidth_limit_mbps: f64,
}

impl Shipping {
    /// The zstd settings of one pack. `zstd_threads = 0` means "all cores" for the host, shared
    /// by the `concurrency` packs that may run at once, so packing never oversubscribes the
    /// cores (nor multiplies zstd's buffers).
    pub fn compression(&self, cores: usize) -> Compression {
        let threads = if self.zstd_threads > 0 {
            self.zstd_threads
        } else {
            (cores / self.concurrency.max(1)).max(1) as u32
        };
        Compression {
            level: self.zstd_level,
            threads,
            mode: self.mode(),
        }
    }

    /// `compression` as a mode; `validate` refused any other value, so this never falls back
    /// on a config that loaded.
    pub fn mode(&self) -> Mode {
        self.compression.parse().unwrap_or_default()
    }
}

impl Default for Shipping {
    fn default() -> Self {
        Shipping {
            scan_interval_s: 5,
            settle_s: 5,
            concurrency: 2,
            compression: "auto".into(),
            zstd_level: 3,
            zstd_max_level: 9,
            zstd_threads: 0,
            max_backoff_s: 300,
            bandwidth_limit_mbps: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub shipped_keep_days: u64,
    pub quarantine_keep_days: u64,
    pub cleanup_interval_s: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            shipped_keep_days: 14,
            quarantine_keep_days: 30,
            cleanup_interval_s: 3600,
        }
    }
}

/// `[metrics]` (SPEC §12): where the daemon shows its metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `address:port` of the plain-HTTP `/metrics` and `/healthz` listener; "" turns it off.
    pub listen: String,
    /// A file rewritten at every scan for node_exporter's textfile collector; "" turns it off.
    pub textfile: PathBuf,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9491".into(),
            textfile: PathBuf::new(),
        }
    }
}

impl MetricsConfig {
    /// The listener's address, `None` when turned off. Checked by `validate`, so a config that
    /// loaded never has an address that does not parse.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        let l = self.listen.trim();
        if l.is_empty() {
            None
        } else {
            l.parse().ok()
        }
    }

    /// The textfile, `None` when turned off.
    pub fn textfile(&self) -> Option<&Path> {
        (!self.textfile.as_os_str().is_empty()).then_some(self.textfile.as_path())
    }
}

pub use cis490_common::config_file::ConfigError;
use cis490_common::config_file::{self, Validate};

impl Config {
    /// Reads, parses and validates the file. The certificates and token it names are read
    /// when the transport is built (`host::transport`).
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
        let err = |k: &str, m: String| Err(ConfigError::new(path, k, m));
        if let Err(e) = cis490_common::validate_id(&self.host_id) {
            return err("host_id", format!("{:?}: {e}", self.host_id));
        }
        let urls = self.receiver.url.list();
        if urls.is_empty() {
            return err("receiver.url", "needs at least one URL".into());
        }
        for u in &urls {
            if let Err(e) = crate::transport::Endpoint::parse(u) {
                return err("receiver.url", e);
            }
        }
        let s = &self.shipping;
        if s.scan_interval_s == 0 {
            return err("shipping.scan_interval_s", "must be greater than 0".into());
        }
        if s.concurrency == 0 || s.concurrency > MAX_CONCURRENCY {
            return err(
                "shipping.concurrency",
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
        if let Err(e) = s.compression.parse::<Mode>() {
            return err("shipping.compression", e);
        }
        if !(1..=22).contains(&s.zstd_level) {
            return err(
                "shipping.zstd_level",
                format!("{} is outside 1..=22", s.zstd_level),
            );
        }
        if !(1..=19).contains(&s.zstd_max_level) {
            return err(
                "shipping.zstd_max_level",
                format!("{} is outside 1..=19", s.zstd_max_level),
            );
        }
        if s.max_backoff_s == 0 {
            return err("shipping.max_backoff_s", "must be greater than 0".into());
        }
        if !(s.bandwidth_limit_mbps >= 0.0 && s.bandwidth_limit_mbps.is_finite()) {
            return err(
                "shipping.bandwidth_limit_mbps",
                "must be 0 (no limit) or a positive number".into(),
            );
        }
        if self.receiver.connect_timeout_s == 0 {
            return err(
                "receiver.connect_timeout_s",
                "must be greater than 0".into(),
            );
        }
        if self.receiver.idle_timeout_s == 0 {
            return err("receiver.idle_timeout_s", "must be greater than 0".into());
        }
        if self.retention.cleanup_interval_s == 0 {
            return err(
                "retention.cleanup_interval_s",
                "must be greater than 0".into(),
            );
        }
        let listen = self.metrics.listen.trim();
        if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
            return err(
                "metrics.listen",
                format!("{listen:?} is not an address:port such as \"127.0.0.1:9491\" (\"\" turns the listener off)"),
            );
        }
        if let Some(t) = self.metrics.textfile() {
            if !t.is_absolute() || t.file_name().is_none() {
                return err(
                    "metrics.textfile",
                    format!("{} must be an absolute path to a file", t.display()),
                );
            }
        }
        Ok(())
    }
}

impl Config {
    /// The bearer token of `[receiver] token_file`, if set.
    pub fn token(&self, path: &Path) -> Result<Option<String>, ConfigError> {
        match &self.receiver.token_file {
            None => Ok(None),
            Some(f) => std::fs::read_to_string(f)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| {
                    ConfigError::new(
                        path,
                        "receiver.token_file",
                        format!("cannot read {}: {e}", f.display()),
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
host_id = "labhost-01"
[receiver]
url = "https://receiver.lab:8443"
ca_file = "/ca.pem"
cert_file = "/c.pem"
key_file = "/k.pem"
"#;

    #[test]
    fn the_example_loads_with_the_default_compression() {
        let example = include_str!("../../etc/lab-host.toml.example");
        let c = Config::parse(Path::new("lab-host.toml.example"), example).unwrap();
        assert_eq!(c.shipping.compression, Shipping::default().compression);
        assert_eq!(c.shipping.mode(), Mode::Auto);
        assert_eq!(c.shipping.zstd_level, 3);
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::parse(Path::new("l.toml"), MIN).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cis490"));
        assert_eq!(c.receiver.connect_timeout_s, 10);
        assert_eq!(c.receiver.idle_timeout_s, 60);
        assert_eq!(c.shipping.scan_interval_s, 5);
        assert_eq!(c.shipping.settle_s, 5);
        assert_eq!(c.shipping.concurrency, 2);
        assert_eq!(c.shipping.zstd_level, 3);
        assert_eq!(c.shipping.mode(), Mode::Auto);
        assert_eq!(c.shipping.zstd_threads, 0);
        assert_eq!(c.shipping.max_backoff_s, 300);
        assert_eq!(c.shipping.bandwidth_limit_mbps, 0.0);
        assert_eq!(c.retention.shipped_keep_days, 14);
        assert_eq!(c.retention.quarantine_keep_days, 30);
        assert_eq!(c.retention.cleanup_interval_s, 3600);
        assert_eq!(c.receiver.url.list(), vec!["https://receiver.lab:8443"]);
        assert_eq!(c.receiver.install_root, PathBuf::from("/opt/cis490"));
        assert_eq!(
            c.metrics.listen_addr(),
            Some("127.0.0.1:9491".parse().unwrap())
        );
        assert_eq!(c.metrics.textfile(), None);
    }

    #[test]
    fn metrics_keys_are_checked() {
        let with =
            |m: &str| Config::parse(Path::new("l.toml"), &format!("{MIN}\n[metrics]\n{m}\n"));
        let c = with("listen = \"\"\ntextfile = \"/var/lib/prometheus/node-exporter/cis490.prom\"")
            .unwrap();
        assert_eq!(c.metrics.listen_addr(), None, "\"\" turns the listener off");
        assert_eq!(
            c.metrics.textfile(),
            Some(Path::new("/var/lib/prometheus/node-exporter/cis490.prom"))
        );
        let c = with("listen = \"[::]:9491\"").unwrap();
        assert_eq!(c.metrics.listen_addr(), Some("[::]:9491".parse().unwrap()));
        let e = with("listen = \"nonsense\"").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("l.toml: metrics.listen: \"nonsense\""),
            "{e}"
        );
        for bad in ["cis490.prom", "/"] {
            let e = with(&format!("textfile = \"{bad}\"")).unwrap_err();
            assert!(
                e.to_string().starts_with("l.toml: metrics.textfile: "),
                "{bad}: {e}"
            );
        }
        let e = with("listne = \"\"").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
    }

    #[test]
    fn zero_zstd_threads_share_the_cores_between_packs() {
        let threads = |zstd_threads, concurrency, cores| {
            let s = Shipping {
                zstd_threads,
                concurrency,
                ..Shipping::default()
            };
            s.compression(cores).threads
        };
        assert_eq!(threads(0, 2, 2), 1);
        assert_eq!(threads(0, 2, 8), 4);
        assert_eq!(threads(0, 4, 2), 1);
        assert_eq!(threads(3, 2, 2), 3, "an explicit value is kept");
        assert_eq!(Shipping::default().compression(8).level, 3);
    }

    #[test]
    fn compression_is_auto_or_level_and_a_bad_value_names_the_key() {
        let with = |v: &str| {
            Config::parse(
                Path::new("l.toml"),
                &format!("{MIN}\n[shipping]\ncompression = {v}\n"),
            )
        };
        let c = with("\"level\"").unwrap();
        assert_eq!(c.shipping.compression(2).mode, Mode::Level);
        let c = with("\"auto\"").unwrap();
        assert_eq!(c.shipping.compression(2).mode, Mode::Auto);
        for bad in ["\"fast\"", "\"Auto\"", "\"\""] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("l.toml: shipping.compression: "),
                "{bad}: {e}"
            );
            assert!(e.contains("\"auto\" or \"level\""), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let e = with("3").unwrap_err().to_string();
        assert!(e.contains("`compression`"), "{e}");
    }

    #[test]
    fn zstd_max_level_defaults_to_9_and_a_bad_value_names_the_key() {
        let with = |v: &str| {
            Config::parse(
                Path::new("l.toml"),
                &format!("{MIN}\n[shipping]\nzstd_max_level = {v}\n"),
            )
        };
        assert_eq!(Shipping::default().zstd_max_level, 9);
        assert_eq!(with("19").unwrap().shipping.zstd_max_level, 19);
        assert_eq!(with("1").unwrap().shipping.zstd_max_level, 1);
        for bad in ["0", "20", "-3"] {
            let e = with(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("l.toml: shipping.zstd_max_level: {bad} is outside 1..=19"),
                "{bad}"
            );
        }
        let e = with("\"9\"").unwrap_err().to_string();
        assert!(e.contains("`zstd_max_level`"), "{e}");
    }

    #[test]
    fn url_lists_and_errors() {
        let t = MIN.replace(
            "url = \"https://receiver.lab:8443\"",
            "url = [\"https://a:8443\", \"https://b:8443\"]",
        );
        let c = Config::parse(Path::new("l.toml"), &t).unwrap();
        assert_eq!(c.receiver.url.list().len(), 2);
        let t = MIN.replace("https://receiver.lab:8443", "ftp://x");
        let e = Config::parse(Path::new("l.toml"), &t).unwrap_err();
        assert!(e.to_string().starts_with("l.toml: receiver.url: "), "{e}");
        let t = format!("{MIN}\n[shipping]\nconcurrancy = 3\n");
        let e = Config::parse(Path::new("l.toml"), &t).unwrap_err();
        assert!(e.to_string().contains("concurrancy"), "{e}");
        for bad in ["0", "257", "100000000000000000"] {
            let t = format!("{MIN}\n[shipping]\nconcurrency = {bad}\n");
            let e = Config::parse(Path::new("l.toml"), &t).unwrap_err();
            assert_eq!(
                e.to_string(),
                "l.toml: shipping.concurrency: must be between 1 and 256",
                "{bad}"
            );
        }
        let t = format!("{MIN}\n[shipping]\nconcurrency = 256\n");
        assert_eq!(
            Config::parse(Path::new("l.toml"), &t)
                .unwrap()
                .shipping
                .concurrency,
            256
        );
        let t = MIN.replace("labhost-01", "../x");
        let e = Config::parse(Path::new("l.toml"), &t).unwrap_err();
        assert!(e.to_string().contains("host_id"), "{e}");
    }
}
