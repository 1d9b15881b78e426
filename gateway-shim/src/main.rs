//! The `portcullis-shim` command: `serve` and `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use gateway_shim::config::Config;

#[derive(Parser)]
#[command(
    name = "portcullis-shim",
    version,
    about = "TLS-terminating reverse proxy that asks portcullis about every request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: the TLS listener, the plain listener and the metrics listener of the config.
    Serve {
        #[arg(long, env = "PORTCULLIS_SHIM_CONFIG")]
        config: PathBuf,
        /// portcullis's gRPC address, `http://host:port` (overrides portcullis.address).
        #[arg(long, env = "PORTCULLIS_SHIM_PORTCULLIS_ADDR")]
        portcullis_addr: Option<String>,
        #[arg(long, env = "PORTCULLIS_SHIM_LOG_FORMAT", value_enum, default_value = "pretty")]
        log_format: LogFormat,
        /// Log filter, in tracing's EnvFilter syntax.
        #[arg(long, env = "PORTCULLIS_SHIM_LOG", default_value = "info")]
        log: String,
    },
    /// Check a config file, its certificate and key, and the upstream's trust: exit 0, or 1 with
    /// the reason.
    CheckConfig {
        #[arg(long, env = "PORTCULLIS_SHIM_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Pretty => b.init(),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<Config> {
    let cfg = Config::load(path)?;
    gateway_shim::tls::load(&cfg.tls.cert_file, &cfg.tls.key_file, gateway_shim::clock::unix_secs())?;
    gateway_shim::tls::server_config(
        &cfg.tls,
        gateway_shim::tls::Resolver::new(gateway_shim::tls::load(
            &cfg.tls.cert_file,
            &cfg.tls.key_file,
            gateway_shim::clock::unix_secs(),
        )?),
    )?;
    gateway_shim::upstream::client(&cfg.upstream)?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match check(&config) {
            Ok(_) => {
                eprintln!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, portcullis_addr, log_format, log } => {
            init_logging(log_format, &log);
            let cfg = match check(&config) {
                Ok(mut c) => {
                    if let Some(addr) = portcullis_addr {
                        if !addr.starts_with("http://") {
                            tracing::error!(addr, "refusing to start: --portcullis-addr must be http://host:port");
                            return ExitCode::FAILURE;
                        }
                        c.portcullis.address = addr;
                    }
                    c
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "refusing to start");
                    return ExitCode::FAILURE;
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(gateway_shim::server::run(cfg, |_| {})) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "portcullis-shim stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
