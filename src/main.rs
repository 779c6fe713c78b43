//! The `streamdest` command line (SPEC §5).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use streamdest::config::Config;
use streamdest::pipeline::Cluster;
use streamdest::replay::{DryRun, ReplayOptions, Source, replay};

#[derive(Parser)]
#[command(
    name = "streamdest",
    version,
    about = "A streaming HTTP API destination on timely + differential dataflow"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Push a history of events through the dataflow and deliver every export.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// An NDJSON file of events, or `-` for standard input.
        #[arg(long)]
        events: String,
        /// Dataflow worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Events per epoch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the exports to standard output as JSON lines instead of sending them.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Check a configuration file.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn load_config(path: &PathBuf) -> anyhow::Result<Config> {
    Config::from_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("streamdest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { config } => {
            let config = load_config(&config)?;
            println!("{}", serde_json::to_string_pretty(&config.redacted_json())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            events,
            workers,
            batch,
            data_dir: _,
            dry_run,
            cluster,
        } => {
            let config = load_config(&config)?;
            let plan = Arc::new(config.plan(now_ms()));
            let options = ReplayOptions {
                source: Source::parse(&events),
                workers,
                batch,
                cluster: cluster.cluster(),
            };
            if !dry_run {
                anyhow::bail!("delivery to endpoints is not wired into replay yet; use --dry-run");
            }
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
            if let Some(error) = summary.error {
                eprintln!("streamdest: {error}");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
