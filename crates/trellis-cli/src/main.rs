//! `trellis`: the Trellis command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use trellis_api::analyze::{self, AnalyzeOptions, Message};
use trellis_api::{Level, LoadOptions};

mod control;
mod demo;
mod demo_app;
mod demo_live;
mod explain;
mod gateway;
mod sidecar;
mod up;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis service mesh",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate configuration and report problems across resources, with istioctl analyze's
    /// message codes (IST0101, IST0106, …).
    ///
    /// Exit status: 0 when clean, 1 when there are warnings and --fail-on warning is given,
    /// 2 when there are errors.
    Analyze(AnalyzeArgs),
    /// The tour: Istio's Bookinfo as pods with transparent sidecars on this machine, a
    /// gentle load through the ingress gateway (http://127.0.0.1:8080/productpage) and a
    /// live view of every edge, until Ctrl-C. Needs root; without it, the tour of the
    /// configuration only.
    Demo(demo::Args),
    /// Translate Istio Gateways and the VirtualServices bound to them into a snapshot for
    /// `trellis-proxy --mode gateway` (JSON on stdout). Clusters are listed with no
    /// endpoints: fill them in (the control plane will, once it exists).
    GatewaySnapshot(gateway::Args),
    /// Which VirtualService rule a request meets and where it goes (weights, subsets,
    /// timeout, faults, retries), matched by the proxy's own engine.
    ///
    /// Exit status: 0 when a rule matches (or no VirtualService applies), 1 when the
    /// proxy would answer 404, 2 on bad input.
    Explain(explain::Args),
    /// The snapshot the control plane would send one workload's sidecar (JSON on stdout),
    /// for `trellis-proxy --config` in static mode.
    SidecarSnapshot(sidecar::Args),
    /// Run the control plane: watch a configuration directory and serve proxies (Delta ADS)
    /// and status (docs/control-plane.md).
    ControlPlane(control::ControlPlaneArgs),
    /// Every proxy connected to the control plane: the version sent, the version ACKed,
    /// and the reason of a NACK.
    ProxyStatus(control::ProxyStatusArgs),
    /// A connected proxy's configuration as the control plane last sent it: listeners,
    /// routes, clusters, endpoints.
    ProxyConfig(control::ProxyConfigArgs),
    /// A bootstrap token for a proxy (namespace and service account), signed with the
    /// control plane's key.
    Token(control::TokenArgs),
    /// A workload certificate from the mesh CA, written to files (for proxies and hosts
    /// that take their identity from files).
    Cert(control::CertArgs),
    /// Run a whole mesh on this machine: the control plane, and every Workload replica
    /// as a pod (a network namespace with transparent interception) with its sidecar and
    /// app. Needs root. Runs until Ctrl-C or `trellis down`.
    Up(up::UpArgs),
    /// Stop a mesh started by `trellis up`, or clean up one a crash left behind.
    Down(up::MeshRef),
    /// The pods of a running mesh: addresses, state, restarts.
    Ps(up::MeshRef),
    /// Put resources into a running mesh (copied into its configuration directory; they
    /// apply within a second, replacing objects of the same kind, namespace and name).
    Apply(up::ApplyArgs),
    /// A pod's log (its app's, or with --proxy its sidecar's).
    Logs(up::LogsArgs),
    /// The sidecar and gateway proxy (the same as the `trellis-proxy` program; `trellis
    /// proxy --help` lists its options).
    #[command(disable_help_flag = true)]
    Proxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Bookinfo's services in one program (productpage, details, reviews, ratings), for
    /// the demo: `--service reviews --version v2`.
    #[command(disable_version_flag = true)]
    DemoApp(demo_app::Args),
    /// Inside a pod: wait for the sidecar, then run the app (used by `trellis up`).
    #[command(hide = true)]
    PodExec(up::PodExecArgs),
}

#[derive(Debug, clap::Args)]
struct AnalyzeArgs {
    /// Files or directories (read recursively: *.yaml, *.yml, *.json); `-` reads stdin.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Log)]
    output: Format,
    /// Lowest level that makes the exit status non-zero.
    #[arg(long, value_enum, default_value_t = FailOn::Error)]
    fail_on: FailOn,
    /// Namespace of resources that do not name one.
    #[arg(short, long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Log,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailOn {
    Error,
    Warning,
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "proxy") {
        let _ = argv.next();
        let _ = argv.next();
        return trellis_proxy::cli::main_from(std::iter::once("trellis proxy".into()).chain(argv));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(args) => run_analyze(&args),
        Command::Demo(args) => demo::run(&args),
        Command::GatewaySnapshot(args) => gateway::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::SidecarSnapshot(args) => sidecar::run(&args),
        Command::ControlPlane(args) => control::run_control_plane(&args),
        Command::ProxyStatus(args) => control::run_proxy_status(&args),
        Command::Token(args) => control::run_token(&args),
        Command::Cert(args) => control::run_cert(&args),
        Command::ProxyConfig(args) => control::run_proxy_config(&args),
        Command::Up(args) => up::run_up(&args),
        Command::Down(args) => up::run_down(&args),
        Command::Ps(args) => up::run_ps(&args),
        Command::Apply(args) => up::run_apply(&args),
        Command::Logs(args) => up::run_logs(&args),
        Command::PodExec(args) => up::run_pod_exec(&args),
        Command::DemoApp(args) => demo_app::run(&args),
        Command::Proxy { args } => Ok(trellis_proxy::cli::main_from(
            std::iter::once(std::ffi::OsString::from("trellis proxy")).chain(args),
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Loads and analyzes, prints the messages and returns the exit status.
fn run_analyze(args: &AnalyzeArgs) -> anyhow::Result<ExitCode> {
    let parsed = trellis_api::load_paths(
        &args.paths,
        &LoadOptions {
            default_namespace: args.namespace.clone(),
        },
    );
    let messages = analyze::analyze(
        &parsed,
        &AnalyzeOptions {
            default_namespace: args.namespace.clone(),
        },
    );
    let mut out = std::io::stdout().lock();
    match args.output {
        Format::Log => {
            for m in &messages {
                writeln!(out, "{m}")?;
            }
            if !messages.iter().any(|m| m.level != Level::Info) {
                let what: Vec<String> =
                    args.paths.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "✔ No validation issues found when analyzing {}.",
                    what.join(", ")
                );
            }
        }
        Format::Json => writeln!(out, "{}", analyze::output::to_json(&messages))?,
        Format::Yaml => write!(out, "{}", analyze::output::to_yaml(&messages))?,
    }
    out.flush()?;
    Ok(exit_status(&messages, args.fail_on))
}

fn exit_status(messages: &[Message], fail_on: FailOn) -> ExitCode {
    if messages.iter().any(|m| m.level == Level::Error) {
        ExitCode::from(2)
    } else if matches!(fail_on, FailOn::Warning)
        && messages.iter().any(|m| m.level == Level::Warning)
    {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
