//! The shipper's real entry point, built inside the test crate so tests can spawn it.
fn main() -> std::process::ExitCode {
    cis490_shipper::cli::main()
}
