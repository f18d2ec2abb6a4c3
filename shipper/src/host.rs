//! This lab host as the commands see it: which commit its install checkout is at, the
//! connection to the receiver its config describes, and the commands that fix it. `cli`,
//! `doctor` and the daemon (which re-reads the HEAD at every scan) use it.

use std::path::Path;
use std::time::Duration;

use cis490_common::tls::{ClientTlsFiles, TlsKeys};

use crate::config::{Config, ConfigError};
use crate::transport::{Settings, Transport};

/// What brings a daemon whose binary was replaced onto the new one (SPEC §12).
pub(crate) const RESTART: &str = "sudo systemctl restart cis490-shipper";
/// What a lab host runs when its code is out of date (the receiver's default remediation).
pub(crate) const DEFAULT_REMEDIATION: &str = "cd /opt/cis490 && sudo -u cis490 git pull origin main\nsudo /opt/cis490/scripts/install-lab-host.sh";

/// HEAD of the install root, if it is a git checkout. Read in-process (no `git` subprocess);
/// cheap enough for every scan of the daemon.
pub(crate) fn installed_commit(root: &Path) -> Option<String> {
    let repo = gix::open_opts(root, gix::open::Options::isolated()).ok()?;
    repo.head_id().ok().map(|id| id.to_string())
}

/// Builds the transport; certificate and token problems are config errors naming the key.
pub(crate) fn transport(cfg: &Config, path: &Path) -> Result<Transport, ConfigError> {
    let r = &cfg.receiver;
    let files = ClientTlsFiles {
        ca_file: &r.ca_file,
        cert_file: &r.cert_file,
        key_file: &r.key_file,
    };
    let tls = cis490_common::tls::client_config(&files, false).map_err(|e| {
        let key = e.config_key(&TlsKeys {
            cert: (&r.cert_file, "receiver.cert_file"),
            key: (&r.key_file, "receiver.key_file"),
            ca: (&r.ca_file, "receiver.ca_file"),
            crl: None,
            pair: "receiver.cert_file",
        });
        ConfigError::new(path, key, e.to_string())
    })?;
    let token = cfg.token(path)?;
    Transport::new(Settings {
        urls: r.url.list(),
        tls,
        token,
        connect_timeout: Duration::from_secs(r.connect_timeout_s),
        idle_timeout: Duration::from_secs(r.idle_timeout_s),
        bandwidth_limit_mbps: cfg.shipping.bandwidth_limit_mbps,
        host_commit: installed_commit(&r.install_root),
    })
    .map_err(|e| ConfigError::new(path, "receiver.url", e))
}
