//! One session announced by the relay: authorize, reach the local service, end-to-end TLS,
//! then bridge bytes.
//!
//! The hub trusts nothing the relay says beyond "this app key authenticated to me": it checks
//! the announced key against its *current* allow-list before answering, and after the TLS
//! handshake checks again that the key the app proved is the announced one and is still
//! authorized (a resumed TLS session skips the verifier, so the verifier alone is not enough).
//! Live sessions are tracked per app key in a [`SessionRegistry`] so that removing a key from
//! `authorized_apps` cuts them at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyway_client::relay_link::codes;
use keyway_client::session::QuicBiStream;
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::{Frame, PublicKey, RefusalReason, SessionPurpose};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::tunnel::Shared;

/// How long the relay has to send `SessionAnnounce` on a stream it opened.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the app has to complete the end-to-end TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Live sessions by app key, each with a handle that cuts it.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    next_id: AtomicU64,
    live: Mutex<HashMap<PublicKey, HashMap<u64, Arc<Notify>>>>,
}

/// Membership of one session in the registry; leaves it on drop.
#[derive(Debug)]
pub struct SessionGuard {
    registry: Arc<SessionRegistry>,
    key: PublicKey,
    id: u64,
    cut: Arc<Notify>,
}

impl SessionGuard {
    /// Completes when the session must be cut (its key was revoked, or the hub stops).
    /// `Notify::notify_one` stores a permit, so a cut that happens before anyone waits is not lost.
    pub async fn cut(&self) {
        self.cut.notified().await
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.registry.live.lock() {
            if let Some(sessions) = live.get_mut(&self.key) {
                sessions.remove(&self.id);
                if sessions.is_empty() {
                    live.remove(&self.key);
                }
            }
        }
    }
}

impl SessionRegistry {
    /// Registers a session of `key`.
    pub fn register(self: &Arc<Self>, key: PublicKey) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(Notify::new());
        if let Ok(mut live) = self.live.lock() {
            live.entry(key).or_default().insert(id, cut.clone());
        }
        SessionGuard { registry: self.clone(), key, id, cut }
    }

    /// Cuts every live session of the given keys; returns how many were cut.
    pub fn revoke(&self, keys: &[PublicKey]) -> usize {
        let Ok(live) = self.live.lock() else { return 0 };
        let mut n = 0;
        for key in keys {
            for cut in live.get(key).into_iter().flat_map(|s| s.values()) {
                cut.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Cuts every live session (hub shutdown).
    pub fn cut_all(&self) -> usize {
        let keys: Vec<PublicKey> = self.live.lock().map(|l| l.keys().copied().collect()).unwrap_or_default();
        self.revoke(&keys)
    }

    /// Number of live sessions of `key`.
    pub fn count(&self, key: &PublicKey) -> usize {
        self.live.lock().map(|l| l.get(key).map_or(0, HashMap::len)).unwrap_or(0)
    }
}

/// Counts a session as active for as long as it lives.
struct Active(Arc<crate::HubStats>);

impl Active {
    fn new(stats: Arc<crate::HubStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn abort(send: &mut SendStream, recv: &mut RecvStream, code: VarInt) {
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Handles one stream the relay opened on the tunnel. Never panics on what it reads.
pub(crate) async fn handle(shared: Arc<Shared>, mut send: SendStream, mut recv: RecvStream) {
    let announce = match tokio::time::timeout(ANNOUNCE_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "session stream without a valid announce");
            abort(&mut send, &mut recv, codes::PROTOCOL);
            return;
        }
        Err(_) => {
            tracing::debug!("no SessionAnnounce in time");
            abort(&mut send, &mut recv, codes::PROTOCOL);
            return;
        }
    };
    let Frame::SessionAnnounce { app_key, observed, purpose } = announce else {
        tracing::warn!(frame = announce.name(), "relay opened a stream without SessionAnnounce");
        let _ = write_frame(
            &mut send,
            &Frame::refused(RefusalReason::ProtocolViolation, "expected SessionAnnounce"),
        )
        .await;
        let _ = send.finish();
        return;
    };
    shared.stats.announced.fetch_add(1, Ordering::Relaxed);
    let label = shared.apps.label(&app_key);
    let span = tracing::info_span!("session", app = %app_key.fingerprint(), label = %label, %observed);
    run(shared, send, recv, app_key, purpose).instrument(span).await
}

async fn refuse(shared: &Shared, send: &mut SendStream, reason: RefusalReason, message: String) {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%reason, %message, "session refused");
    let _ = write_frame(send, &Frame::refused(reason, message)).await;
    let _ = send.finish();
}

async fn run(
    shared: Arc<Shared>,
    mut send: SendStream,
    recv: RecvStream,
    app_key: PublicKey,
    purpose: SessionPurpose,
) {
    if purpose == SessionPurpose::Pair {
        let msg = format!("hub {}'s pairing window is not open", shared.config.name);
        return refuse(&shared, &mut send, RefusalReason::PairingClosed, msg).await;
    }
    if !shared.apps.contains(&app_key) {
        let msg = format!(
            "app key {} is not in hub {}'s authorized_apps",
            app_key.fingerprint(),
            shared.config.name
        );
        return refuse(&shared, &mut send, RefusalReason::AppNotAuthorized, msg).await;
    }
    let forward = shared.config.forward;
    let mut tcp = match tokio::time::timeout(shared.config.service_timeout, TcpStream::connect(forward)).await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(%forward, error = %e, "local service unreachable");
            let msg = format!("hub {} cannot reach its local service", shared.config.name);
            return refuse(&shared, &mut send, RefusalReason::ServiceUnavailable, msg).await;
        }
        Err(_) => {
            tracing::warn!(%forward, "local service did not accept the connection in time");
            let msg = format!("hub {}'s local service did not answer in time", shared.config.name);
            return refuse(&shared, &mut send, RefusalReason::ServiceUnavailable, msg).await;
        }
    };
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    // Registered before SessionAccepted goes out, so a revocation from here on is never missed.
    let guard = shared.sessions.register(app_key);
    if let Err(e) = write_frame(&mut send, &Frame::SessionAccepted).await {
        tracing::debug!(error = %e, "could not accept the session");
        return;
    }
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let _active = Active::new(shared.stats.clone());
    tracing::info!("session accepted");

    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    let mut tls = tokio::select! {
        _ = guard.cut() => {
            tracing::info!("session cut during the handshake (key revoked or hub stopping)");
            return;
        }
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(QuicBiStream { send, recv })) => {
            match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "end-to-end TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!("end-to-end TLS handshake timed out");
                    return;
                }
            }
        }
    };
    // Re-check after every handshake: a resumed session skipped the verifier, and the key
    // proven here must be the one the relay announced (and authorized at the relay).
    let proven =
        keyway_proto::tls::peer_key_from_certs(tls.get_ref().1.peer_certificates().unwrap_or_default());
    if proven != Some(app_key) || !shared.apps.contains(&app_key) {
        tracing::warn!(
            proven = ?proven.map(|k| k.fingerprint()),
            "end-to-end key is not the announced, authorized key; closing"
        );
        let io = tls.get_mut().0;
        abort(&mut io.send, &mut io.recv, codes::REVOKED);
        return;
    }
    tracing::info!("session open");
    tokio::select! {
        _ = guard.cut() => {
            let io = tls.get_mut().0;
            abort(&mut io.send, &mut io.recv, codes::REVOKED);
            tracing::info!("session cut: app key revoked or hub stopping");
        }
        copied = tokio::io::copy_bidirectional(&mut tls, &mut tcp) => match copied {
            Ok((from_app, to_app)) => tracing::info!(from_app, to_app, "session closed"),
            Err(e) => tracing::info!(error = %e, "session ended with an error"),
        }
    }
}
