//! One session announced by the relay: authorize, reach the local service, end-to-end TLS,
//! then bridge bytes.
//!
//! The hub trusts nothing the relay says beyond "this app key authenticated to me": it checks
//! the announced key against its *current* allow-list before answering, and after the TLS
//! handshake checks again that the key the app proved is the announced one and is still
//! authorized (a resumed TLS session skips the verifier, so the verifier alone is not enough).
//! Pairing sessions (purpose `Pair`) take another path: no local service, a TLS
//! config that admits any app key, and the one-time secret checked inside the session.
//!
//! Live sessions are tracked per app key in the connector's session registry (each session
//! holds a guard that its key's revocation fires), so that removing a key from
//! `authorized_apps` cuts them at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyway_client::session::QuicBiStream;
use keyway_proto::codes;
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::{Frame, PublicKey, RefusalReason, SessionPurpose};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::state::{HubStats, Shared, Tunnel};

/// How long the relay has to send `SessionAnnounce` on a stream it opened.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the app has to complete the end-to-end TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Counts a session as active for as long as it lives.
struct Active(Arc<HubStats>);

impl Active {
    fn new(stats: Arc<HubStats>) -> Self {
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

/// Handles one stream the relay opened on the tunnel: a v1 session (`SessionAnnounce`) here, a
/// v2 channel (`ChannelAnnounce`) in [`crate::channel`]. Never panics on what it reads.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
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
    if let Frame::ChannelAnnounce { app_key, observed, purpose, channel } = announce {
        let label = shared.apps.label(&app_key);
        let span = tracing::info_span!("channel", app = %app_key.fingerprint(), label = %label, %observed);
        let announce = crate::channel::Announce { app_key, observed, purpose, id: channel };
        return crate::channel::handle(shared, tunnel, send, recv, announce).instrument(span).await;
    }
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
    if purpose == SessionPurpose::Pair {
        return pair(shared, send, recv, app_key).instrument(span).await;
    }
    run(shared, send, recv, app_key, observed).instrument(span).await
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
    observed: std::net::SocketAddr,
) {
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
    if let Err(e) = recheck(tls.get_ref().1, &app_key, &shared.apps.allow_list()) {
        tracing::warn!(error = %e, "closing the session");
        let io = tls.get_mut().0;
        abort(&mut io.send, &mut io.recv, codes::REVOKED);
        return;
    }
    if shared.config.proxy_protocol {
        let header = crate::proxy_protocol::header(observed, forward, Some(&app_key));
        if let Err(e) = tcp.write_all(&header).await {
            tracing::warn!(error = %e, "could not send the PROXY header to the local service");
            let io = tls.get_mut().0;
            abort(&mut io.send, &mut io.recv, codes::NORMAL);
            return;
        }
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

/// Why the post-handshake re-check refused a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecheckError {
    #[error("the end-to-end TLS session proved no app key")]
    NoKey,
    #[error("the app proved key {proven} but the relay announced {announced}")]
    NotAnnounced { proven: String, announced: String },
    #[error("app key {0} is no longer authorized ({1} handshake)")]
    Revoked(String, &'static str),
}

/// The re-check after every end-to-end handshake: the key the app proved must be the one the
/// relay announced and must be in the *current* allow-list. A resumed session skipped the
/// certificate verifier entirely, so without this a revoked app holding a ticket would get
/// back in (the relay refuses it first, but the hub does not rely on that).
pub fn recheck(
    tls: &rustls::ServerConnection,
    announced: &PublicKey,
    allow: &keyway_proto::tls::AllowList,
) -> Result<(), RecheckError> {
    let proven = keyway_proto::tls::peer_key_from_certs(tls.peer_certificates().unwrap_or_default())
        .ok_or(RecheckError::NoKey)?;
    if proven != *announced {
        return Err(RecheckError::NotAnnounced {
            proven: proven.fingerprint(),
            announced: announced.fingerprint(),
        });
    }
    if !allow.contains(&proven) {
        let kind = match tls.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        return Err(RecheckError::Revoked(proven.fingerprint(), kind));
    }
    Ok(())
}

/// How long the app has to send its pairing request once the handshake is done.
const PAIR_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A pairing session: the window must be open, then TLS (any app key; hub key pinned by the
/// app), then the app's secret is checked against the window and, if right, the proven key is
/// appended to `authorized_apps` and the window is closed. The secret is never logged.
async fn pair(shared: Arc<Shared>, mut send: SendStream, recv: RecvStream, app_key: PublicKey) {
    use keyway_proto::pairing::{read_request, write_answer, PairStatus};

    if !shared.refresh_pairing() {
        let msg = format!(
            "hub {} has no pairing window open (it expired, was used, or was never opened)",
            shared.config.name
        );
        return refuse(&shared, &mut send, RefusalReason::PairingClosed, msg).await;
    }
    if let Err(e) = write_frame(&mut send, &Frame::SessionAccepted).await {
        tracing::debug!(error = %e, "could not accept the pairing session");
        return;
    }
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.pair_tls.clone());
    let mut tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(QuicBiStream { send, recv })).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::info!(error = %e, "pairing: end-to-end TLS handshake failed"),
            Err(_) => return tracing::info!("pairing: end-to-end TLS handshake timed out"),
        };
    let proven =
        keyway_proto::tls::peer_key_from_certs(tls.get_ref().1.peer_certificates().unwrap_or_default());
    if proven != Some(app_key) {
        tracing::warn!("pairing: the end-to-end key is not the announced key; closing");
        let io = tls.get_mut().0;
        return abort(&mut io.send, &mut io.recv, codes::PROTOCOL);
    }
    let secret = match tokio::time::timeout(PAIR_REQUEST_TIMEOUT, read_request(&mut tls)).await {
        Ok(Ok(Some(secret))) => secret,
        Ok(Ok(None)) => {
            shared.stats.pairing_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("pairing: malformed request");
            let _ = write_answer(&mut tls, PairStatus::BadRequest, "malformed pairing request").await;
            let _ = tls.shutdown().await;
            return;
        }
        Ok(Err(e)) => return tracing::info!(error = %e, "pairing: no request"),
        Err(_) => return tracing::info!("pairing: no request in time"),
    };
    let (status, message) = consume_window(&shared, &app_key, &secret).await;
    let _ = write_answer(&mut tls, status, &message).await;
    let _ = tls.shutdown().await;
}

/// Checks `secret` against the open window and, if it matches, authorizes `app_key` and
/// closes the window. Serialized by `pair_lock` so one code pairs one app.
pub(crate) async fn consume_window(
    shared: &Shared,
    app_key: &PublicKey,
    secret: &[u8],
) -> (keyway_proto::pairing::PairStatus, String) {
    use keyway_proto::pairing::PairStatus;
    let _guard = shared.pair_lock.lock().await;
    let window = match crate::pairing::read_window(&shared.window_file) {
        Ok(Some(w)) if w.is_open() => w,
        Ok(_) => return (PairStatus::WindowClosed, "the pairing window is closed".into()),
        Err(e) => {
            tracing::warn!(error = %e, "pairing: cannot read the window");
            return (PairStatus::WindowClosed, "the pairing window is closed".into());
        }
    };
    if !window.matches(secret) {
        shared.stats.pairing_failures.fetch_add(1, Ordering::Relaxed);
        let failures = window.failures.saturating_add(1);
        tracing::warn!(failures, limit = crate::pairing::MAX_FAILURES, "pairing: wrong secret");
        let updated = crate::pairing::PairingWindow { failures, ..window };
        if let Err(e) = crate::pairing::write_window(&shared.window_file, &updated) {
            tracing::warn!(error = %e, "pairing: cannot record the failure; closing the window");
            let _ = crate::pairing::close_window(&shared.window_file);
        }
        shared.refresh_pairing();
        return (PairStatus::WrongSecret, "wrong pairing secret".into());
    }
    // Close first: if recording the key fails, the code is spent anyway (fail closed).
    if let Err(e) = crate::pairing::close_window(&shared.window_file) {
        tracing::error!(error = %e, "pairing: cannot close the window; refusing");
        return (PairStatus::Internal, "the hub could not close its pairing window".into());
    }
    let label = if window.label.is_empty() { "paired app".to_owned() } else { window.label.clone() };
    if let Err(e) = crate::apps::add_app(&shared.config.apps_file, app_key, &label) {
        tracing::error!(error = %e, "pairing: cannot add the app key");
        shared.refresh_pairing();
        return (PairStatus::Internal, "the hub could not record the app key".into());
    }
    // Apply now rather than at the next poll, so the app's first `connect` works at once.
    let _ = shared.reload_apps();
    shared.refresh_pairing();
    shared.stats.paired.fetch_add(1, Ordering::Relaxed);
    tracing::info!(app = %app_key.fingerprint(), %label, "app paired and authorized");
    (PairStatus::Paired, format!("paired as {label:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::tls::AllowList;
    use keyway_proto::Identity;
    use tokio::io::AsyncReadExt;

    /// One end-to-end handshake over an in-memory pipe with the hub's real server config;
    /// returns the server side's re-check verdict and whether the session was resumed.
    async fn session(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
        app: PublicKey,
        allow: &AllowList,
    ) -> (Result<(), RecheckError>, Option<rustls::HandshakeKind>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(keyway_proto::tls::server_name(), a)
                .await
                .unwrap();
            // Reading the hub's first byte also processes the session tickets sent with it.
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.unwrap();
        };
        let server = async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(b).await.unwrap();
            tls.write_all(b"x").await.unwrap();
            tls.flush().await.unwrap();
            (recheck(tls.get_ref().1, &app, allow), tls.get_ref().1.handshake_kind())
        };
        let ((), verdict) = tokio::join!(client, server);
        verdict
    }

    /// Defense in depth below the relay: a revoked app that resumes with a cached ticket
    /// skips the certificate verifier, and the post-handshake re-check still refuses it.
    #[tokio::test]
    async fn a_resumed_session_of_a_revoked_key_is_refused_by_the_recheck() {
        let hub = Identity::from_seed([1; 32]);
        let app = Identity::from_seed([2; 32]);
        let allow = AllowList::new([app.public_key()]);
        let server = Arc::new(
            keyway_proto::tls::server_config(&hub, Arc::new(allow.clone()), keyway_proto::ALPN_E2E).unwrap(),
        );
        // One client config per hub key, as `keyway_client::Client` caches it.
        let client = Arc::new(
            keyway_proto::tls::client_config(&app, hub.public_key(), keyway_proto::ALPN_E2E).unwrap().0,
        );

        let (verdict, kind) = session(client.clone(), server.clone(), app.public_key(), &allow).await;
        assert_eq!(verdict, Ok(()));
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        let (verdict, kind) = session(client.clone(), server.clone(), app.public_key(), &allow).await;
        assert_eq!(verdict, Ok(()));
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "the second session resumes");

        allow.replace([]);
        let (verdict, kind) = session(client.clone(), server.clone(), app.public_key(), &allow).await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "resumption skipped the verifier");
        assert!(matches!(verdict, Err(RecheckError::Revoked(_, "resumed"))), "{verdict:?}");

        // A key other than the announced one is refused even when authorized.
        let other = Identity::from_seed([3; 32]).public_key();
        allow.replace([app.public_key(), other]);
        let (verdict, _) = session(client, server, other, &allow).await;
        assert!(matches!(verdict, Err(RecheckError::NotAnnounced { .. })), "{verdict:?}");
    }
}
