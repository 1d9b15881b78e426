//! `portcullis-loadtest`: drives one case against a gRPC server (portcullis or the no-op
//! baseline) and prints its figures, checking the outcomes against what the policy predicts.
//!
//! ```sh
//! portcullis-loadtest --target rls --addr 127.0.0.1:8081 --connections 4 --streams 8 --duration 10s
//! ```
// The report is this program's output.
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadtest::cpu;
use loadtest::report::Case;
use loadtest::run::{self, Config};
use loadtest::target::{Expect, Kind, Spec, check_expectation};

#[derive(Parser)]
#[command(
    name = "portcullis-loadtest",
    about = "Closed- and open-loop gRPC load for ext_authz and RLS, with HDR percentiles"
)]
struct Args {
    #[arg(long, value_enum)]
    target: Kind,
    /// the server's gRPC address
    #[arg(long)]
    addr: String,
    /// HTTP target over HTTPS, trusting this CA (PEM); the certificate must name the address
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// a name for the report
    #[arg(long, default_value = "case")]
    name: String,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// concurrent streams per connection (closed loop)
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// how long to run, e.g. 10s (ignored with --requests in closed loop)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// stop after this many requests (closed loop)
    #[arg(long)]
    requests: Option<u64>,
    /// open loop at this many requests a second
    #[arg(long)]
    rate: Option<u64>,
    /// open loop: most requests in flight before due requests count as errors
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// distinct keys (client addresses for ext_authz, descriptor values for RLS)
    #[arg(long, default_value_t = 1)]
    keys: u64,
    /// use keys in turn rather than scattered
    #[arg(long)]
    sequential_keys: bool,
    /// descriptors per RLS request
    #[arg(long, default_value_t = 1)]
    descriptors: usize,
    #[arg(long, default_value = "bench")]
    domain: String,
    /// the key of every RLS descriptor (default: k0, k1, ... one per descriptor)
    #[arg(long)]
    descriptor_key: Option<String>,
    #[arg(long, default_value = "")]
    api_key: String,
    /// send an RS256 bearer token minted with this PEM key (iss https://bench.test/, aud
    /// portcullis-bench, as loadtest/bench/policy.yaml expects)
    #[arg(long)]
    jwt_key: Option<std::path::PathBuf>,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/api/v1/items")]
    path: String,
    /// the server's pid, to report its CPU use and resident memory
    #[arg(long)]
    server_pid: Option<u32>,
    /// the store's pid (a redis-server), to report its CPU use beside the server's
    #[arg(long)]
    store_pid: Option<u32>,
    /// what the policy predicts: `all` allowed, or a number allowed (the rest over the limit)
    #[arg(long)]
    expect: Option<String>,
    /// print JSON instead of a markdown row
    #[arg(long)]
    json: bool,
    /// print the markdown table header before the row
    #[arg(long)]
    header: bool,
    /// a request mix: a YAML list of `{ weight, method, path, api_key, jwt }` (ext_authz, http)
    #[arg(long)]
    scenario: Option<std::path::PathBuf>,
    /// open-loop sweep: one run per rate (comma-separated, requests a second), a row each
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
    /// with --rates: write an SVG chart of the latency percentiles against offered load
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// send nothing: write the first request of ext-authz, native or rls as one gRPC message
    /// (a zero flag byte, the 4-byte big-endian length, the protobuf) to this file and exit, the
    /// body for another client such as h2load (`-d FILE`)
    #[arg(long)]
    write_request: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: use ms, s or m")),
    }
}

/// A progress line on a terminal (stderr), until dropped; nothing when stderr is not a terminal.
struct Progress(Option<(std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>);

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.0.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
    }
}

fn progress(name: &str, cfg: &Config) -> Progress {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return Progress(None);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, total, name, flag) = (cfg.progress.clone(), cfg.duration, name.to_owned(), stop.clone());
    let t = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let el = start.elapsed();
            let n = done.load(std::sync::atomic::Ordering::Relaxed);
            let frac = (el.as_secs_f64() / total.as_secs_f64().max(1e-9)).min(1.0);
            let bar = "#".repeat((frac * 30.0) as usize);
            eprint!(
                "\r{name} [{bar:<30}] {:>5.1}s  {n} requests  {:.0}/s   ",
                el.as_secs_f64(),
                n as f64 / el.as_secs_f64().max(1e-9)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprint!("\r{:width$}\r", "", width = name.len() + 80);
    });
    Progress(Some((stop, t)))
}

/// One open-loop run per `--rates` entry: a row each, and the SVG chart.
fn sweep(args: &Args, rt: &tokio::runtime::Runtime, cfg: &Config, expect: Option<Expect>) -> ExitCode {
    let mut points = Vec::new();
    for (i, rate) in args.rates.iter().enumerate() {
        let mut c = cfg.clone();
        c.rate = Some(*rate);
        c.progress = Default::default();
        let shown = progress(&format!("{}@{rate}", args.name), &c);
        let result = rt.block_on(run::open_loop(&c, *rate));
        drop(shown);
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                eprintln!("portcullis-loadtest: {e:#}");
                return ExitCode::from(2);
            }
        };
        let case = Case::from_run(
            &format!("{}@{rate}", args.name),
            &format!("open {rate}/s"),
            c.connections,
            c.streams,
            &result,
        );
        let [p50, _, p99, p999, _] = loadtest::hist::percentiles(&result.hist);
        points.push(loadtest::report::SweepPoint {
            offered: *rate,
            achieved: result.counts.total() as f64 / result.elapsed.as_secs_f64().max(1e-9),
            p50,
            p99,
            p999,
        });
        if let Err(code) = emit(args, &case, i == 0, expect, &result) {
            return code;
        }
    }
    if let Some(path) = &args.svg {
        let title = format!("{}: latency against offered load", args.name);
        if let Err(e) = std::fs::write(path, loadtest::report::svg(&title, &points)) {
            eprintln!("portcullis-loadtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    let expect = match args.expect.as_deref() {
        None => None,
        Some("all") => Some(Expect::AllAllowed),
        Some(n) => match n.parse() {
            Ok(n) => Some(Expect::Allowed(n)),
            Err(_) => {
                eprintln!("portcullis-loadtest: --expect takes `all` or a number");
                return ExitCode::from(2);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = Config {
        addr: args.addr.clone(),
        ca_file: args.ca_file.clone(),
        connections: args.connections,
        streams: args.streams,
        duration: args.duration,
        requests: args.requests,
        rate: args.rate,
        sequential_keys: args.sequential_keys,
        max_in_flight: args.max_in_flight,
        spec: Spec {
            kind: args.target,
            keys: args.keys,
            descriptors: args.descriptors,
            api_key: args.api_key.clone(),
            method: args.method.clone(),
            path: args.path.clone(),
            domain: args.domain.clone(),
            descriptor_key: args.descriptor_key.clone(),
            bearer: None,
            mix: Vec::new(),
        },
        progress: Default::default(),
    };
    let mut cfg = cfg;
    if let Some(key) = &args.jwt_key {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match loadtest::target::mint_token(key, "https://bench.test/", "portcullis-bench", "bench", now) {
            Ok(t) => cfg.spec.bearer = Some(t),
            Err(e) => {
                eprintln!("portcullis-loadtest: --jwt-key: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = &args.scenario {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| loadtest::target::parse_scenario(&t))
        {
            Ok(mut mix) => {
                for v in &mut mix {
                    if v.jwt {
                        v.bearer.clone_from(&cfg.spec.bearer);
                    }
                }
                cfg.spec.mix = mix;
            }
            Err(e) => {
                eprintln!("portcullis-loadtest: --scenario {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = &args.write_request {
        use prost::Message;
        let msg = match cfg.spec.kind {
            Kind::ExtAuthz => cfg.spec.check_request(0, 0).encode_to_vec(),
            Kind::Native => cfg.spec.native_request(0, 0).encode_to_vec(),
            Kind::Rls => cfg.spec.rls_request(0).encode_to_vec(),
            Kind::Http | Kind::ForwardAuth => {
                eprintln!("portcullis-loadtest: --write-request: only gRPC targets (ext-authz, native, rls) have one");
                return ExitCode::from(2);
            }
        };
        let Ok(len) = u32::try_from(msg.len()) else { return ExitCode::from(2) };
        let mut body = Vec::with_capacity(5 + msg.len());
        body.push(0);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&msg);
        if let Err(e) = std::fs::write(path, body) {
            eprintln!("portcullis-loadtest: --write-request {}: {e}", path.display());
            return ExitCode::from(2);
        }
        return ExitCode::SUCCESS;
    }
    if !args.rates.is_empty() {
        return sweep(&args, &rt, &cfg, expect);
    }
    let ticks = cpu::ticks_per_second();
    let server = args.server_pid.map(|p| p.to_string());
    let server_cpu0 = server.as_deref().and_then(|p| cpu::cpu_time(p, ticks));
    let server_rss0 = server.as_deref().and_then(cpu::rss_bytes);
    let store = args.store_pid.map(|p| p.to_string());
    let store_cpu0 = store.as_deref().and_then(|p| cpu::cpu_time(p, ticks));
    let self_cpu0 = cpu::cpu_time("self", ticks);
    let shown = progress(&args.name, &cfg);
    let result = rt.block_on(async {
        match cfg.rate {
            Some(rate) => run::open_loop(&cfg, rate).await,
            None => run::closed_loop(&cfg).await,
        }
    });
    drop(shown);
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mode = match cfg.rate {
        Some(r) => format!("open {r}/s"),
        None => "closed".to_owned(),
    };
    let mut case = Case::from_run(&args.name, &mode, cfg.connections, cfg.streams, &result);
    let secs = result.elapsed.as_secs_f64().max(1e-9);
    let pct = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() / secs * 100.0),
        _ => None,
    };
    case.client_cpu_pct = pct(self_cpu0, cpu::cpu_time("self", ticks));
    case.server_cpu_pct = pct(server_cpu0, server.as_deref().and_then(|p| cpu::cpu_time(p, ticks)));
    case.store_cpu_pct = pct(store_cpu0, store.as_deref().and_then(|p| cpu::cpu_time(p, ticks)));
    case.server_rss_delta_bytes = match (server_rss0, server.as_deref().and_then(cpu::rss_bytes)) {
        (Some(a), Some(b)) => i64::try_from(b).ok().zip(i64::try_from(a).ok()).map(|(b, a)| b - a),
        _ => None,
    };
    match emit(&args, &case, true, expect, &result) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Prints a case (JSON, or a markdown row after the header if asked and `first`), then checks
/// its outcomes against the prediction: Err(exit code 3) when they differ.
fn emit(
    args: &Args,
    case: &Case,
    first: bool,
    expect: Option<Expect>,
    result: &run::RunResult,
) -> Result<(), ExitCode> {
    if args.json {
        println!("{}", case.json());
    } else {
        if args.header && first {
            println!("{}", Case::MARKDOWN_HEADER);
        }
        println!("{}", case.markdown_row());
    }
    if let Some(e) = expect
        && let Err(msg) = check_expectation(e, &result.counts)
    {
        eprintln!("portcullis-loadtest: {}: {msg}", case.name);
        return Err(ExitCode::from(3));
    }
    Ok(())
}
