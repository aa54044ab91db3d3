//! The channel's control flow at the relay over real QUIC on loopback, spoken to with raw quinn
//! peers (no hub connector, no client library): `ChannelOpen` is announced to the hub with the
//! hub's channel id, answered with the app's, and the two channel streams then live exactly as
//! long as the channel. (The refusals in protocol order are in `protocol.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use keyway_proto::channel::ChannelId;
use quinn::ReadError;

/// The hub side of a channel announce: the stream and what the relay announced.
struct Announced {
    send: SendStream,
    recv: RecvStream,
    app_key: PublicKey,
    observed: SocketAddr,
    purpose: SessionPurpose,
    channel: ChannelId,
}

async fn hub_gets_announce(hub: &Connection) -> Announced {
    let (send, mut recv) = within("hub gets a stream", hub.accept_bi()).await.unwrap();
    let frame = within("announce", read_frame(&mut recv)).await.unwrap();
    let Frame::ChannelAnnounce { app_key, observed, purpose, channel } = frame else {
        panic!("expected ChannelAnnounce, got {frame:?}")
    };
    Announced { send, recv, app_key, observed, purpose, channel }
}

/// A ready channel: both channel streams and both ids.
struct Ready {
    app: (SendStream, RecvStream),
    hub: Announced,
    app_id: ChannelId,
}

async fn ready_channel(app_conn: &Connection, hub_conn: &Connection, hub_key: PublicKey) -> Ready {
    let (app_send, mut app_recv) = open_session(app_conn, "home", hub_key, SessionPurpose::Connect).await;
    let mut hub = hub_gets_announce(hub_conn).await;
    write_frame(&mut hub.send, &Frame::ChannelAccepted).await.unwrap();
    let Frame::ChannelReady { channel: app_id } = within("ready", read_frame(&mut app_recv)).await.unwrap()
    else {
        panic!("expected ChannelReady")
    };
    Ready { app: (app_send, app_recv), hub, app_id }
}

/// The code the relay reset `recv` with.
async fn reset_code(recv: &mut RecvStream) -> u64 {
    match within("stream reset", recv.read_to_end(1024)).await {
        Err(quinn::ReadToEndError::Read(ReadError::Reset(code))) => code.into_inner(),
        other => panic!("expected a reset, got {other:?}"),
    }
}

fn series(relay: &RelayHandle, series: &str) -> f64 {
    keyway_test_support::http::series(&relay.stats().encode(), series).unwrap_or_else(|| panic!("{series}"))
}

#[tokio::test]
async fn a_channel_is_announced_with_the_hubs_id_and_ready_with_the_apps() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let (app_conn, app_addr) = connect_from(&relay.handle, &app).await;

    let Ready { app: (mut app_send, mut app_recv), hub: mut announced, app_id } =
        ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    assert_eq!(announced.app_key, app.public_key());
    assert_eq!(announced.observed, app_addr);
    assert_eq!(announced.purpose, SessionPurpose::Connect);
    assert_ne!(app_id, announced.channel, "each side has its own id");
    let stats = relay.handle.stats();
    assert_eq!((stats.channels_active(), stats.sessions_opened()), (1, 1));

    // Nothing more is said on the streams while the channel lives; the app finishing its
    // stream ends the channel, and the hub hears of it as a reset with NORMAL.
    app_send.finish().unwrap();
    assert_eq!(reset_code(&mut announced.recv).await, codes::NORMAL.into_inner());
    assert_eq!(reset_code(&mut app_recv).await, codes::NORMAL.into_inner());
    eventually("channel gone", || async { (stats.channels_active() == 0).then_some(()) }).await;
    assert_eq!(series(&relay.handle, "keyway_relay_channels_active"), 0.0);
}

#[tokio::test]
async fn the_hubs_refusal_is_passed_on_verbatim_and_nothing_is_listed() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;

    let (_send, mut recv) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let mut announced = hub_gets_announce(&hub_conn).await;
    let refusal = Frame::refused(RefusalReason::OverLimit, "this app has 8 connections, its cap");
    write_frame(&mut announced.send, &refusal).await.unwrap();
    let (reason, message) = refusal_of(&mut recv).await;
    assert_eq!((reason, message.as_str()), (RefusalReason::OverLimit, "this app has 8 connections, its cap"));
    let stats = relay.handle.stats();
    assert_eq!((stats.channels_active(), stats.refusals(RefusalReason::OverLimit)), (0, 1));

    // An answer that is neither acceptance nor refusal is the hub's protocol violation.
    let (_send, mut recv) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let mut announced = hub_gets_announce(&hub_conn).await;
    write_frame(&mut announced.send, &Frame::StreamAccepted).await.unwrap();
    let (reason, message) = refusal_of(&mut recv).await;
    assert_eq!(reason, RefusalReason::ProtocolViolation, "{message}");
    assert!(message.contains("StreamAccepted"), "{message}");
    assert_eq!(reset_code(&mut announced.recv).await, codes::PROTOCOL.into_inner());
}

#[tokio::test]
async fn channels_count_against_max_sessions_per_hub_and_an_ended_one_frees_its_place() {
    let (hub, app) = (identity(), identity());
    let limits = Limits { max_sessions_per_hub: 2, ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;

    let first = ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    let (_s, mut session) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let _second = hub_accepts(&hub_conn).await;
    assert!(matches!(
        within("accepted", read_frame(&mut session)).await.unwrap(),
        Frame::ChannelReady { .. }
    ));

    let (_send, mut recv) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (reason, message) = refusal_of(&mut recv).await;
    assert_eq!(reason, RefusalReason::OverLimit, "{message}");
    assert!(message.contains("max_sessions_per_hub"), "{message}");
    assert_eq!(relay.handle.stats().limit_hits(keyway_relay::LimitKind::MaxSessionsPerHub), 1);

    // A channel that ends frees its place.
    let Ready { app: (mut first_send, _first_recv), .. } = first;
    first_send.finish().unwrap();
    let stats = relay.handle.stats();
    eventually("first channel gone", || async { (stats.channels_active() == 1).then_some(()) }).await;
    let again = ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    assert_ne!(again.app_id, ChannelId::new(0));
}

#[tokio::test]
async fn revoking_the_app_key_ends_its_channel_with_revoked_on_both_streams() {
    let (hub, app, other) = (identity(), identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (hub_conn, mut control) =
        registered_hub(&relay.handle, &hub, "home", &[app.public_key(), other.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;
    let other_conn = connect(&relay.handle, &other).await;
    let Ready { app: (_app_send, mut app_recv), hub: mut announced, .. } =
        ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    // (Every stream stays bound: a dropped stream is a finished or stopped one.)
    let Ready { hub: mut kept, app: _other_app, .. } =
        ready_channel(&other_conn, &hub_conn, hub.public_key()).await;

    let update = Frame::AllowList { allowed_apps: vec![other.public_key()], pairing_open: false };
    write_frame(&mut control.send, &update).await.unwrap();
    assert_eq!(reset_code(&mut app_recv).await, codes::REVOKED.into_inner());
    assert_eq!(reset_code(&mut announced.recv).await, codes::REVOKED.into_inner());
    let stats = relay.handle.stats();
    eventually("one channel left", || async { (stats.channels_active() == 1).then_some(()) }).await;
    // The other app's channel is untouched: its stream is still open.
    let still_open = tokio::time::timeout(Duration::from_millis(200), kept.recv.read(&mut [0u8; 1])).await;
    assert!(still_open.is_err(), "the kept channel's stream ended: {still_open:?}");
}

#[tokio::test]
async fn a_hub_that_goes_away_or_is_replaced_ends_its_channels() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let app_conn = connect(&relay.handle, &app).await;

    // The hub's connection closes: the app's channel stream is reset with NORMAL.
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    // (Every stream stays bound: a dropped stream is a finished or stopped one.)
    let Ready { app: (_s, mut app_recv), hub: _announced, .. } =
        ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    hub_conn.close(codes::NORMAL, b"bye");
    assert_eq!(reset_code(&mut app_recv).await, codes::NORMAL.into_inner());

    // A newer connection of the hub takes the name: REPLACED.
    let (old, _old_control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let Ready { app: (_s, mut app_recv), hub: _announced, .. } =
        ready_channel(&app_conn, &old, hub.public_key()).await;
    let new = connect(&relay.handle, &hub).await;
    let (_new_control, answer) = register(&new, "home", &[app.public_key()], false).await;
    assert_eq!(answer, Frame::Registered { replaced: true });
    assert_eq!(reset_code(&mut app_recv).await, codes::REPLACED.into_inner());
    let stats = relay.handle.stats();
    eventually("no channel left", || async { (stats.channels_active() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn a_channel_that_moves_nothing_is_cut_with_limit() {
    let (hub, app) = (identity(), identity());
    let limits = Limits { idle_session_timeout: Duration::from_millis(300), ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;
    let Ready { app: (_s, mut app_recv), hub: mut announced, .. } =
        ready_channel(&app_conn, &hub_conn, hub.public_key()).await;
    assert_eq!(reset_code(&mut app_recv).await, codes::LIMIT.into_inner());
    assert_eq!(reset_code(&mut announced.recv).await, codes::LIMIT.into_inner());
    assert_eq!(relay.handle.stats().limit_hits(keyway_relay::LimitKind::IdleSessionTimeout), 1);
}
