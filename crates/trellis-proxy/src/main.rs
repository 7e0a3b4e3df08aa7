//! `trellis-proxy`: the sidecar and gateway binary.

fn main() -> std::process::ExitCode {
    trellis_proxy::cli::main_from(std::env::args_os())
}
