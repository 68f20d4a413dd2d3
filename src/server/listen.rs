//! The connection loop of `sluice serve`: HTTP/1.1 over hyper, with the bounds a server
//! facing the internet needs that `axum::serve` does not set:
//! - request headers (and the wait for the next request on a kept-alive connection) must
//!   arrive within `[server] header_timeout_seconds`, else the connection is closed, so
//!   a client trickling its headers cannot hold a connection for ever;
//! - at most `[server] max_connections` are open at once: beyond, new connections wait
//!   in the kernel's accept queue instead of using up the process's file descriptors.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower_service::Service;

use super::Metrics;

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` completes; then stops accepting, lets each
/// open connection finish the request it is answering, and returns once all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut open = JoinSet::new();
    let full_warned = super::Throttle::new();
    tokio::pin!(stop);
    loop {
        while open.try_join_next().is_some() {}
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Warned at most once a minute: a flood would otherwise flood the log too.
                if let Some(held) = full_warned.pass(Duration::from_secs(60)) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        more_since_last = held,
                        "every allowed connection is open; new ones wait until one closes ([server] max_connections)"
                    );
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = &mut stop => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    on_accept_error(e).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        let router = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            let mut router = router.clone();
            async move { router.call(request.map(axum::body::Body::new)).await }
        });
        let connection = http.serve_connection(TokioIo::new(tcp), service);
        let mut closing = closing_rx.clone();
        let metrics = metrics.clone();
        open.spawn(async move {
            let _permit = permit;
            metrics.open_connections.fetch_add(1, Relaxed);
            let _open = OpenGuard(metrics);
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::trace!(error = %e, peer = %peer, "connection ended with an error");
                    }
                }
                _ = async { closing.wait_for(|c| *c).await.map(|_| ()) } => {
                    // Answers the request in flight, if any, then closes.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while open.join_next().await.is_some() {}
}

/// Counts a connection open until dropped (also when its task is aborted).
struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

/// An error of `accept`: one about a single connection (reset before it was accepted) is
/// skipped; any other (out of file descriptors) is logged and accepting pauses a second,
/// instead of spinning.
async fn on_accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; pausing a second (is the file descriptor limit below [server] max_connections?)");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
