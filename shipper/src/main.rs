//! Entry point: everything lives in the library so tests can drive the shipper in-process.

fn main() -> std::process::ExitCode {
    cis490_shipper::cli::main()
}
