//! The kubectl plugin, built by this package for the kubectl tests (which
//! put it on PATH as `kubectl-switchyard`).

fn main() -> std::process::ExitCode {
    switchyard_operator::plugin::main()
}
