//! One relay's tunnel: dial, register, serve, and when anything breaks reconnect, forever,
//! after the delay [`crate::reconnect`] gives for how the attempt ended (capped exponential
//! backoff with jitter for failures, a few seconds for a relay refusing for load).
//!
//! Each relay gets a task of its own (spawned by [`crate::connector`]), with its own QUIC
//! endpoint, dialer, backoff and status; they share everything else through
//! [`Shared`] (the apps list, the sessions, the TLS configs, the counters), so a session is
//! handled alike whichever relay it came through. A relay that goes away (or asks the hub to
//! move with `GoAway`) only sends its own tunnel back to connecting: the hub stays
//! [`TunnelStatus::Registered`] overall while at least one tunnel is.
//!
//! While registered, one loop multiplexes:
//! * incoming session streams (each handled in its own task, see [`crate::session`]);
//! * frames from the relay on the control stream (`Pong`, `Ping`, `GoAway`), read in place
//!   through a [`FrameReader`], which keeps a partly arrived frame across `select!` turns;
//! * an application-level `Ping` every `ping_interval`: an unanswered ping by the next tick
//!   means the tunnel is dead even if QUIC still thinks it is alive (liveness tests the path
//!   through the relay, not a socket; the bookkeeping is [`Liveness`], pure);
//! * changes of `authorized_apps` and of the pairing window, published to the relay as an
//!   `AllowList` frame (with `pairing_open` set while a window is open).
//!
//! Several relay addresses with one key are the nodes of one relay cluster: the task keeps
//! one tunnel, to one node at a time, and moves to the next node whenever an attempt ends
//! (lost, refused, `GoAway`, dial failure), so a dead node costs the hub one liveness interval
//! and one backoff delay.
//!
//! A refusal (`NameNotAuthorized`, `NameClaimed`, …) is shown in [`TunnelStatus::Refused`]
//! but still retried with backoff: the relay owner may be about to add the hub to
//! `authorized_hubs`, and the hub owner should not have to restart anything then.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyway_path::relay_link::{self, RelayDialer};
use keyway_path::PathError;
use keyway_proto::codec::MAX_ALLOWED_APPS;
use keyway_proto::codes;
use keyway_proto::io::{write_frame, FrameIoError, FrameReader};
use keyway_proto::{Frame, PublicKey, RefusalReason};
use quinn::{Connection, ConnectionError, Endpoint, TransportErrorCode};
use tracing::Instrument;

use crate::apps::Apps;
use crate::reconnect::{Ended, Reconnect};
use crate::shutdown::Shutdown;
use crate::state::{Shared, Tunnel};
use crate::status::TunnelStatus;

/// How one tunnel attempt ended.
#[derive(Debug)]
enum Outcome {
    Shutdown,
    Refused {
        reason: RefusalReason,
        message: String,
    },
    /// The relay refused the connection before its handshake (QUIC `CONNECTION_REFUSED`):
    /// it drains, this address is over its per-source rate, or a reconnect storm fills its
    /// handshakes in flight. All mean "come back soon".
    Busy,
    GoAway {
        hint: Duration,
        message: String,
    },
    Lost {
        registered: bool,
        replaced: bool,
        error: String,
    },
}

impl Outcome {
    fn lost(registered: bool, error: impl fmt::Display) -> Self {
        Outcome::Lost { registered, replaced: false, error: error.to_string() }
    }
}

/// One address a tunnel task may dial: its status slot, dialer and endpoint.
pub(crate) type Node = (Arc<Tunnel>, RelayDialer, Endpoint);

/// Runs the tunnel to one relay, or to one node at a time of a relay cluster (`nodes`, all
/// with one key), until a stop is requested.
pub(crate) async fn run(shared: Arc<Shared>, nodes: Vec<Node>, mut shutdown: Shutdown) {
    let mut policy = Reconnect::new(shared.config.backoff_min, shared.config.backoff_max);
    let mut at = 0;
    while let Some((tunnel, dialer, endpoint)) = nodes.get(at) {
        let outcome = attempt(&shared, tunnel, dialer, endpoint, &mut shutdown).await;
        let delay = match outcome {
            Outcome::Shutdown => break,
            Outcome::Refused { reason, message } => {
                tracing::error!(%reason, %message, name = %shared.config.name, "relay refused the registration; retrying");
                shared.set_status(tunnel, TunnelStatus::Refused { reason, message });
                policy.delay(Ended::Refused, &mut rand::rng())
            }
            Outcome::Busy => {
                shared.set_status(tunnel, TunnelStatus::Connecting);
                let delay = policy.delay(Ended::RefusedForLoad, &mut rand::rng());
                tracing::info!(
                    retry_in = ?delay,
                    refusals = policy.load_refusals(),
                    "the relay refused the connection before its handshake (it is draining, busy with \
                     a reconnect storm, or this address is over its per-source rate); retrying soon"
                );
                delay
            }
            Outcome::GoAway { hint, message } => {
                shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tunnel.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.set_status(tunnel, TunnelStatus::Connecting);
                let delay = policy.delay(Ended::GoAway(hint), &mut rand::rng());
                tracing::info!(%message, delay = ?delay, "relay asked the hub to move; reconnecting");
                delay
            }
            Outcome::Lost { registered, replaced, error } => {
                if registered {
                    shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tunnel.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if replaced {
                    tracing::warn!(
                        "another connection registered this hub (same name and key); is a second \
                         connector running with this key?"
                    );
                }
                shared.set_status(tunnel, TunnelStatus::Connecting);
                let ended = match (registered, replaced) {
                    (_, true) => Ended::Replaced,
                    (true, false) => Ended::Lost,
                    (false, false) => Ended::Failed,
                };
                let delay = policy.delay(ended, &mut rand::rng());
                tracing::warn!(%error, registered, retry_in = ?delay, "tunnel to relay lost");
                delay
            }
        };
        // One cluster, one tunnel: whatever ended this attempt may be this node's alone (it
        // died, drains, or cannot reach the store), so the next attempt goes to the next node.
        if nodes.len() > 1 {
            at = (at + 1) % nodes.len();
            if let Some((next, _, _)) = nodes.get(at) {
                tracing::info!(next = %next.target.addr, retry_in = ?delay, "moving to the next relay cluster node");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.requested() => break,
        }
    }
    for (tunnel, _, _) in &nodes {
        shared.set_status(tunnel, TunnelStatus::Stopped);
    }
}

/// The allow-list as published to the relay (capped at the protocol limit: fail closed, the
/// keys left out are refused by the relay but the rest keep working).
fn published_apps(apps: &Apps) -> Vec<PublicKey> {
    let mut keys = apps.allow_list().snapshot();
    if keys.len() > MAX_ALLOWED_APPS {
        tracing::warn!(
            total = keys.len(),
            limit = MAX_ALLOWED_APPS,
            "too many authorized apps to publish; the relay will refuse those beyond the limit"
        );
        keys.truncate(MAX_ALLOWED_APPS);
    }
    keys
}

fn from_connection_error(registered: bool, e: ConnectionError) -> Outcome {
    let replaced = matches!(&e, ConnectionError::ApplicationClosed(c) if c.error_code == codes::REPLACED);
    Outcome::Lost { registered, replaced, error: format!("relay connection: {e}") }
}

fn frame_error(conn: &Connection, registered: bool, what: &str, e: FrameIoError) -> Outcome {
    match conn.close_reason() {
        Some(reason) => from_connection_error(registered, reason),
        None => Outcome::lost(registered, format!("{what}: {e}")),
    }
}

async fn attempt(
    shared: &Arc<Shared>,
    tunnel: &Arc<Tunnel>,
    dialer: &RelayDialer,
    endpoint: &Endpoint,
    shutdown: &mut Shutdown,
) -> Outcome {
    if shutdown.is_requested() {
        return Outcome::Shutdown;
    }
    let conn = tokio::select! {
        dialed = dialer.dial(endpoint) => match dialed {
            Ok(conn) => conn,
            Err(PathError::Connection(ConnectionError::ConnectionClosed(close)))
                if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
            {
                return Outcome::Busy
            }
            Err(e) => return Outcome::lost(false, e),
        },
        _ = shutdown.requested() => return Outcome::Shutdown,
    };
    let outcome = tokio::select! {
        outcome = serve(shared, tunnel, &conn) => outcome,
        _ = shutdown.requested() => Outcome::Shutdown,
    };
    match &outcome {
        // After GoAway the relay drains: leave the connection to the sessions still on it
        // (quinn closes it once the last stream and handle are dropped).
        Outcome::GoAway { .. } => {}
        Outcome::Shutdown => relay_link::close(&conn, codes::NORMAL, "hub shutting down"),
        Outcome::Refused { .. } => relay_link::close(&conn, codes::NORMAL, "registration refused"),
        Outcome::Busy => {}
        Outcome::Lost { .. } => relay_link::close(&conn, codes::NORMAL, "tunnel considered dead"),
    }
    outcome
}

/// Registers on `conn` and serves it until something ends the tunnel.
async fn serve(shared: &Arc<Shared>, tunnel: &Arc<Tunnel>, conn: &Connection) -> Outcome {
    let config = &shared.config;
    // Subscribe before taking the snapshot, so a change in between is published afterwards.
    let mut apps_changed = shared.apps.subscribe();
    apps_changed.mark_unchanged();
    let mut pairing_changed = shared.pairing_open.subscribe();
    pairing_changed.mark_unchanged();
    let (mut ctl_send, ctl_recv) = match conn.open_bi().await {
        Ok(streams) => streams,
        Err(e) => return from_connection_error(false, e),
    };
    let register = Frame::Register {
        name: config.name.clone(),
        allowed_apps: published_apps(&shared.apps),
        pairing_open: *shared.pairing_open.borrow(),
    };
    if let Err(e) = write_frame(&mut ctl_send, &register).await {
        return frame_error(conn, false, "sending Register", e);
    }
    let mut control = FrameReader::new(ctl_recv);
    let reply = match tokio::time::timeout(config.connect_timeout, control.read_frame()).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return frame_error(conn, false, "waiting for Registered", e),
        Err(_) => return Outcome::lost(false, "the relay did not answer Register in time"),
    };
    match reply {
        Frame::Registered { replaced } => {
            shared.stats.registrations.fetch_add(1, Ordering::Relaxed);
            tunnel.registrations.fetch_add(1, Ordering::Relaxed);
            shared.set_status(tunnel, TunnelStatus::Registered);
            tracing::info!(name = %config.name, replaced, relay = %tunnel.target.addr, "registered with the relay");
        }
        Frame::Refused { reason, message } => return Outcome::Refused { reason, message },
        other => {
            return Outcome::lost(false, format!("expected Registered or Refused, got {}", other.name()))
        }
    }

    let interval = config.ping_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = Liveness::new(rand::random());
    let relay_suspect = tunnel.paths.relay_suspect();

    loop {
        tokio::select! {
            // The relay answered nothing for a second while channel data went out (a NAT that
            // rebound the socket): a `Ping` now shows the relay where this hub is, so channels
            // flow again without waiting for the next keep-alive. Its `Pong` matches no ping in
            // flight and is ignored.
            () = relay_suspect.notified() => {
                tracing::debug!("the relay answered nothing for a second while data went out; pinging it");
                if let Err(e) = write_frame(&mut ctl_send, &Frame::Ping { nonce: rand::random() }).await {
                    return frame_error(conn, true, "sending Ping", e);
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(crate::channel::handle_stream(shared.clone(), tunnel.clone(), send, recv).in_current_span());
                }
                Err(e) => return from_connection_error(true, e),
            },
            // Cancel-safe: a frame half read when another branch wins stays in `control`.
            frame = control.read_frame() => match frame {
                Ok(Frame::Pong { nonce }) => liveness.pong(nonce),
                Ok(Frame::Ping { nonce: n }) => {
                    if let Err(e) = write_frame(&mut ctl_send, &Frame::Pong { nonce: n }).await {
                        return frame_error(conn, true, "answering Ping", e);
                    }
                }
                Ok(Frame::GoAway { retry_after_ms, message }) => {
                    return Outcome::GoAway { hint: Duration::from_millis(retry_after_ms.into()), message };
                }
                Ok(Frame::Refused { reason, message }) => {
                    // A relay may revoke a registration (e.g. authorized_hubs changed).
                    shared.set_status(tunnel, TunnelStatus::Refused { reason, message: message.clone() });
                    return Outcome::Refused { reason, message };
                }
                Ok(other) => {
                    relay_link::close(conn, codes::PROTOCOL, "unexpected frame on the control stream");
                    return Outcome::lost(true, format!("unexpected {} on the control stream", other.name()));
                }
                Err(e) => return frame_error(conn, true, "control stream", e),
            },
            _ = ticker.tick() => {
                let Some(nonce) = liveness.tick() else {
                    return Outcome::lost(
                        true,
                        format!("no Pong within {}", humantime::format_duration(interval)),
                    );
                };
                if let Err(e) = write_frame(&mut ctl_send, &Frame::Ping { nonce }).await {
                    return frame_error(conn, true, "sending Ping", e);
                }
            }
            changed = async {
                tokio::select! {
                    c = apps_changed.changed() => c,
                    c = pairing_changed.changed() => c,
                }
            } => {
                if changed.is_err() {
                    return Outcome::lost(true, "apps watcher gone");
                }
                apps_changed.mark_unchanged();
                pairing_changed.mark_unchanged();
                let pairing_open = *shared.pairing_open.borrow();
                let frame = Frame::AllowList { allowed_apps: published_apps(&shared.apps), pairing_open };
                if let Err(e) = write_frame(&mut ctl_send, &frame).await {
                    return frame_error(conn, true, "publishing AllowList", e);
                }
                tracing::debug!("published the allow-list to the relay");
            }
        }
    }
}

/// The application-level liveness check of one registered tunnel: one `Ping` in flight at a
/// time, and a tick that finds it unanswered means the tunnel is dead. Pure (the ticker and
/// the stream stay in [`serve`]), so the rule is tested without a relay.
#[derive(Debug)]
struct Liveness {
    /// The nonce of the last `Ping` sent (a random start, so a stale `Pong` from an earlier
    /// connection cannot match).
    nonce: u64,
    /// The nonce of the `Ping` not yet answered, if any.
    outstanding: Option<u64>,
}

impl Liveness {
    fn new(start: u64) -> Self {
        Self { nonce: start, outstanding: None }
    }

    /// A `Pong` arrived: it answers the ping in flight if the nonce matches; any other is
    /// ignored.
    fn pong(&mut self, nonce: u64) {
        if self.outstanding == Some(nonce) {
            self.outstanding = None;
        }
    }

    /// The ping interval elapsed: the nonce of the next `Ping` to send, or `None` if the last
    /// one is still unanswered (the tunnel is dead).
    fn tick(&mut self) -> Option<u64> {
        if self.outstanding.is_some() {
            return None;
        }
        self.nonce = self.nonce.wrapping_add(1);
        self.outstanding = Some(self.nonce);
        Some(self.nonce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answered_ping_keeps_the_tunnel_alive_and_an_unanswered_one_ends_it() {
        let mut live = Liveness::new(u64::MAX);
        let first = live.tick().unwrap();
        assert_eq!(first, 0, "nonces wrap");
        live.pong(first);
        let second = live.tick().unwrap();
        assert_eq!(second, 1);
        live.pong(first);
        live.pong(second + 1);
        assert_eq!(live.tick(), None, "only the nonce in flight answers it");

        let mut live = Liveness::new(7);
        live.tick().unwrap();
        assert_eq!(live.tick(), None, "no Pong by the next tick");
    }
}
