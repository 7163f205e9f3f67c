//! `switchyard-operator`: runs the controller, or prints the CRD.

fn main() -> std::process::ExitCode {
    switchyard_operator::cli::main()
}
