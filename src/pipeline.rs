//! The running dataflow: timely workers fed epoch by epoch, and the merge of their completed
//! epochs into one ordered stream of exports for the egress.
//!
//! Threads: the caller feeds epochs ([`Pipeline::push`]); each timely worker thread owns its
//! dataflow and takes its share of every epoch from a channel; the workers' sinks report
//! completed epochs to an [`ExportStream`], which yields them in epoch order once every local
//! worker is past them. Backpressure: the feeder waits while more than `window` epochs are
//! pushed but not yet acknowledged by the consumer ([`ExportStream::ack`]), so a slow endpoint
//! holds the dataflow back and memory stays bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use streamdest_operators::dataflow::build;
use streamdest_operators::export::Encoded;
use streamdest_operators::history::Seed;
use streamdest_operators::input::{Epoch, EpochInput};
use streamdest_operators::meter::Meter;
use streamdest_operators::plan::{Plan, Plans};
use streamdest_operators::sink::{Completed, SnapshotPart, export_sink};
use timely::WorkerConfig;

/// Timely's cluster options, for running one dataflow across processes.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub processes: usize,
    pub process: usize,
    /// A file of `host:port` lines, one per process; default `localhost:2101+i`.
    pub hostfile: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Worker threads in this process.
    pub workers: usize,
    pub cluster: Option<Cluster>,
    /// Epochs that may be pushed ahead of the consumer's acknowledgements (default 16: the
    /// replay's peak memory is 8% lower than with 64, at the same speed; BENCHMARKS.md).
    pub window: u64,
    /// Counts each stage's updates (benchmarks); off by default.
    pub meter: Meter,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 1,
            cluster: None,
            window: 16,
            meter: Meter::default(),
        }
    }
}

enum WorkerMsg {
    Epoch(Epoch, EpochInput),
}

/// A running dataflow.
pub struct Pipeline {
    senders: Vec<Sender<WorkerMsg>>,
    /// The local workers' threads, unparked when an epoch is sent.
    threads: Vec<std::thread::Thread>,
    guards: Option<timely::communication::WorkerGuards<()>>,
    peers: usize,
    first_local: usize,
    acks: Receiver<Epoch>,
    acked: Option<Epoch>,
    window: u64,
    next: Epoch,
    plans: Plans,
}

/// The consumer end: completed epochs in order.
pub struct ExportStream {
    completed: Receiver<Completed>,
    acks: Sender<Epoch>,
    uppers: BTreeMap<usize, Epoch>,
    pending: BTreeMap<Epoch, Vec<Encoded>>,
    ready: std::collections::VecDeque<(Epoch, Vec<Encoded>)>,
    done: bool,
    snapshots: Receiver<SnapshotPart>,
    /// Parts of snapshots received, by epoch.
    parts: BTreeMap<Epoch, Vec<SnapshotPart>>,
    workers: usize,
}

impl Pipeline {
    /// Starts the workers; returns the feeding end and the consuming end.
    pub fn start(
        plan: Arc<Plan>,
        config: PipelineConfig,
    ) -> anyhow::Result<(Pipeline, ExportStream)> {
        let workers = config.workers.max(1);
        let meter = config.meter.clone();
        let plans = Plans::new(plan);
        let worker_plans = plans.clone();
        let mut args = vec!["-w".to_string(), workers.to_string()];
        let (peers, first_local) = match &config.cluster {
            Some(c) if c.processes > 1 => {
                args.extend([
                    "-n".into(),
                    c.processes.to_string(),
                    "-p".into(),
                    c.process.to_string(),
                ]);
                if let Some(h) = &c.hostfile {
                    args.extend(["-h".into(), h.clone()]);
                }
                (workers * c.processes, workers * c.process)
            }
            _ => (workers, 0),
        };
        let mut timely_config = timely::Config::from_args(args.into_iter())
            .map_err(|e| anyhow!("timely options: {e}"))?;
        timely_config.worker = WorkerConfig::default();
        // No idle merge effort: with ~40 arrangements and small epochs most of them are idle in
        // any one epoch, and 1,000 units of merging each per activation cost 3.5x the event
        // rate at batch 1 (BENCHMARKS.md). Merging stays proportional to incoming updates.
        differential_dataflow::configure(
            &mut timely_config.worker,
            &differential_dataflow::Config::default().idle_merge_effort(None),
        );

        let (completed_tx, completed_rx) = crossbeam_channel::unbounded::<Completed>();
        let (snapshot_tx, snapshot_rx) = crossbeam_channel::unbounded::<SnapshotPart>();
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = crossbeam_channel::unbounded::<WorkerMsg>();
            senders.push(tx);
            receivers.push(rx);
        }
        let receivers = Arc::new(std::sync::Mutex::new(
            receivers.into_iter().map(Some).collect::<Vec<_>>(),
        ));
        let (threads_tx, threads_rx) =
            crossbeam_channel::unbounded::<(usize, std::thread::Thread)>();

        let peers_addresses = cluster_addresses(&config)?;
        let body = move |worker: &mut timely::worker::Worker| {
            let local = worker.index() - first_local;
            let rx = receivers
                .lock()
                .ok()
                .and_then(|mut r| r.get_mut(local).and_then(Option::take))
                .expect("each local worker takes its own channel once");
            let completed_tx = completed_tx.clone();
            let snapshot_tx = snapshot_tx.clone();
            let threads_tx = threads_tx.clone();
            let plans = worker_plans.clone();
            let meter = meter.clone();
            let index = worker.index();
            let mut inputs = worker.dataflow::<Epoch, _, _>(move |scope| {
                let (inputs, decisions) = build(scope, plans.clone(), &meter);
                export_sink(
                    decisions,
                    plans,
                    index,
                    move |c| {
                        let _ = completed_tx.send(c);
                    },
                    move |part| {
                        let _ = snapshot_tx.send(part);
                    },
                );
                inputs
            });
            let _ = threads_tx.send((local, std::thread::current()));
            loop {
                // Take every epoch that is waiting, then step once for all of them: small
                // epochs share the progress rounds instead of paying one each.
                let mut received = false;
                let mut closed = false;
                loop {
                    match rx.try_recv() {
                        Ok(WorkerMsg::Epoch(epoch, data)) => {
                            inputs.push(epoch, data);
                            received = true;
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                if closed {
                    break;
                }
                if received {
                    worker.step();
                } else {
                    // The feeder unparks this thread when it sends; the timeout is a backstop.
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
            }
            // Dropping the inputs closes them; timely then runs the dataflow to completion.
        };
        let guards = match peers_addresses {
            None => timely::execute(timely_config, body)
                .map_err(|e| anyhow!("starting timely workers: {e}"))?,
            Some(addresses) => connect_cluster(timely_config, body, &addresses)?,
        };

        let mut threads: Vec<Option<std::thread::Thread>> = vec![None; workers];
        for _ in 0..workers {
            let (local, thread) = threads_rx
                .recv()
                .map_err(|_| anyhow!("a dataflow worker failed to start"))?;
            if let Some(slot) = threads.get_mut(local) {
                *slot = Some(thread);
            }
        }
        let (acks_tx, acks_rx) = crossbeam_channel::unbounded();
        let pipeline = Pipeline {
            senders,
            threads: threads.into_iter().flatten().collect(),
            guards: Some(guards),
            peers,
            first_local,
            acks: acks_rx,
            acked: None,
            window: config.window.max(1),
            next: 0,
            plans,
        };
        let stream = ExportStream {
            completed: completed_rx,
            acks: acks_tx,
            uppers: (first_local..first_local + workers)
                .map(|w| (w, 0))
                .collect(),
            pending: BTreeMap::new(),
            ready: Default::default(),
            done: false,
            snapshots: snapshot_rx,
            parts: BTreeMap::new(),
            workers,
        };
        Ok((pipeline, stream))
    }

    /// Workers in the whole computation (all processes).
    pub fn peers(&self) -> usize {
        self.peers
    }

    /// The next epoch number [`Pipeline::push`] will use.
    pub fn next_epoch(&self) -> Epoch {
        self.next
    }

    /// Pushes one epoch: `inputs[w]` is global worker `w`'s share; this process sends its own
    /// workers' shares. Blocks while the consumer is more than `window` epochs behind.
    pub fn push(&mut self, mut inputs: Vec<EpochInput>) -> anyhow::Result<Epoch> {
        let epoch = self.next;
        while self
            .acked
            .map_or(epoch >= self.window, |a| epoch > a + self.window)
        {
            let a = self.acks.recv().context("the export consumer stopped")?;
            self.acked = Some(self.acked.map_or(a, |b| b.max(a)));
            self.plans.forget_before(a);
        }
        inputs.resize_with(self.peers, EpochInput::default);
        for (local, sender) in self.senders.iter().enumerate() {
            let share = std::mem::take(&mut inputs[self.first_local + local]);
            sender
                .send(WorkerMsg::Epoch(epoch, share))
                .map_err(|_| anyhow!("a dataflow worker stopped"))?;
        }
        for thread in &self.threads {
            thread.unpark();
        }
        self.next += 1;
        Ok(epoch)
    }

    /// Puts `plan` (dynamic, with its `change` set) in force from the next epoch and pushes
    /// that epoch, empty: a control epoch (see `streamdest_operators::plan`). Single-process
    /// only: the plans are shared by this process's workers.
    pub fn push_control(&mut self, plan: Arc<Plan>) -> anyhow::Result<Epoch> {
        self.plans.set(self.next, plan);
        self.push(Vec::new())
    }

    /// Pushes an empty epoch at which the dataflow hands out every profile's record
    /// ([`ExportStream::snapshot`]). Single-process only, like [`Self::push_control`].
    pub fn push_snapshot(&mut self) -> anyhow::Result<Epoch> {
        let mut plan = (*self.plans.at(self.next)).clone();
        plan.change = None;
        plan.snapshot = true;
        self.plans.set(self.next, Arc::new(plan));
        self.push(Vec::new())
    }

    /// Blocks until the consumer has acknowledged every epoch pushed so far.
    pub fn wait_all_acked(&mut self) -> anyhow::Result<()> {
        while self.next > 0 && self.acked.is_none_or(|a| a + 1 < self.next) {
            let a = self.acks.recv().context("the export consumer stopped")?;
            self.acked = Some(self.acked.map_or(a, |b| b.max(a)));
        }
        Ok(())
    }

    /// Closes the inputs and waits for the workers to finish the dataflow.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.senders.clear();
        for thread in &self.threads {
            thread.unpark();
        }
        if let Some(guards) = self.guards.take() {
            for result in guards.join() {
                result.map_err(|e| anyhow!("dataflow worker failed: {e}"))?;
            }
        }
        Ok(())
    }
}

impl ExportStream {
    /// The next completed epoch and its exports (sorted by destination, then profile), or
    /// `None` once the dataflow has finished. Epochs without exports are returned too.
    pub fn next_epoch(&mut self) -> Option<(Epoch, Vec<Encoded>)> {
        loop {
            if let Some(ready) = self.ready.pop_front() {
                return Some(ready);
            }
            if self.done {
                return None;
            }
            let Ok(msg) = self.completed.recv() else {
                self.done = true;
                continue;
            };
            for (epoch, exports) in msg.epochs {
                self.pending.entry(epoch).or_default().extend(exports);
            }
            let before = self.uppers.values().copied().min().unwrap_or(0);
            self.uppers.insert(msg.worker, msg.upper);
            let upper = self.uppers.values().copied().min().unwrap_or(Epoch::MAX);
            if upper == Epoch::MAX {
                self.done = true;
            }
            // Once finished, epochs past the last one with exports are all empty.
            let end = if self.done {
                self.pending
                    .last_key_value()
                    .map_or(before, |(e, _)| e + 1)
                    .max(before)
            } else {
                upper
            };
            for epoch in before..end {
                let mut exports = self.pending.remove(&epoch).unwrap_or_default();
                exports
                    .sort_by(|a, b| (a.destination, &a.profile).cmp(&(b.destination, &b.profile)));
                self.ready.push_back((epoch, exports));
            }
        }
    }

    /// Every local worker's records at snapshot epoch `epoch` (pushed by
    /// [`Pipeline::push_snapshot`]); blocks until all have reported, which is at the latest
    /// soon after [`Self::next_epoch`] returned `epoch`.
    pub fn snapshot(&mut self, epoch: Epoch) -> anyhow::Result<Vec<Seed>> {
        loop {
            if self
                .parts
                .get(&epoch)
                .is_some_and(|p| p.len() >= self.workers)
            {
                let parts = self.parts.remove(&epoch).unwrap_or_default();
                return Ok(parts.into_iter().flat_map(|p| p.records).collect());
            }
            let part = self
                .snapshots
                .recv()
                .context("the dataflow stopped before its snapshot")?;
            self.parts.entry(part.epoch).or_default().push(part);
        }
    }

    /// Tells the feeder that `epoch` has been handed on (delivered or queued for delivery).
    pub fn ack(&self, epoch: Epoch) {
        let _ = self.acks.send(epoch);
    }
}

/// How long a process waits for the other processes of a cluster.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The processes' addresses, in cluster mode.
fn cluster_addresses(config: &PipelineConfig) -> anyhow::Result<Option<Vec<String>>> {
    let Some(cluster) = config.cluster.as_ref().filter(|c| c.processes > 1) else {
        return Ok(None);
    };
    Ok(Some(match &cluster.hostfile {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the hostfile {path}"))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => (0..cluster.processes)
            .map(|i| format!("localhost:{}", 2101 + i))
            .collect(),
    }))
}

/// Starts the workers of a cluster process: timely connects to the other processes first, and
/// prints its progress on standard output, so standard output is pointed at standard error
/// until the connections are made (it carries `--dry-run`'s exports). Gives up, naming the
/// addresses, after [`CONNECT_TIMEOUT`].
fn connect_cluster<F>(
    config: timely::Config,
    body: F,
    addresses: &[String],
) -> anyhow::Result<timely::communication::WorkerGuards<()>>
where
    F: Fn(&mut timely::worker::Worker) + Send + Sync + 'static,
{
    eprintln!(
        "streamdest: connecting to the cluster's processes at {} (timeout {} s)",
        addresses.join(", "),
        CONNECT_TIMEOUT.as_secs()
    );
    let _redirect = StdoutToStderr::new();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("cluster-connect".into())
        .spawn(move || {
            let _ = tx.send(timely::execute(config, body));
        })
        .context("starting the cluster connection thread")?;
    match rx.recv_timeout(CONNECT_TIMEOUT) {
        Ok(started) => started.map_err(|e| anyhow!("starting timely workers: {e}")),
        Err(_) => Err(anyhow!(
            "gave up after {} s waiting for the cluster's processes at {}",
            CONNECT_TIMEOUT.as_secs(),
            addresses.join(", ")
        )),
    }
}

/// Points standard output (fd 1) at standard error while it lives.
struct StdoutToStderr {
    saved: Option<libc::c_int>,
}

impl StdoutToStderr {
    fn new() -> StdoutToStderr {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // SAFETY: dup and dup2 on the process's own standard descriptors; failures leave
        // standard output as it was.
        let saved = unsafe {
            let saved = libc::dup(1);
            (saved >= 0 && libc::dup2(2, 1) >= 0).then_some(saved)
        };
        StdoutToStderr { saved }
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores the descriptor saved in `new` and closes the copy.
            unsafe {
                libc::dup2(saved, 1);
                libc::close(saved);
            }
        }
    }
}
