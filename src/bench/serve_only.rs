//! `--serve-only SECS`: the receiver alone, for `wrk`.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, bail};

use super::args::secs;
use crate::receiver::{Receiver, ReceiverOptions};

/// `--serve-only SECS`: the receiver alone, for `wrk`.
pub(super) fn serve_only(seconds: f64) -> anyhow::Result<()> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("--serve-only needs a positive number of seconds");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let receiver = runtime
        .block_on(Receiver::start(ReceiverOptions::default()))
        .context("starting the receiver")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "receiver listening on {}", receiver.url("/ingest"))?;
    out.flush()?;
    let start = Instant::now();
    std::thread::sleep(secs(seconds));
    let requests = receiver.requests();
    writeln!(
        out,
        "receiver: {requests} requests in {:.1} s",
        start.elapsed().as_secs_f64()
    )?;
    let _enter = runtime.enter();
    receiver.shutdown();
    Ok(())
}
