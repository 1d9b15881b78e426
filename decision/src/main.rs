//! The `portcullis` command: `serve`, `check-config`, `explain`, `keys`, `audit`, `report`,
//! `admin` (a running instance's admin API).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use decision::config;
use decision::server::Connections;
use decision::store::MemoryStore;
use decision::telemetry::{self, LogFormat};

/// mimalloc instead of glibc's malloc: with many small objects of mixed lifetimes held (traffic
/// slots, audit events in flight), glibc's free lists fragment and malloc alone took a quarter
/// of the CPU of a decision (`loadtest/bench.sh`, ext-authz-audit-traffic).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Policy decision service for API gateways (Envoy ext_authz v3)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The shape of the async runtime (`--runtime`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RuntimeShape {
    Auto,
    CurrentThread,
    MultiThread,
    PerCore,
}

#[derive(Subcommand)]
enum Command {
    /// Run the decision service (gRPC + admin HTTP) on the embedded memory store.
    Serve {
        /// The policy file.
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// gRPC listen address (overrides listen.grpc); port 0 picks a free port.
        #[arg(long, env = "PORTCULLIS_GRPC_ADDR")]
        grpc_addr: Option<SocketAddr>,
        /// Admin HTTP listen address (overrides listen.http).
        #[arg(long, env = "PORTCULLIS_HTTP_ADDR")]
        http_addr: Option<SocketAddr>,
        /// HTTP forward-auth listen address (overrides listen.forward_auth, and turns it on).
        #[arg(long, env = "PORTCULLIS_FORWARD_AUTH_ADDR")]
        forward_auth_addr: Option<SocketAddr>,
        /// The Redis URL (overrides store.redis.url; the policy must use the Redis store). From a
        /// Secret in Kubernetes, since it may hold a password.
        #[arg(long, env = "PORTCULLIS_REDIS_URL", hide_env_values = true)]
        redis_url: Option<String>,
        #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum, default_value = "pretty")]
        log_format: LogFormat,
        /// The async runtime: `current-thread` runs everything on one thread; `multi-thread` on
        /// tokio's work-stealing runtime; `per-core` serves gRPC connections on one
        /// current-thread runtime per available core (each connection stays on one), the rest
        /// on a multi-thread runtime. `auto` is `current-thread` when one core is available (CPU
        /// affinity or a cgroup quota of one CPU, as `std::thread::available_parallelism` sees
        /// it) and `per-core` on more.
        #[arg(long, env = "PORTCULLIS_RUNTIME", value_enum, default_value = "auto")]
        runtime: RuntimeShape,
        /// Log filter, in tracing's EnvFilter syntax.
        #[arg(long, env = "PORTCULLIS_LOG", default_value = "info")]
        log: String,
        /// Tests only: shift this instance's clock by this many seconds (clock-skew tests; the
        /// Redis store's quotas must not care).
        #[arg(
            long,
            env = "PORTCULLIS_CLOCK_OFFSET_SECS",
            default_value_t = 0,
            allow_hyphen_values = true,
            hide = true
        )]
        clock_offset_secs: i64,
        /// OTLP/gRPC endpoint for traces (the standard OpenTelemetry variable); unset: no traces.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", hide = true)]
        otlp_traces_endpoint: Option<String>,
        /// OTLP/gRPC endpoint, for traces when the traces-specific one is unset.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", hide = true)]
        otlp_endpoint: Option<String>,
        /// The service name traces carry.
        #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "portcullis", hide = true)]
        otel_service_name: String,
    },
    /// Validate a policy file: exit 0, or 1 with every problem found (file:line: path: reason).
    CheckConfig {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// API keys: `hash` prints the SHA-256 of a key read from stdin; `generate` makes a new one.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit trail: `verify` replays a JSON-lines audit file's hash chains.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Summarize audit logs: the reference's daily (24h), weekly (7d) and monthly (30d) reviews.
    Report {
        /// How far back: 24h, 7d, 30d, ...
        #[arg(long, default_value = "24h")]
        since: String,
        /// The end of the period (RFC 3339); default: now.
        #[arg(long)]
        until: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Audit logs (JSON lines), e.g. a file sink's files or an `audit export`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The admin API of a running instance (`listen.admin`): status, usage, blocks, tokens, keys.
    /// The token comes from $PORTCULLIS_ADMIN_TOKEN or --token-file, never the command line.
    Admin {
        /// The admin listener, host:port.
        #[arg(long, env = "PORTCULLIS_ADMIN_ADDR", default_value = "127.0.0.1:8083", global = true)]
        addr: String,
        /// A file holding the admin token (else $PORTCULLIS_ADMIN_TOKEN).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,

        /// One JSON object instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Decide one request against a policy without serving (a fresh memory store: nothing shared is consumed).
    Explain {
        #[arg(long, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request target, e.g. /api/v1/users?x=1
        #[arg(long)]
        path: String,
        /// The address the request comes from.
        #[arg(long, default_value = "127.0.0.1")]
        peer: IpAddr,
        /// A request header, `name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the SHA-256 digest of the key on stdin, for a policy's `sha256` (a key is never
    /// taken from the command line, where shell history and `ps` would keep it).
    Hash,
    /// Make a new random key (printed once) and its digest, ready to paste into a policy.
    Generate {
        /// The key's prefix, e.g. pk_live.
        #[arg(long, default_value = "pk")]
        prefix: String,
        /// The key id to put in the snippet.
        #[arg(long, default_value = "new-key")]
        id: String,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// The policy in force (version, when loaded, the last refused reload) and the store.
    Status,
    /// A subject's tier limits: get, grant (more headroom now), reset.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// Blocked addresses: list, block, unblock.
    Blocks {
        #[command(subcommand)]
        command: BlocksCommand,
    },
    /// Bearer tokens: revoke.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// API keys kept in the store: create, rotate, revoke, list (the policy file's listed too).
    Keys {
        #[command(subcommand)]
        command: AdminKeysCommand,
    },
}

#[derive(Subcommand)]
enum AdminKeysCommand {
    /// Issues a key (printed once) kept in the store; every instance accepts it within a second.
    Create {
        id: String,
        /// Role names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        #[arg(long)]
        tier: String,
        /// When it stops working (RFC 3339); default: until revoked.
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, default_value = "pk")]
        prefix: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A new value (printed once, with the key's own prefix); the old one keeps working for
    /// --overlap (default 1h).
    Rotate {
        id: String,
        /// How long the old value keeps working: 10m, 1h, 7d (at most 30 days).
        #[arg(long, default_value = "1h")]
        overlap: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revokes a key: refused everywhere within a second.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every key: id, roles, tier, source, validity (never a key or a digest).
    List,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Revokes a bearer token until it expires, on every instance: the token read from stdin
    /// (a JWT's sub, jti and exp are read from it), or named by --subject, --jti and --expires-at.
    Revoke {
        /// Read the token from stdin (never the command line).
        #[arg(long)]
        token_stdin: bool,
        /// As portcullis names it: jwt:<sub>, oauth:<sub>.
        #[arg(long, default_value = "")]
        subject: String,
        #[arg(long, default_value = "")]
        jti: String,
        /// When the token expires (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Every limit of a subject, as it stands (nothing counted).
    Get {
        subject: String,
        /// The subject's tier (not needed for an API key of the policy).
        #[arg(long, default_value = "")]
        tier: String,
    },
    /// Gives `amount` units of one limit back for now (up to the whole quota).
    Grant {
        subject: String,
        /// burst or daily
        #[arg(long)]
        limit: String,
        #[arg(long)]
        amount: u64,
        #[arg(long, default_value = "")]
        tier: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Forgets what a subject used of a limit (both without --limit).
    Reset {
        subject: String,
        #[arg(long, default_value = "")]
        limit: String,
        #[arg(long, default_value = "")]
        tier: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum BlocksCommand {
    /// The addresses blocked now.
    List,
    /// Blocks an address fleet-wide for a while.
    Block {
        address: String,
        /// How long: 90s, 15m, 2h, 1d (at most 30 days).
        #[arg(long = "for")]
        duration: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lifts an address's block and forgets its failed authentications.
    Unblock {
        address: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Replay every chain of an audit log. Exit 0: intact (counts and heads printed);
    /// 1: the first event that was changed, removed, inserted or reordered, by line and seq, a
    /// log cut short after a checkpoint, or a bad checkpoint signature; 2: a file cannot be read.
    Verify {
        /// The log; several files (a rotated log, oldest first) are read as one.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The checkpoints file the writer appends (`audit.checkpoint_file`): finds truncation.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// PEM Ed25519 public key: every checkpoint must carry a valid signature by it.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Print a Redis stream sink's events as JSON lines (oldest first), for `audit verify`.
    Export {
        /// The Redis URL (redis:// or rediss://).
        #[arg(long, env = "PORTCULLIS_AUDIT_REDIS_URL")]
        url: String,
        /// The stream key (`audit.sinks[].redis_stream.key`).
        #[arg(long)]
        key: String,
    },
}

/// `--expires-at` (RFC 3339) as seconds since the epoch; absent: 0 (none).
fn epoch_seconds(t: Option<&str>) -> anyhow::Result<i64> {
    let Some(t) = t else { return Ok(0) };
    let us = decision_core::units::parse_rfc3339(t).map_err(|e| anyhow::anyhow!("--expires-at {t:?}: {e}"))?;
    Ok(i64::try_from(us / 1_000_000).unwrap_or(i64::MAX))
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    // one TLS provider for the whole process (outbound HTTPS, rediss://): ring
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[allow(clippy::print_stdout)]
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} routes, {} API keys, {} tiers)",
                    config.display(),
                    cfg.policy.routes.len(),
                    cfg.policy.api_keys.len(),
                    cfg.policy.tiers.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprint!("{e}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Serve {
            config,
            grpc_addr,
            http_addr,
            forward_auth_addr,
            redis_url,
            log_format,
            runtime,
            log,
            clock_offset_secs,
            otlp_traces_endpoint,
            otlp_endpoint,
            otel_service_name,
        } => {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            let shape = match runtime {
                RuntimeShape::Auto if cores == 1 => RuntimeShape::CurrentThread,
                RuntimeShape::Auto => RuntimeShape::PerCore,
                shape => shape,
            };
            // A current-thread runtime lets a connection's task run after several streams have
            // finished, so h2 writes their answers together (the multi-thread scheduler's LIFO
            // slot ran it after every answer): on one core everything runs on one; on more, each
            // core serves its share of the gRPC connections on one (see decision::connections).
            let (current_thread, connections, shape_name) = match shape {
                RuntimeShape::CurrentThread => (true, Connections::Here, "current_thread"),
                RuntimeShape::PerCore => (false, Connections::PerCore(cores), "per_core"),
                RuntimeShape::MultiThread | RuntimeShape::Auto => (false, Connections::Here, "multi_thread"),
            };
            let rt = if current_thread {
                decision::connections::single_runtime_thread();
                tokio::runtime::Builder::new_current_thread()
            } else {
                tokio::runtime::Builder::new_multi_thread()
            }
            .enable_all()
            .build()
            .context("starting the async runtime")?;
            let otlp = otlp_traces_endpoint
                .or(otlp_endpoint)
                .filter(|e| !e.is_empty())
                .map(|endpoint| telemetry::Otlp { endpoint, service_name: otel_service_name });
            // inside the runtime: the OTLP exporter's channel lives there
            let (_log_guard, traces) = rt.block_on(async { telemetry::init(log_format, &log, otlp.as_ref()) });
            tracing::info!(runtime = shape_name, cores, "async runtime");
            if clock_offset_secs != 0 {
                decision::clock::set_offset(clock_offset_secs.saturating_mul(1_000_000));
                tracing::warn!(clock_offset_secs, "this instance's clock is shifted (a test setting)");
            }
            let mut cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    tracing::error!(file = %config.display(), "refusing to start: the policy file is invalid");
                    return Ok(ExitCode::from(1));
                }
            };
            if let Some(a) = grpc_addr {
                cfg.settings.grpc_addr = a;
            }
            if let Some(a) = http_addr {
                cfg.settings.http_addr = a;
            }
            if let Some(a) = forward_auth_addr {
                cfg.settings.forward_auth_addr = Some(a);
            }
            if let Some(url) = redis_url {
                match &mut cfg.settings.store {
                    config::StoreSettings::Redis(r) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                        r.url = url;
                    }
                    config::StoreSettings::Redis(_) => {
                        tracing::error!("refusing to start: PORTCULLIS_REDIS_URL is not a redis:// or rediss:// URL");
                        return Ok(ExitCode::from(1));
                    }
                    config::StoreSettings::Memory => {
                        tracing::error!(
                            "refusing to start: PORTCULLIS_REDIS_URL is set but the policy's store is memory"
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            // a secret: from the environment only, never a flag (`ps`, shell history)
            #[allow(clippy::disallowed_methods)]
            if let Ok(pepper) = std::env::var("PORTCULLIS_KEY_PEPPER") {
                match decision::admin::keys::Pepper::new(pepper.as_bytes()) {
                    Ok(p) => cfg.settings.key_pepper = Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "refusing to start: PORTCULLIS_KEY_PEPPER");
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            let served = rt.block_on(decision::server::serve(cfg, connections));
            if let Some(t) = traces {
                // the last batch of spans
                let _ = t.shutdown();
            }
            served.context("serving")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin { addr, token_file, json, command } => {
            use decision::admin::client::{Ask, run};
            let token = match token_file {
                Some(f) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
                // the environment only: a flag would put the token where `ps` and shell history
                // keep it
                #[allow(clippy::disallowed_methods)]
                None => std::env::var("PORTCULLIS_ADMIN_TOKEN").unwrap_or_default(),
            };
            let token = token.trim().to_owned();
            if token.is_empty() {
                anyhow::bail!("no admin token: set PORTCULLIS_ADMIN_TOKEN or give --token-file");
            }
            let ask = match command {
                AdminCommand::Status => Ask::Status,
                AdminCommand::Usage { command: UsageCommand::Get { subject, tier } } => Ask::Usage { subject, tier },
                AdminCommand::Usage { command: UsageCommand::Grant { subject, limit, amount, tier, reason } } => {
                    Ask::Grant { subject, tier, limit, amount, reason }
                }
                AdminCommand::Usage { command: UsageCommand::Reset { subject, limit, tier, reason } } => {
                    Ask::Reset { subject, tier, limit, reason }
                }
                AdminCommand::Blocks { command: BlocksCommand::List } => Ask::Blocks,
                AdminCommand::Blocks { command: BlocksCommand::Block { address, duration, reason } } => {
                    let micros = decision_core::units::parse_duration(&duration)
                        .map_err(|e| anyhow::anyhow!("--for {duration:?}: {e}"))?;
                    Ask::Block { address, seconds: micros.div_ceil(1_000_000), reason }
                }
                AdminCommand::Blocks { command: BlocksCommand::Unblock { address, reason } } => {
                    Ask::Unblock { address, reason }
                }
                AdminCommand::Keys {
                    command: AdminKeysCommand::Create { id, roles, tier, expires_at, prefix, reason },
                } => {
                    let expires_at = epoch_seconds(expires_at.as_deref())?;
                    Ask::CreateKey { id, roles, tier, expires_at, prefix, reason }
                }
                AdminCommand::Keys { command: AdminKeysCommand::Rotate { id, overlap, reason } } => {
                    let us = decision_core::units::parse_duration(&overlap)
                        .map_err(|e| anyhow::anyhow!("--overlap {overlap:?}: {e}"))?;
                    let until = decision::clock::now_micros().saturating_add(us) / 1_000_000;
                    Ask::RotateKey { id, old_expires_at: i64::try_from(until).unwrap_or(i64::MAX), reason }
                }
                AdminCommand::Keys { command: AdminKeysCommand::Revoke { id, reason } } => {
                    Ask::RevokeKey { id, reason }
                }
                AdminCommand::Keys { command: AdminKeysCommand::List } => Ask::ListKeys,
                AdminCommand::Tokens {
                    command: TokensCommand::Revoke { token_stdin, subject, jti, expires_at, reason },
                } => {
                    let mut token = String::new();
                    if token_stdin {
                        std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)
                            .context("reading the token")?;
                    }
                    let expires_at = epoch_seconds(expires_at.as_deref())?;
                    Ask::RevokeToken { token: token.trim().to_owned(), subject, jti, expires_at, reason }
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            match rt.block_on(run(&addr, &token, ask, json)) {
                Ok(out) => {
                    print!("{out}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("portcullis admin: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Audit { command: AuditCommand::Verify { files, checkpoints, public_key } } => {
            let mut text = String::new();
            for f in &files {
                match std::fs::read_to_string(f) {
                    Ok(t) => text.push_str(&t),
                    Err(e) => {
                        eprintln!("portcullis: reading {}: {e}", f.display());
                        return Ok(ExitCode::from(2));
                    }
                }
                if !text.ends_with('\n') && !text.is_empty() {
                    text.push('\n');
                }
            }
            let cps = match &checkpoints {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("portcullis: reading {}: {e}", f.display());
                        return Ok(ExitCode::from(2));
                    }
                },
                None => None,
            };
            let key = match &public_key {
                Some(f) => match decision::audit::checkpoint::load_public_key(f) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        eprintln!("portcullis: {e}");
                        return Ok(ExitCode::from(2));
                    }
                },
                None => None,
            };
            let name = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" + ");
            match decision::audit::chain::verify_with(&text, cps.as_deref(), key.as_ref()) {
                Ok(v) => {
                    println!("{name}: OK, {} events in {} chain(s)", v.events, v.chains.len());
                    for (chain, seq, head) in &v.chains {
                        println!("  chain {chain}: {seq} events, head {head}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(t) => {
                    println!("{name}: TAMPERED: {t}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Audit { command: AuditCommand::Export { url, key } } => {
            decision::audit::export::redis_stream(&url, &key, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { since, until, json, files } => {
            let span = decision::report::parse_since(&since).map_err(anyhow::Error::msg).context("--since")?;
            let until = match until {
                Some(u) => {
                    decision_core::units::parse_rfc3339(&u).map_err(|e| anyhow::anyhow!("{e}")).context("--until")?
                }
                None => decision::clock::now_micros(),
            };
            let mut text = String::new();
            for f in &files {
                text.push_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?);
                text.push('\n');
            }
            let r = decision::report::build(&text, until.saturating_sub(span), until);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).context("encoding the report")?);
            } else {
                print!("{}", decision::report::text(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command: KeysCommand::Hash } => {
            let mut key = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut key).context("reading the key from stdin")?;
            let key = key.trim_end_matches(['\n', '\r']);
            if key.is_empty() {
                anyhow::bail!("no key on stdin (e.g. `printf %s \"$KEY\" | portcullis keys hash`)");
            }
            println!("{}", decision::keys::hex_digest(key));
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command: KeysCommand::Generate { prefix, id } } => {
            let key = decision::keys::generate(&prefix).context("reading random bytes")?;
            println!("key:    {key}");
            println!("        (shown once: hand it over now; only the digest below goes into the policy)");
            println!("sha256: {}", decision::keys::hex_digest(&key));
            println!();
            println!("      - id: {id}");
            println!("        sha256: {}", decision::keys::hex_digest(&key));
            println!("        roles: [user]");
            println!("        tier: basic");
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { config, method, path, peer, headers } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return Ok(ExitCode::from(1));
                }
            };
            let mut pairs = Vec::new();
            for h in &headers {
                let (k, v) = h.split_once(':').with_context(|| format!("--header {h:?}: expected `name: value`"))?;
                pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            let out = decision::explain::explain(&cfg.policy, MemoryStore::new(), &method, &path, peer, &pairs)?;
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
