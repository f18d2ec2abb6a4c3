//! Log setup shared by both daemons: structured `tracing` lines on stderr, without timestamps
//! or colours when stderr is the journal (journald adds its own).

use tracing_subscriber::EnvFilter;

pub fn init() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let filter = EnvFilter::try_from_env("CIS490_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(tty && !journal)
        .with_target(false);
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}
