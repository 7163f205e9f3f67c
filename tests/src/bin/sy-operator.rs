//! The operator binary, built by this package so end-to-end tests find it
//! next to their executables (as they find `sy-gateway`).

fn main() -> std::process::ExitCode {
    switchyard_operator::cli::main()
}
