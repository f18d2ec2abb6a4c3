//! What both daemons' config files share: where the file is, reading and parsing it, and the
//! one-line error that names the file and the key.

use std::path::{Path, PathBuf};

/// A configuration problem, rendered as one line naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// `--config`, then the environment variable (when set and not empty), then the default.
pub fn resolve_path(
    flag: Option<PathBuf>,
    env: Option<std::ffi::OsString>,
    default: &str,
) -> PathBuf {
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(default))
}

pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))
}

/// Parses TOML into `T`; an error becomes one line naming the line and the key on it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let message = err.message().replace('\n', " ");
        let key = match err.span() {
            Some(span) => {
                let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                let name = line.split('=').next().unwrap_or(line).trim();
                format!("line {line_no} `{name}`")
            }
            None => "(document)".to_string(),
        };
        ConfigError::new(file, key, message)
    })
}

/// A config type whose values are checked beyond what parsing checks (ranges, required keys,
/// combinations). [`load`] and [`parse`] run it, so a parsed config is a valid one.
pub trait Validate {
    fn validate(&self, path: &Path) -> Result<(), ConfigError>;
}

/// Parses `text` as the config file at `path` and validates it.
pub fn parse<T: serde::de::DeserializeOwned + Validate>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let cfg: T = parse_toml(path, text)?;
    cfg.validate(path)?;
    Ok(cfg)
}

/// Reads, parses and validates the config file at `path`.
pub fn load<T: serde::de::DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    parse(path, &read(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
    }

    impl Validate for T {
        fn validate(&self, path: &Path) -> Result<(), ConfigError> {
            if self.a == 0 {
                return Err(ConfigError::new(path, "a", "must be greater than 0"));
            }
            Ok(())
        }
    }

    #[test]
    fn parse_validates() {
        assert_eq!(parse::<T>(Path::new("x.toml"), "a = 3\n").unwrap().a, 3);
        let e = parse::<T>(Path::new("x.toml"), "a = 0\n").unwrap_err();
        assert_eq!(e.to_string(), "x.toml: a: must be greater than 0");
    }

    #[test]
    fn errors_are_one_line_with_the_key() {
        let e = parse_toml::<T>(Path::new("/etc/x.toml"), "a = 1\nb = 2\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/x.toml: line 2 `b`: unknown field `b`"),
            "{s}"
        );
        assert!(!s.contains('\n'));
    }

    #[test]
    fn flag_then_env_then_default() {
        assert_eq!(
            resolve_path(Some("/a".into()), Some("/b".into()), "/d"),
            PathBuf::from("/a")
        );
        assert_eq!(
            resolve_path(None, Some("/b".into()), "/d"),
            PathBuf::from("/b")
        );
        assert_eq!(
            resolve_path(None, Some("".into()), "/d"),
            PathBuf::from("/d")
        );
        assert_eq!(resolve_path(None, None, "/d"), PathBuf::from("/d"));
    }
}
