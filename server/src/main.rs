//! `switchyard-server`: the gateway binary. See the crate docs and README.

fn main() -> std::process::ExitCode {
    switchyard_server::cli::main()
}
