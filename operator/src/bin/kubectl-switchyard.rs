//! `kubectl switchyard`: a kubectl plugin (any `kubectl-*` binary on PATH is
//! one) for ConnectionService rollouts: status, promote, abort.

fn main() -> std::process::ExitCode {
    switchyard_operator::plugin::main()
}
