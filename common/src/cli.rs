//! What both command lines share (SPEC §7): the error that knows its exit code, so each
//! command returns a `Result` and `main` turns it into the process's exit status in one place.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config_file::ConfigError;

/// Some check failed or the work could not be done.
pub const EXIT_FAILURE: u8 = 1;
/// The config file or the command line is wrong.
pub const EXIT_CONFIG: u8 = 2;

/// Why a command ends with a non-zero exit status.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    /// Printed to stderr after the program's name; empty when the command has already said
    /// everything (a `doctor` with a red row).
    message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl fmt::Display) -> Self {
        CliError {
            code,
            message: message.to_string(),
        }
    }

    /// Exit 1 with a message.
    pub fn failure(message: impl fmt::Display) -> Self {
        Self::new(EXIT_FAILURE, message)
    }

    /// Exit with `code`, the command having printed its own report.
    pub fn reported(code: u8) -> Self {
        CliError {
            code,
            message: String::new(),
        }
    }

    pub fn code(&self) -> u8 {
        self.code
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(EXIT_CONFIG, format_args!("config error: {e}"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {}: {}", self.code, self.message)
    }
}

/// The one place a command's outcome becomes an exit status.
pub fn exit(program: &str, outcome: Result<(), CliError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("{program}: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}

/// The `--config PATH` flag both daemons take, on every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFlag {
    /// Config file (default: $CIS490_RECEIVER_CONFIG or $CIS490_SHIPPER_CONFIG, else the
    /// daemon's file under /etc/cis490/).
    #[arg(long = "config", global = true, value_name = "PATH")]
    pub path: Option<PathBuf>,
}

impl ConfigFlag {
    /// The config file to read: the flag, then the environment variable `env` (when set and
    /// not empty), then `default`.
    pub fn resolve(&self, env: &str, default: &str) -> PathBuf {
        crate::config_file::resolve_path(self.path.clone(), std::env::var_os(env), default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_config_error_exits_2_naming_the_key() {
        let e: CliError = ConfigError::new(Path::new("/etc/x.toml"), "listen", "bad").into();
        assert_eq!(e.code(), EXIT_CONFIG);
        assert_eq!(e.message, "config error: /etc/x.toml: listen: bad");
        assert_eq!(CliError::reported(1).message, "");
    }
}
