//! The `parley` command line.

use clap::{Parser, Subcommand};

// The per-message path allocates small short-lived objects on many threads; glibc malloc spent
// measurable time consolidating them (see the README performance section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use parley::config::Deployment;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "parley", version, about = "High-availability customer-service chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one instance.
    Serve {
        /// Deployment file (TOML); without it the embedded defaults are used.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (SQLite file, compiled plugin cache). Default ./parley-data.
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        instance_id: Option<String>,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long)]
        log_json: bool,
    },
    /// Drive concurrent chats against an instance and print throughput and ack latency.
    Bench(parley::bench::Options),
    /// Print the SHA-256 digest of a token, for the deployment file's [auth] section.
    HashToken { token: String },
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's Parley world, WIT version, exports and the imports it asks for.
    Inspect { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match cli.command {
        Command::Serve { config, listen, data, instance_id, log_json } => {
            init_logging(log_json);
            runtime.block_on(serve(config, listen, data, instance_id))
        }
        Command::Bench(options) => match runtime.block_on(parley::bench::run(options)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("parley bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Plugin(PluginCommand::Inspect { file }) => {
            let shown = file.display().to_string();
            match std::fs::read(&file).map_err(|e| format!("cannot read the component: {e}")).and_then(|b| parley::plugins::inspect::report(&shown, &b)) {
                Ok(report) => {
                    print!("{report}");
                    std::process::ExitCode::SUCCESS
                }
                Err(problem) => {
                    eprintln!("parley plugin inspect: {shown}: {problem}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::HashToken { token } => {
            println!("{}", hex::encode(parley::auth::hash(&token)));
            std::process::ExitCode::SUCCESS
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>, data: Option<PathBuf>, instance_id: Option<String>) -> std::process::ExitCode {
    let mut deployment = match &config {
        Some(path) => match Deployment::from_file(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("parley: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Deployment::default(),
    };
    if let Some(l) = listen {
        deployment.server.listen = l;
    }
    if let Some(d) = data {
        deployment.server.data = d;
    }
    if instance_id.is_some() {
        deployment.server.instance_id = instance_id;
    }
    let started = match parley::instance::start(deployment).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("parley: refusing to start: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let addr = started.listener.local_addr().expect("bound");
    // Tests and scripts read this line to find the port when started with --listen 127.0.0.1:0.
    println!("parley: instance {} listening on http://{addr}", started.app.instance_id);
    // SIGHUP reloads the plugins, as POST /admin/reload does.
    let app = started.app.clone();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match app.plugins.reload().await {
                Ok(()) => tracing::info!(event_id = "plugins.reloaded", "plugins reloaded on SIGHUP"),
                Err(problem) => tracing::warn!(event_id = "plugins.reload_refused", cause = %problem, "plugin reload refused; the running plugins stay"),
            }
        }
    });
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    parley::server::run(started.listener, started.app, shutdown).await;
    std::process::ExitCode::SUCCESS
}
