//! End-to-end QUIC connections from apps: accept them on a tunnel's endpoint,
//! authorize the key each proves, and bridge each of their streams to the local service.
//!
//! A connection is accepted only from a virtual address the tunnel's path socket bound for a
//! channel the relay announced ([`crate::channels`]); anything else is refused before a
//! handshake. The end-to-end handshake uses the hub's e2e server config (or, for a pairing
//! channel, the pairing config that admits any key and never resumes), and after it, resumed or
//! not, the hub checks that the key the app proved is the one the relay announced and is in the
//! *current* allow-list: a resumed session skips the certificate verifier, so the verifier
//! alone would let a revoked app holding a ticket back in.
//!
//! Each authorized connection is registered with the session registry by app key, so that a
//! revocation closes it (code `REVOKED`) and every stream on it at once, and it holds one
//! connection slot of its app ([`crate::load`]). Each stream opens with `StreamOpen`; the hub
//! answers `StreamAccepted` once the local service is reached, or a typed `Refused`
//! (`OverLimit` past the per-app stream cap, `ServiceUnavailable`), then bridges bytes. The
//! connection to the service waits its turn at [`crate::service`]'s gate, so a burst of
//! streams does not overflow the service's listen backlog.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyway_path::QuicBiStream;
use keyway_proto::codes;
use keyway_proto::io::write_frame;
use keyway_proto::{Frame, PublicKey, RefusalReason, SessionPurpose};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::answer::{close, refuse, stream_opened};
use crate::channels::ChannelInfo;
use crate::load::{Resource, Slot};
use crate::service::ServiceError;
use crate::shutdown::Shutdown;
use crate::state::{Shared, Tunnel};

/// How long an app has to complete the end-to-end handshake once its first packet arrived.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Accepts end-to-end connections on one tunnel's endpoint until the hub stops.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    endpoint: Endpoint,
    mut shutdown: Shutdown,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = shutdown.requested() => break,
        };
        let Some(channel) = tunnel.channels.get(&incoming.remote_address()) else {
            // Only packets of bound channels reach quinn with a virtual source, so this is a
            // channel that ended between its packet and this lookup.
            tracing::debug!(from = %incoming.remote_address(), "end-to-end connection on no live channel; refused");
            incoming.refuse();
            continue;
        };
        let span = tracing::info_span!(
            "e2e",
            app = %channel.app_key.fingerprint(),
            label = %shared.apps.label(&channel.app_key),
            observed = %channel.observed,
        );
        tokio::spawn(connection(shared.clone(), channel, incoming).instrument(span));
    }
}

/// A full handshake, bounded by [`HANDSHAKE_TIMEOUT`] and the channel's life.
async fn wait_handshake(channel: &ChannelInfo, connecting: quinn::Connecting) -> Option<Connection> {
    tokio::select! {
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting) => match done {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "end-to-end handshake failed");
                None
            }
            Err(_) => {
                tracing::info!("end-to-end handshake timed out");
                None
            }
        },
        () = channel.ended() => {
            tracing::info!("channel ended during the end-to-end handshake");
            None
        }
    }
}

/// One end-to-end connection: handshake, re-check, then its streams.
async fn connection(shared: Arc<Shared>, channel: Arc<ChannelInfo>, incoming: Incoming) {
    let config = match channel.purpose {
        SessionPurpose::Connect => shared.e2e_server.clone(),
        SessionPurpose::Pair => shared.pair_server.clone(),
    };
    let connecting = match incoming.accept_with(config) {
        Ok(connecting) => connecting,
        Err(e) => return tracing::info!(error = %e, "end-to-end connection failed at its first packet"),
    };
    // quinn lets a server use a connection at once ("0.5-RTT"); whether it may depends on what
    // the first flight was. A resumed session (a ticket from this hub, single-use: see
    // `keyway_proto::tls::enable_single_use_tickets`) already names the app key the ticket was
    // issued to, so that key is checked below and the app's early streams are served before
    // the handshake completes. A full handshake has proven no key yet: wait for it.
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok((conn, done)) => (conn, Some(done)),
        // Never for a server (quinn: "into_0rtt will always return Ok"); handled all the same.
        Err(connecting) => match wait_handshake(&channel, connecting).await {
            Some(conn) => (conn, None),
            None => return,
        },
    };
    let resumed = keyway_proto::tls::quic_peer_key(&conn).is_some();
    if let Some(done) = handshake {
        if resumed {
            shared.stats.resumed.fetch_add(1, Ordering::Relaxed);
            // Served from here on, before the handshake completes (0.5-RTT). quinn 0.11 does
            // not tell a server whether it took 0-RTT data, so that is not counted here.
            drop(done);
        } else {
            tokio::select! {
                done = tokio::time::timeout(HANDSHAKE_TIMEOUT, done) => match done {
                    // The value says whether 0-RTT was taken (never, on a full handshake);
                    // a failed handshake resolves it too, with the connection closed.
                    Ok(_) => match conn.close_reason() {
                        None => {}
                        Some(e) => return tracing::info!(error = %e, "end-to-end handshake failed"),
                    },
                    Err(_) => return close(&conn, codes::NORMAL, "end-to-end handshake timed out"),
                },
                () = channel.ended() => return tracing::info!("channel ended during the end-to-end handshake"),
            }
        }
    }
    let app_key = channel.app_key;
    if keyway_proto::tls::quic_peer_key(&conn) != Some(app_key) {
        tracing::warn!("the end-to-end key is not the key the relay announced; closing");
        return close(&conn, codes::PROTOCOL, "end-to-end key differs from the announced key");
    }
    if channel.purpose == SessionPurpose::Pair {
        return crate::pairing::serve(&shared, &conn, &channel).await;
    }
    // Registered before the allow-list check, so a revocation from here on is never missed.
    let guard = shared.sessions.register(app_key);
    if !shared.apps.contains(&app_key) {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("app key no longer authorized after the end-to-end handshake; closing");
        return close(&conn, codes::REVOKED, "app key is not authorized");
    }
    let max = shared.config.max_connections_per_app;
    let Some(_slot) = shared.load.try_take(app_key, Resource::Connection, max) else {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(max, "app is over its end-to-end connection cap; closing");
        return close(&conn, codes::LIMIT, "too many end-to-end connections from this app");
    };
    tracing::info!("end-to-end connection open");
    let why = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let stream = stream(shared.clone(), app_key, channel.observed, send, recv);
                    tokio::spawn(stream.in_current_span());
                }
                Err(e) => break format!("{e}"),
            },
            _ = guard.cut() => {
                close(&conn, codes::REVOKED, "app key revoked");
                break "app key revoked or hub stopping".to_owned();
            }
            () = channel.ended() => {
                close(&conn, codes::NORMAL, "channel ended");
                break "the relay ended the channel".to_owned();
            }
        }
    };
    tracing::info!(%why, "end-to-end connection closed");
}

/// Counts a stream as an active session, and holds its app's stream slot, for as long as it
/// lives.
struct Active {
    stats: Arc<crate::state::HubStats>,
    _slot: Slot,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream: the per-app cap, the local service, then bytes both ways.
async fn stream(
    shared: Arc<Shared>,
    app_key: PublicKey,
    observed: SocketAddr,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    if !stream_opened(&mut send, &mut recv).await {
        return;
    }
    let name = &shared.config.name;
    let max = shared.config.max_streams_per_app;
    let Some(slot) = shared.load.try_take(app_key, Resource::Stream, max) else {
        let message = format!(
            "app key {} has {max} streams open to hub {name}, its limit (max_streams_per_app)",
            app_key.fingerprint()
        );
        let _ = recv.stop(codes::LIMIT);
        return refuse(&shared, &mut send, RefusalReason::OverLimit, message).await;
    };
    let forward = shared.config.forward;
    // Waits its turn behind the connects in flight (`crate::service`): queued, not refused.
    let mut service = match shared.service.connect(forward, shared.config.service_timeout).await {
        Ok(service) => service,
        Err(e) => {
            tracing::warn!(error = %e, "local service unreachable");
            let message = match e {
                ServiceError::Connect { .. } => format!("hub {name} cannot reach its local service"),
                ServiceError::Timeout { .. } => format!("hub {name}'s local service did not answer in time"),
            };
            return refuse(&shared, &mut send, RefusalReason::ServiceUnavailable, message).await;
        }
    };
    let tcp = service.tcp();
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    if shared.config.proxy_protocol {
        let header = crate::proxy_protocol::header(observed, forward, Some(&app_key));
        if let Err(e) = tcp.write_all(&header).await {
            tracing::warn!(error = %e, "could not send the PROXY header to the local service");
            let _ = send.reset(codes::NORMAL);
            let _ = recv.stop(codes::NORMAL);
            return;
        }
    }
    if let Err(e) = write_frame(&mut send, &Frame::StreamAccepted).await {
        return tracing::debug!(error = %e, "could not accept the stream");
    }
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = Active { stats: shared.stats.clone(), _slot: slot };
    let mut quic = QuicBiStream { send, recv };
    match tokio::io::copy_bidirectional(&mut quic, &mut service).await {
        Ok((from_app, to_app)) => tracing::debug!(from_app, to_app, "stream closed"),
        Err(e) => tracing::debug!(error = %e, "stream ended with an error"),
    }
    shared.service.finished(&service, forward, std::time::Instant::now());
}
