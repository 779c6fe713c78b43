//! The `streamdest` command line (SPEC §5).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use streamdest::config::Config;
use streamdest::egress::{self, Egress, EgressOptions};
use streamdest::pipeline::Cluster;
use streamdest::replay::{Deliver, DryRun, FeedSummary, Interrupt, ReplayOptions, Source, replay};
use streamdest::storage::deadletter::{DeadLetterFilter, DeadLetterStore};

#[derive(Parser)]
#[command(
    name = "streamdest",
    version,
    about = "A streaming HTTP API destination on timely + differential dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text (coloured on a terminal) or one JSON object a line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STREAMDEST_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Timely's cluster options: run one dataflow across several processes.
#[derive(Args, Clone, Debug)]
struct ClusterArgs {
    /// Number of processes in the cluster.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's index, 0-based.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// A file of `host:port` lines, one per process (default: localhost:2101+i).
    #[arg(long)]
    hostfile: Option<String>,
}

impl ClusterArgs {
    fn cluster(&self) -> Option<Cluster> {
        (self.processes > 1).then(|| Cluster {
            processes: self.processes,
            process: self.process,
            hostfile: self.hostfile.clone(),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Measure the whole pipeline against a local endpoint at a fixed offered rate.
    Bench(streamdest::bench::BenchArgs),
    /// A live demo on loopback: synthetic profiles, the pipeline, a local endpoint.
    Demo(streamdest::demo::DemoArgs),
    /// The service: ingest and control API, write-ahead log, dataflow, egress. Survives a
    /// restart (the data directory holds the log and what was delivered).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Dataflow worker threads (1 to 256).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: u16,
        /// The API's address (`127.0.0.1:0` picks a free port; the address is printed on
        /// stderr).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The write-ahead log, the acknowledgements and the dead-letter store.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// When set, every route but /healthz needs `Authorization: Bearer <token>`.
        #[arg(long, env = "STREAMDEST_API_TOKEN", hide_env_values = true)]
        api_token: Option<String>,
        /// The largest request body in bytes; larger ones get 413.
        #[arg(long, default_value_t = streamdest::api::DEFAULT_MAX_BODY)]
        max_body: u64,
        /// Refuse requests (503 with Retry-After) while the write-ahead log holds more than
        /// this many bytes (default: no limit).
        #[arg(long, value_name = "BYTES")]
        max_log_bytes: Option<u64>,
        /// Write a snapshot of the state every this many log records (each accepted request
        /// is one), and delete the log behind it: restart time and disk use then follow the
        /// state held, not the history.
        #[arg(long, default_value_t = 20_000, value_name = "RECORDS", value_parser = clap::value_parser!(u64).range(1..))]
        snapshot_every: u64,
        /// Size of the log's segment files (tests; default 64 MiB).
        #[arg(long, hide = true, value_name = "BYTES")]
        log_segment_bytes: Option<u64>,
    },
    /// Push a history of events through the dataflow and deliver every export.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// An NDJSON file of events, or `-` for standard input.
        #[arg(long)]
        events: String,
        /// Dataflow worker threads in this process (1 to 256). What is exported does not
        /// depend on it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: u16,
        /// Events per epoch: an epoch is this many consecutive lines. Larger epochs are much
        /// faster (each epoch has a fixed cost), but several events for one profile in one
        /// epoch give one export of the state at the epoch's end, and a status that leaves and
        /// comes back within an epoch has not changed (SPEC §3). 1 exports every relevant event.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
        /// Where the dead-letter store lives (default ./streamdest-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the exports to standard output as JSON lines instead of sending them (needs
        /// no secrets).
        #[arg(long)]
        dry_run: bool,
        /// Also write the summary (counts per destination, latency, wall time) as JSON here.
        #[arg(long, value_name = "FILE")]
        summary_json: Option<PathBuf>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// List or re-drive the exports that could not be delivered.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Check a configuration file.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print one JSON object a line: destination, profile, attempts, lastStatus, lastError,
    /// lastResponseBody (the first KiB of the endpoint's last answer), payload, entry (the id),
    /// idempotencyKey, firstFailedAt, lastFailedAt (RFC 3339 UTC).
    /// Exits 2 when corrupt records had to be skipped (the others are still printed).
    List {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        destination: Option<String>,
    },
    /// Give each entry one more round of its retry policy; exit 1 if any failed again.
    /// The filters combine: an entry is re-sent when it matches all that are given.
    Redrive {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        filter: DeadLetterFilterArgs,
    },
    /// Remove entries for good (then rewrite the log without them); prints how many were
    /// removed. Needs a filter, or --all.
    Purge {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        filter: DeadLetterFilterArgs,
        /// Remove every entry (required when no filter is given).
        #[arg(long)]
        all: bool,
    },
    /// Print one JSON object: total, and the counts per destination and per lastStatus
    /// ("none" when no response was received). Exits 2 when corrupt records were skipped.
    Summary {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct DeadLetterFilterArgs {
    /// Only the entries of this destination.
    #[arg(long)]
    destination: Option<String>,
    /// Only this entry (the `entry` of `dead-letters list`); repeat for several.
    #[arg(long = "entry", value_name = "ID")]
    entries: Vec<u64>,
    /// Only the entries of this profile ("namespace:id").
    #[arg(long)]
    profile: Option<String>,
}

impl DeadLetterFilterArgs {
    fn into_filter(self) -> DeadLetterFilter {
        DeadLetterFilter {
            destination: self.destination,
            entries: self.entries,
            profile: self.profile,
        }
    }
}

/// Where `replay` keeps its dead letters when `--data-dir` is not given.
const DEFAULT_DATA_DIR: &str = "streamdest-data";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egress")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        // Colour only for a person at a terminal, never into a file or a pipe.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// True when `e` comes from writing to a standard output that its reader closed.
fn is_closed_output(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.is::<streamdest::replay::OutputClosed>()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::from_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// mimalloc: the dataflow allocates many small, short-lived values across worker threads,
/// where glibc's allocator spent a quarter of the time (BENCHMARKS.md). Its v2 line: v3 held
/// 12–17% more memory for the same heap, at the same speed (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        // The reader of standard output left (`| head`): like any filter, stop quietly.
        Err(e) if is_closed_output(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamdest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bench(args) => {
            streamdest::bench::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            streamdest::demo::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            workers,
            listen,
            data_dir,
            api_token,
            max_body,
            max_log_bytes,
            snapshot_every,
            log_segment_bytes,
        } => {
            streamdest::service::run(streamdest::service::RunOptions {
                config,
                workers: workers.into(),
                listen,
                data_dir,
                api_token: api_token.filter(|t| !t.is_empty()),
                max_body,
                max_wal_bytes: max_log_bytes,
                snapshot_records: snapshot_every,
                segment_bytes: log_segment_bytes,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { config: path } => {
            let config = load_config(&path)?;
            config
                .unset_secrets()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&config.redacted_json())?
            )
            .and_then(|()| out.flush())
            .context("writing to standard output")?;
            let count = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            // The verdict, on stderr: stdout carries the configuration.
            eprintln!(
                "ok: {}, {}, {}",
                count(
                    config.merge_policies.len(),
                    "merge policy",
                    "merge policies"
                ),
                count(config.audiences.len(), "audience", "audiences"),
                count(config.destinations.len(), "destination", "destinations")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { action } => {
            /// Names the corrupt records a read skipped on stderr; exit status 2 if any.
            fn report_corrupt(store: &DeadLetterStore, command: &str) -> ExitCode {
                // Corrupt records were skipped: what could be read is shown, and the exit
                // status is 2 (see storage::deadletter).
                let corrupt: Vec<String> = store
                    .damage()
                    .iter()
                    .filter(|d| d.is_corrupt())
                    .map(|d| d.offset.to_string())
                    .collect();
                if corrupt.is_empty() {
                    return ExitCode::SUCCESS;
                }
                eprintln!(
                    "streamdest: dead-letters {command}: {}: skipped {} corrupt record(s) at byte offset {}; \
                     the intact entries are {} (the next redrive or replay keeps a copy of the log \
                     and rewrites it)",
                    store.log_path().display(),
                    corrupt.len(),
                    corrupt.join(", "),
                    if command == "list" {
                        "listed"
                    } else {
                        "counted"
                    },
                );
                ExitCode::from(2)
            }
            let open_context = |data_dir: &std::path::Path| {
                format!("opening the dead-letter store in {}", data_dir.display())
            };
            // The data directory must exist: a mistyped --data-dir is not an empty store.
            match action {
                DeadLetterAction::List {
                    data_dir,
                    destination,
                } => {
                    let store = DeadLetterStore::open_read_only(&data_dir)
                        .with_context(|| open_context(&data_dir))?;
                    let mut out = std::io::stdout().lock();
                    for line in egress::list_json_lines(&store, destination.as_deref()) {
                        writeln!(out, "{line}").context("writing to standard output")?;
                    }
                    out.flush().context("writing to standard output")?;
                    Ok(report_corrupt(&store, "list"))
                }
                DeadLetterAction::Summary { data_dir } => {
                    let store = DeadLetterStore::open_read_only(&data_dir)
                        .with_context(|| open_context(&data_dir))?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", egress::summary_json(&store))
                        .and_then(|()| out.flush())
                        .context("writing to standard output")?;
                    Ok(report_corrupt(&store, "summary"))
                }
                DeadLetterAction::Redrive { data_dir, filter } => {
                    let store = DeadLetterStore::open_existing(&data_dir)
                        .with_context(|| open_context(&data_dir))?;
                    let report = runtime()?.block_on(egress::redrive_matching(
                        Arc::new(store),
                        &filter.into_filter(),
                    ));
                    eprintln!(
                        "redrive: {} delivered, {} failed again",
                        report.succeeded, report.failed
                    );
                    Ok(if report.failed > 0 {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                DeadLetterAction::Purge {
                    data_dir,
                    filter,
                    all,
                } => {
                    let filter = filter.into_filter();
                    if filter.is_empty() && !all {
                        anyhow::bail!(
                            "dead-letters purge removes entries for good: give --destination, \
                             --entry or --profile, or --all to remove every entry"
                        );
                    }
                    let store = DeadLetterStore::open_existing(&data_dir)
                        .with_context(|| open_context(&data_dir))?;
                    let removed = store.purge(&filter).with_context(|| {
                        format!("purging the dead-letter store in {}", data_dir.display())
                    })?;
                    println!(
                        "purged {removed} entr{}",
                        if removed == 1 { "y" } else { "ies" }
                    );
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Replay {
            config,
            events,
            workers,
            batch,
            data_dir,
            dry_run,
            summary_json,
            cluster,
        } => {
            let path = config;
            let config = load_config(&path)?;
            if !dry_run {
                // Delivery needs every secret: refuse before reading an event.
                config
                    .unset_secrets()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            let plan = Arc::new(config.plan(now_ms()));
            // The first SIGINT/SIGTERM stops reading; what was read is still finished.
            let interrupt = Interrupt::new();
            let source = Source::parse(&events);
            let options = ReplayOptions {
                source: source.clone(),
                workers: usize::from(workers),
                batch: usize::try_from(batch).unwrap_or(usize::MAX),
                cluster: cluster.cluster(),
                interrupt: interrupt.clone(),
            };
            // `not_stored`: failed exports the dead-letter store could not take.
            let (summary, not_stored) = if dry_run {
                // Only for the signal handlers; lives until the process exits.
                let signals = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("signals")
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                interrupt.install(signals.handle())?;
                let (summary, _) =
                    replay(plan.clone(), &options, DryRun::new(plan)).context("replay")?;
                eprintln!(
                    "replay: {} events in {} epochs, {} exports, {:.2}s ({:.0} events/s)",
                    summary.events,
                    summary.epochs,
                    summary.exports,
                    summary.elapsed.as_secs_f64(),
                    summary.events as f64 / summary.elapsed.as_secs_f64().max(1e-9)
                );
                if let Some(path) = &summary_json {
                    let json = serde_json::json!({
                        "events": summary.events, "epochs": summary.epochs,
                        "exports": summary.exports, "wallSeconds": summary.elapsed.as_secs_f64(),
                    });
                    std::fs::write(path, format!("{json:#}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                (summary, 0)
            } else {
                let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
                let store = DeadLetterStore::open(&data_dir).with_context(|| {
                    format!("opening the dead-letter store in {}", data_dir.display())
                })?;
                let rt = runtime()?;
                interrupt.install(rt.handle())?;
                let egress = {
                    let _guard = rt.enter();
                    Egress::new(
                        config.destinations.clone(),
                        Some(Arc::new(store)),
                        EgressOptions::default(),
                    )
                    .context("starting the egress")?
                };
                let handler = Deliver::new(plan.clone(), egress.clone());
                let started = std::time::Instant::now();
                let (summary, _) = replay(plan, &options, handler).context("replay")?;
                rt.block_on(egress.drain());
                let unstored = egress.unstored();
                report_delivery(
                    &summary,
                    &egress,
                    started.elapsed(),
                    &data_dir,
                    summary_json.as_deref(),
                )?;
                (summary, unstored.len())
            };
            report_interrupt(&summary, &interrupt, &source, dry_run);
            if let Some(error) = summary.error {
                eprintln!("streamdest: {error}");
                return Ok(ExitCode::FAILURE);
            }
            // Nothing is claimed stored that is not: exports that are neither delivered nor
            // in the store make the replay fail.
            if not_stored > 0 {
                return Ok(ExitCode::FAILURE);
            }
            // Interrupted before the end of the input: the status a shell gives a process that
            // the signal stopped (130 for SIGINT, 143 for SIGTERM).
            if let Some(interrupted) = summary.interrupted {
                return Ok(ExitCode::from(interrupted.signal.exit_status()));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// After the summary: whether a signal cut the input short, and where.
fn report_interrupt(summary: &FeedSummary, interrupt: &Interrupt, source: &Source, dry_run: bool) {
    let done = if dry_run {
        "written"
    } else {
        "delivered or dead-lettered"
    };
    match (summary.interrupted, interrupt.requested()) {
        (Some(i), _) => eprintln!(
            "replay: interrupted by {}: stopped reading {} of {}; the events before it were \
             processed and their exports {done}",
            i.signal.name(),
            if i.after_line == 0 {
                "before the first line".to_string()
            } else {
                format!("after line {}", i.after_line)
            },
            source.name()
        ),
        (None, Some(signal)) => eprintln!(
            "replay: {} came after the whole input was read: nothing was skipped, and the \
             exports were {done}",
            signal.name()
        ),
        (None, None) => {}
    }
}

/// The end of a delivering replay, on stderr: the totals, a line per destination, where the
/// dead letters are, and the exports the store could not take (on stdout: their only copy).
fn report_delivery(
    summary: &streamdest::replay::FeedSummary,
    egress: &Egress,
    wall: std::time::Duration,
    data_dir: &Path,
    summary_json: Option<&Path>,
) -> anyhow::Result<()> {
    let stats = egress.stats();
    let unstored = egress.unstored();
    let q = |p: f64| stats.latency.value_at_quantile(p) as f64 / 1000.0;
    // "dead-lettered" counts only what the store holds; what it could not take is counted
    // apart.
    let not_stored = if unstored.is_empty() {
        String::new()
    } else {
        format!(", NOT STORED {}", unstored.len())
    };
    eprintln!(
        "replay: {} events in {} epochs, {:.2}s; exports {}, delivered {}, retried {}, dead-lettered {}{}; \
         delivery latency ms p50 {:.1} p95 {:.1} p99 {:.1} max {:.1}; wall time {:.2}s with the delivery drain",
        summary.events,
        summary.epochs,
        summary.elapsed.as_secs_f64(),
        stats.exports,
        stats.delivered,
        stats.retried,
        stats.dead_lettered,
        not_stored,
        q(0.5),
        q(0.95),
        q(0.99),
        stats.latency.max() as f64 / 1000.0,
        wall.as_secs_f64()
    );
    for (id, d) in &stats.destinations {
        let causes = if d.retried_by_cause.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = d
                .retried_by_cause
                .iter()
                .map(|(cause, n)| format!("{cause}: {n}"))
                .collect();
            format!(" ({})", list.join(", "))
        };
        eprintln!(
            "  destination {id}: exports {}, delivered {}, retried {}{causes}, dead-lettered {}",
            d.exports, d.delivered, d.retried, d.dead_lettered
        );
    }
    if stats.dead_lettered > 0 {
        eprintln!(
            "  dead letters are in {dir}: `streamdest dead-letters list --data-dir {dir}` shows them, \
             `streamdest dead-letters redrive --data-dir {dir}` re-sends them",
            dir = data_dir.display()
        );
    }
    if let Some(path) = summary_json {
        let mut json = stats.to_json();
        json["events"] = summary.events.into();
        json["epochs"] = summary.epochs.into();
        json["wallSeconds"] = wall.as_secs_f64().into();
        json["deadLetterDir"] = data_dir.display().to_string().into();
        std::fs::write(path, format!("{json:#}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !unstored.is_empty() {
        // Their only copy is in this process: hand them over before exiting.
        let mut out = std::io::stdout().lock();
        for u in &unstored {
            writeln!(out, "{}", u.letter.list_json())
                .context("writing the unstored exports to standard output")?;
        }
        out.flush()
            .context("writing the unstored exports to standard output")?;
        let last_error = unstored.last().map(|u| u.error.as_str()).unwrap_or("");
        eprintln!(
            "streamdest: {} failed export(s) could NOT be stored in the dead-letter store in {} \
             (last error: {last_error}); they are written to standard output, one \
             `dead-letters list` line each",
            unstored.len(),
            data_dir.display()
        );
    }
    Ok(())
}
