//! `sluice`: the daemon (`sluice serve`) and the CLI, a client of its API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Agentless backup proxy for KVM/QEMU"
)]
struct Cli {
    /// Server URL (https://host:port, or http:// for a loopback plain-HTTP daemon).
    #[arg(
        long,
        global = true,
        env = "SLUICE_URL",
        default_value = "https://127.0.0.1:8443"
    )]
    url: String,
    /// API token.
    #[arg(long, global = true, env = "SLUICE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the server certificate (printed by `sluice serve`).
    #[arg(long, global = true, env = "SLUICE_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: REST API and backup jobs.
    Serve {
        /// Configuration file (TOML); embedded defaults without it.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: Option<PathBuf>,
        /// Override the data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override the listen address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Serve plain HTTP (loopback addresses only).
        #[arg(long)]
        insecure_http: bool,
    },
    /// Print the version and exit.
    Version,
    #[command(flatten)]
    Client(api::cli::Verb),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            insecure_http,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let mut cfg = api::daemon::config::Config::load(config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            cfg.insecure_http |= insecure_http;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(api::daemon::serve::serve(cfg))
        }
        Command::Client(verb) => {
            let client = api::cli::client::Client {
                url: cli.url,
                token: cli.token,
                fingerprint: cli.fingerprint,
            };
            let rt = tokio::runtime::Runtime::new()?;
            let code = rt.block_on(api::cli::run(&client, verb, cli.json));
            std::process::exit(code);
        }
        Command::Version => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
