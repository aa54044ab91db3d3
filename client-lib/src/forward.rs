//! `keyway forward`: a local TCP listener whose every connection becomes one session to a hub.
//!
//! This lives in the library (not the binary) so tests and other tools can run a forwarder
//! in-process. A failed session is logged with its typed error and only that TCP connection
//! is closed: the forwarder itself keeps running, since the hub may come back.
//!
//! Each connection uses [`Client::connect_pipelined`]: its first bytes leave
//! with the stream's `StreamOpen` instead of a round trip later; a refusal by the hub then
//! ends the copy with the typed error, logged like a refused `connect`.

use std::future::Future;
use std::time::Duration;

use keyway_proto::{HubName, PublicKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::Client;

/// Accepts connections on `listener` until `shutdown` completes, bridging each to a new
/// session with `hub`. On shutdown, connections still open are aborted.
pub async fn run(
    client: Client,
    hub: HubName,
    hub_key: PublicKey,
    listener: TcpListener,
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
                    tasks.spawn(async move { bridge(client, hub, hub_key, tcp, peer).await });
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
) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let mut stream = match client.connect_pipelined(&hub, &hub_key).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(%peer, %hub, refusal = ?e.refusal(), error = %e, "session failed; closing the local connection");
            return;
        }
    };
    tracing::info!(%peer, %hub, hub_key = %hub_key.fingerprint(), "session open");
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
