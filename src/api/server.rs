//! The accept loop: one task per connection (HTTP/1.1, or HTTP/2 with prior knowledge, through
//! hyper-util's auto builder), and graceful shutdown.
//!
//! When `shutdown` resolves: the listener is closed (no new connections), every connection is
//! told to finish — idle keep-alive connections close at once, a request in flight is answered
//! and its connection closed after it — and [`serve`] returns once all are done, or when
//! [`ApiOptions::shutdown_grace`] has passed, dropping what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::router::{ApiState, handle};
use super::{ApiOptions, Backend};

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the API on `listener` until `shutdown` resolves, then shuts down gracefully (see the
/// module docs). Errors accepting one connection are logged and do not stop the server.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    options: ApiOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let grace = options.shutdown_grace;
    let state = Arc::new(ApiState { backend, options });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tracing::trace!(target: "streamdest::api", %peer, "connection");
                    connections.spawn(connection(stream, state.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // E.g. too many open files: wait a little instead of spinning.
                    tracing::warn!(target: "streamdest::api", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            target: "streamdest::api",
            remaining = connections.len(),
            "shutdown grace passed: dropping the connections still open"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

async fn connection(
    stream: tokio::net::TcpStream,
    state: Arc<ApiState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stop = async move {
        // The guard `wait_for` returns must not live across an await.
        let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
    };
    let result = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = stop => None,
    };
    let result = match result {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Client went away, bad request line, header timeout…: nothing to do but note it.
        tracing::debug!(target: "streamdest::api", error = %e, "connection ended with an error");
    }
}
