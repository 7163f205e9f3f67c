//! The gateway binary, built inside this package so the end-to-end tests can
//! run it as a real process (Cargo hands integration tests only the binaries
//! of their own package). Same entry point as `switchyard-server`.

fn main() -> std::process::ExitCode {
    switchyard_server::cli::main()
}
