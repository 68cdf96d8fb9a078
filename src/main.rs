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
    /// Three instances on one host sharing one data directory: an N+1 cluster to try.
    Demo {
        /// Data directory the three instances share.
        #[arg(long, default_value = "parley-demo-data")]
        data: PathBuf,
        /// Port of the first instance; the others take the next two.
        #[arg(long, default_value_t = 8081)]
        port: u16,
    },
    /// Drive concurrent chats against an instance and print throughput and ack latency;
    /// `parley bench failover` measures failover after kill -9.
    Bench(parley::bench::Options),
    /// Print the SHA-256 digest of a token, for the deployment file's [auth] section.
    HashToken { token: String },
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Storage tools.
    #[command(subcommand)]
    Storage(StorageCommand),
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Create the Cassandra keyspace and tables of cassandra/schema.cql with the replication,
    /// TTL and gc_grace of the deployment's [cassandra] section (safe to run again).
    Init {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Show a component's Parley world, WIT version, exports and the imports it asks for.
    Inspect { file: PathBuf },
    /// Run a save-error-policy or notice-handler plugin in the sandbox against a scenario
    /// file; prints each step and a summary, exits 1 if a step fails.
    Test {
        file: PathBuf,
        #[arg(long)]
        scenario: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match cli.command {
        Command::Serve { config, listen, data, instance_id, log_json } => {
            init_logging(log_json);
            runtime.block_on(serve(config, listen, data, instance_id))
        }
        Command::Demo { data, port } => match runtime.block_on(demo(data, port)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("parley demo: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
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
        Command::Plugin(PluginCommand::Test { file, scenario }) => {
            init_logging(false);
            match runtime.block_on(plugin_test(&file, &scenario)) {
                Ok((report, passed)) => {
                    print!("{report}");
                    if passed { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
                }
                Err(problem) => {
                    eprintln!("parley plugin test: {problem}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Command::Storage(StorageCommand::Init { config }) => {
            let result = Deployment::from_file(&config).map_err(|e| e.to_string()).and_then(|d| {
                let c = d.cassandra.ok_or_else(|| format!("{}: no [cassandra] section: the embedded store needs no init", config.display()))?;
                let done = runtime.block_on(parley::storage::cassandra::init_schema(&c))?;
                Ok((c, done))
            });
            match result {
                Ok((c, n)) => {
                    println!("keyspace {} ready on {} ({n} statements applied)", c.keyspace, c.contact_points.join(", "));
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("parley storage init: {e}");
                    std::process::ExitCode::FAILURE
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
    let drain_deadline_ms = deployment.server.drain_deadline_ms;
    let started = match parley::instance::start(deployment).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("parley: refusing to start: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let addr = started.listener.local_addr().expect("bound");
    // Tests and scripts read this line to find the port when started with --listen 127.0.0.1:0.
    let scheme = if started.app.tls.is_some() { "https" } else { "http" };
    println!("parley: instance {} listening on {scheme}://{addr}", started.app.instance_id);
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
    // Ctrl-C hands the chats over at once; SIGTERM (a rolling upgrade) drains first: no new
    // chats, and up to server.drain_deadline_ms for the open ones to end.
    let app = started.app.clone();
    let drain_deadline = std::time::Duration::from_millis(drain_deadline_ms);
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {
                app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(event_id = "instance.drain", "SIGTERM: draining; waiting for open chats to end");
                let deadline = tokio::time::Instant::now() + drain_deadline;
                while app.kpi.sessions_current.load(std::sync::atomic::Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    };
    parley::server::run(started.listener, started.app.clone(), shutdown).await;
    started.app.chats.hand_over().await;
    std::process::ExitCode::SUCCESS
}

/// `parley demo`: starts three instances sharing `data` and prints how to reach them.
async fn demo(data: PathBuf, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data)?;
    let agent = std::env::var("PARLEY_AGENT_TOKEN").unwrap_or_else(|_| parley::auth::new_token().0);
    let admin = std::env::var("PARLEY_ADMIN_TOKEN").unwrap_or_else(|_| parley::auth::new_token().0);
    let env = [("PARLEY_AGENT_TOKEN", agent.as_str()), ("PARLEY_ADMIN_TOKEN", admin.as_str())];
    let mut instances = Vec::new();
    for i in 0..3u16 {
        let listen = format!("127.0.0.1:{}", port + i);
        instances.push(parley::local::LocalInstance::start(&data, None, &listen, &env).await?);
    }
    println!("parley demo: an N+1 cluster of three instances sharing {}", data.display());
    for (i, instance) in instances.iter().enumerate() {
        println!("  instance {}  {}  http://{}  pid {}", i + 1, instance.id, instance.addr, instance.child.id().unwrap_or(0));
    }
    println!("  agent token: {agent}");
    println!("  admin token: {admin}");
    let first = &instances[0].addr;
    let second = &instances[1].addr;
    println!("Open in a browser:");
    println!("  customer widget (demo shop page): http://{first}/widget/");
    println!("  agent console:                    http://{second}/agent/   (sign in with the agent token above)");
    println!("Chat between the two, then kill -9 the pid of the instance the widget says serves the chat: both pages carry on.");
    println!("Or with curl: curl -s -XPOST http://{first}/v1/chats -d '{{\"nickname\":\"Ann\"}}'");
    println!("Ctrl-C stops all three.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut watch = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut exited = [false; 3];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = watch.tick() => {
                for (i, instance) in instances.iter_mut().enumerate() {
                    if !exited[i] && let Ok(Some(status)) = instance.child.try_wait() {
                        exited[i] = true;
                        println!("instance {} ({}) exited ({status}); the other instances restore its chats", i + 1, instance.id);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn plugin_test(file: &std::path::Path, scenario: &std::path::Path) -> Result<(String, bool), String> {
    // Compiled components are cached between runs: a Python or JavaScript one takes seconds.
    let cache = std::env::temp_dir().join("parley-plugin-test-cache");
    let runtime = parley::plugins::Runtime::new(cache, Default::default()).map_err(|e| format!("plugin runtime: {e:#}"))?;
    parley::plugins::scenario::run(&runtime, file, scenario).await
}
