//! The command line: parse flags, load the configuration, start logging, bind, serve until
//! SIGTERM/SIGINT. Also `--check-config` and the `healthcheck` subcommand for containers.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use extension_registry::config::Config;
use extension_registry::{server, telemetry};

/// jemalloc rather than glibc's allocator: a download moves its bytes through buffers of a
/// few hundred KiB, which glibc gives back to the kernel and faults in again read after read
/// (`benches/oci_download.sh 1024`: 0.91 → 1.09–1.12 GiB/s, 1.37 → 1.08–1.14 CPU s/GiB). The
/// cached path is the same within the noise either way.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One REST API over provisioning extensions kept in Gitea/Forgejo releases, OCI registries
/// and local directories.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML); without it the built-in default serves the sample
    /// extensions from ./tests/fixtures/extensions.
    #[arg(long, env = "EXTENSION_REGISTRY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding [server] host.
    #[arg(long, env = "EXTENSION_REGISTRY_HOST")]
    host: Option<IpAddr>,
    /// Port to listen on, overriding [server] port.
    #[arg(long, env = "EXTENSION_REGISTRY_PORT")]
    port: Option<u16>,
    /// Log filter: error, warn, info, debug, trace, or directives like `extension_registry=debug`.
    #[arg(long, env = "EXTENSION_REGISTRY_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "EXTENSION_REGISTRY_JSON_LOG")]
    json_log: bool,
    /// Validate the configuration (including secret files) and exit: 0 when valid, 1 otherwise.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when the service on this host answers /livez, 1 otherwise (for container
    /// health checks, where no curl is installed).
    Healthcheck,
}

fn load(cli: &Cli) -> Result<Config, String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::embedded(),
    }
    .map_err(|e| e.to_string())?;
    if let Some(host) = cli.host {
        config.server.host = host;
    }
    if let Some(port) = cli.port {
        config.server.port = port;
    }
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init_logging(&cli.log_level, cli.json_log) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.workers > 0 {
        runtime.worker_threads(config.server.workers);
    }
    // Each verified download past its first MiB hashes on a blocking thread of its own
    // (`registry::artifact`): room for all of them beside tokio's default 512 for file I/O,
    // so file reads never queue behind digests. Idle blocking threads exit after 10 s.
    runtime.max_blocking_threads(512 + config.server.max_concurrent_downloads);
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Healthcheck) => healthcheck(&config).await,
            None => serve(config, cli.check_config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, check_only: bool) -> Result<(), String> {
    let app = extension_registry::build(&config).map_err(|e| e.to_string())?;
    if check_only {
        println!("configuration is valid");
        return Ok(());
    }
    // Before the listener is bound and the connection cap computed; not for a check or a
    // probe. Descriptors open already (Redis's connection) count under the raised limit too.
    server::descriptors::raise_open_file_limit();
    let addr = SocketAddr::new(config.server.host, config.server.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(address = %bound, version = env!("CARGO_PKG_VERSION"), "listening");
    tokio::spawn(telemetry::metrics_upkeep());
    server::run_with(listener, app, server::shutdown_signal(), &config.server)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

async fn healthcheck(config: &Config) -> Result<(), String> {
    let host = match config.server.host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1]),
        ip => ip,
    };
    let url = format!("http://{}/livez", SocketAddr::new(host, config.server.port));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {}", response.status()))
    }
}
