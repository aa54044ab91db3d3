//! `keyway forward`: a local TCP listener whose every connection becomes one session to a hub.
//!
//! This lives in the library (not the binary) so tests and other tools can run a forwarder
//! in-process. A failed session is logged with its typed error and only that TCP connection
//! is closed: the forwarder itself keeps running, since the hub may come back.
//!
//! Each connection uses [`Client::connect_pipelined`]: its first bytes leave
//! with the stream's `StreamOpen` instead of a round trip later; a refusal by the hub then
//! ends the copy with the typed error, logged like a refused `connect`. With
//! [`Options::early_data`] (`keyway forward --early-data`) the first bytes go with
//! [`Client::connect_early`] instead: as 0-RTT early data when the session needs a new,
//! resumed end-to-end connection.

use std::future::Future;
use std::time::Duration;

use keyway_proto::{HubName, PublicKey};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::Client;

/// How long a forwarded connection with `early_data` waits for its client's first bytes
/// before it opens its session without them (a protocol where the server speaks first).
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(20);

/// How the forwarder opens sessions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Send each connection's first bytes (what its client sent within 20 ms) with
    /// [`Client::connect_early`]: as 0-RTT early data when a new end-to-end connection resumes.
    /// Only for services whose first request is safe to run twice.
    pub early_data: bool,
}

/// Accepts connections on `listener` until `shutdown` completes, bridging each to a new
/// session with `hub`. On shutdown, connections still open are aborted.
pub async fn run(
    client: Client,
    hub: HubName,
    hub_key: PublicKey,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with(client, hub, hub_key, listener, Options::default(), shutdown).await
}

/// [`run`] with [`Options`].
pub async fn run_with(
    client: Client,
    hub: HubName,
    hub_key: PublicKey,
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (client, hub) = (client.clone(), hub.clone());
                    tasks.spawn(async move { bridge(client, hub, hub_key, tcp, peer, options).await });
                }
                Err(e) => {
                    // Typically EMFILE: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.shutdown().await;
    Ok(())
}

async fn bridge(
    client: Client,
    hub: HubName,
    hub_key: PublicKey,
    mut tcp: TcpStream,
    peer: std::net::SocketAddr,
    options: Options,
) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let mut first = vec![0u8; 16 * 1024];
    let first_len = match options.early_data {
        false => 0,
        true => match tokio::time::timeout(FIRST_BYTES_WAIT, tcp.read(&mut first)).await {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return tracing::info!(%peer, error = %e, "local connection failed"),
            Err(_) => 0,
        },
    };
    let opened = match first.get(..first_len).filter(|f| !f.is_empty()) {
        Some(first) => client.connect_early(&hub, &hub_key, first).await,
        None => client.connect_pipelined(&hub, &hub_key).await,
    };
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(%peer, %hub, refusal = ?e.refusal(), error = %e, "session failed; closing the local connection");
            return;
        }
    };
    tracing::info!(%peer, %hub, hub_key = %hub_key.fingerprint(), early_data = stream.early_data(), "session open");
    match tokio::io::copy_bidirectional(&mut tcp, &mut stream).await {
        Ok((up, down)) => tracing::info!(%peer, %hub, bytes_up = up, bytes_down = down, "session closed"),
        Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<crate::ClientError>()) {
            Some(typed) => {
                tracing::warn!(%peer, %hub, refusal = ?typed.refusal(), error = %typed, "session failed; closing the local connection")
            }
            None => tracing::info!(%peer, %hub, error = %e, "session ended with an error"),
        },
    }
}
