//! Entry point: everything lives in the library so tests can run the receiver in-process.

fn main() -> std::process::ExitCode {
    cis490_receiver::cli::main()
}
