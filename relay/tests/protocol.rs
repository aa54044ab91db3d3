//! The relay over real QUIC on loopback, spoken to with a raw quinn client built from
//! `keyway_proto` (no hub connector, no client library): every frame is visible here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn closed_policy_registers_listed_hubs_only() {
    let (hub, thief) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let stats = relay.handle.stats();

    let (_conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[]).await;
    ping(&mut control, 42).await;
    assert_eq!((stats.registrations(), stats.hubs_connected()), (1, 1));

    let conn = connect(&relay.handle, &thief).await;
    let (_c, answer) = register(&conn, "home", &[], false).await;
    let Frame::Refused { reason, message } = answer else { panic!("{answer:?}") };
    assert_eq!(reason, RefusalReason::NameClaimed);
    assert!(message.contains(&thief.public_key().fingerprint()), "{message}");

    let conn = connect(&relay.handle, &hub).await;
    let (_c, answer) = register(&conn, "office", &[], false).await;
    assert!(matches!(answer, Frame::Refused { reason: RefusalReason::NameNotAuthorized, .. }), "{answer:?}");

    assert_eq!(stats.refusals(RefusalReason::NameClaimed), 1);
    assert_eq!(stats.refusals(RefusalReason::NameNotAuthorized), 1);
    assert_eq!(stats.hubs_connected(), 1);
}

#[tokio::test]
async fn open_policy_first_key_keeps_the_name_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bindings");
    let relay_id = identity();
    let (first, second) = (identity(), identity());
    let start = || {
        let policy = NamePolicy::Open { state_file: Some(state.clone()) };
        Relay::start(RelayConfig::new("127.0.0.1:0".parse().unwrap(), relay_id.duplicate(), policy))
    };
    let relay = start().await.unwrap();
    let (conn, _control) = registered_hub(&relay, &first, "cabin", &[]).await;
    let other = connect(&relay, &second).await;
    let (_c, answer) = register(&other, "cabin", &[], false).await;
    assert!(matches!(answer, Frame::Refused { reason: RefusalReason::NameClaimed, .. }), "{answer:?}");
    // A different free name is the second key's for the taking.
    let (_c2, answer) = register(&connect(&relay, &second).await, "lake", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    drop(conn);
    relay.shutdown().await;

    let relay = start().await.unwrap();
    let (_c, answer) = register(&connect(&relay, &second).await, "cabin", &[], false).await;
    assert!(matches!(answer, Frame::Refused { reason: RefusalReason::NameClaimed, .. }), "{answer:?}");
    let (_conn, _control) = registered_hub(&relay, &first, "cabin", &[]).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_newer_connection_replaces_the_old_one_at_once() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (old, _old_control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;

    let new = connect(&relay.handle, &hub).await;
    let (_new_control, answer) = register(&new, "home", &[app.public_key()], false).await;
    assert_eq!(answer, Frame::Registered { replaced: true });
    assert_eq!(app_code(within("old closed", old.closed()).await), Some(codes::REPLACED.into_inner()));
    let stats = relay.handle.stats();
    assert_eq!((stats.registrations(), stats.replacements(), stats.hubs_connected()), (2, 1, 1));

    // Sessions now reach the new connection, whatever the old one's clean-up does.
    let app_conn = connect(&relay.handle, &app).await;
    let (_s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (_hs, _hr, app_key, _) = hub_accepts(&new).await;
    assert_eq!(app_key, app.public_key());
    assert!(matches!(within("accepted", read_frame(&mut r)).await.unwrap(), Frame::ChannelReady { .. }));
}

#[tokio::test]
async fn session_refusals_are_typed_and_never_reach_the_hub() {
    let (hub, app, stranger, offline_hub) = (identity(), identity(), identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key()), ("away", offline_hub.public_key())]).await;
    let stats = relay.handle.stats();
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;

    let app_conn = connect(&relay.handle, &app).await;
    let stranger_conn = connect(&relay.handle, &stranger).await;
    let cases: Vec<(&Connection, &str, PublicKey, SessionPurpose, RefusalReason)> = vec![
        (&app_conn, "nowhere", hub.public_key(), SessionPurpose::Connect, RefusalReason::UnknownHub),
        (&app_conn, "home", stranger.public_key(), SessionPurpose::Connect, RefusalReason::HubKeyMismatch),
        (&app_conn, "away", offline_hub.public_key(), SessionPurpose::Connect, RefusalReason::HubOffline),
        (&stranger_conn, "home", hub.public_key(), SessionPurpose::Connect, RefusalReason::AppNotAuthorized),
        (&stranger_conn, "home", hub.public_key(), SessionPurpose::Pair, RefusalReason::PairingClosed),
    ];
    for (conn, hub_name, pinned, purpose, want) in cases {
        let (_send, mut recv) = open_session(conn, hub_name, pinned, purpose).await;
        let (reason, message) = refusal_of(&mut recv).await;
        assert_eq!(reason, want, "{message}");
        assert!(!message.is_empty());
        if want == RefusalReason::HubKeyMismatch {
            assert!(message.contains(&hub.public_key().fingerprint()), "{message}");
            assert!(message.contains(&stranger.public_key().fingerprint()), "{message}");
        }
        assert_eq!(stats.refusals(want), 1, "{want}");
    }
    assert_eq!(stats.sessions_opened(), 0);

    // The hub heard of none of them: the first stream it ever gets is the authorized app's.
    let (_send, mut recv) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (_hs, _hr, app_key, _) = hub_accepts(&hub_conn).await;
    assert_eq!(app_key, app.public_key());
    assert!(matches!(within("accepted", read_frame(&mut recv)).await.unwrap(), Frame::ChannelReady { .. }));
}

#[tokio::test]
async fn the_announce_names_the_app_key_and_the_address_the_relay_saw() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let stats = relay.handle.stats();
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let (app_conn, app_addr) = connect_from(&relay.handle, &app).await;

    let (_app_send, mut app_recv) =
        open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (_hub_send, _hub_recv, app_key, observed) = hub_accepts(&hub_conn).await;
    assert_eq!(app_key, app.public_key());
    // The app's address as the relay sees it (STUN-like), for the hub's logs and hole punching.
    assert_eq!(observed, app_addr);
    assert!(matches!(
        within("accepted", read_frame(&mut app_recv)).await.unwrap(),
        Frame::ChannelReady { .. }
    ));
    assert_eq!(stats.sessions_opened(), 1);
    assert_eq!(stats.channels_active(), 1);
}

#[tokio::test]
async fn the_hubs_refusal_reaches_the_app() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (hub_conn, _control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;
    let (_s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (mut hs, mut hr) = within("hub stream", hub_conn.accept_bi()).await.unwrap();
    assert!(matches!(read_frame(&mut hr).await.unwrap(), Frame::ChannelAnnounce { .. }));
    write_frame(&mut hs, &Frame::refused(RefusalReason::ServiceUnavailable, "nothing on port 8123"))
        .await
        .unwrap();
    assert_eq!(refusal_of(&mut r).await, (RefusalReason::ServiceUnavailable, "nothing on port 8123".into()));
    assert_eq!(relay.handle.stats().refusals(RefusalReason::ServiceUnavailable), 1);
}

#[tokio::test]
async fn malformed_frames_are_refused_and_the_relay_keeps_serving() {
    let (hub, app) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let stats = relay.handle.stats();
    let app_conn = connect(&relay.handle, &app).await;

    const V: u8 = keyway_proto::codec::PROTOCOL_VERSION;
    const OPEN: u8 = 11; // ChannelOpen
    let mut oversized = vec![V, OPEN];
    oversized.extend_from_slice(&(1u32 << 20).to_be_bytes());
    let cases: Vec<(Vec<u8>, RefusalReason, &str)> = vec![
        (vec![V, 99, 0, 0, 0, 0], RefusalReason::BadFrame, "unknown frame type 99"),
        (vec![7, OPEN, 0, 0, 0, 0], RefusalReason::UnsupportedVersion, "version 7"),
        // A peer of protocol version 1 (the spliced sessions) is told so.
        (vec![1, 5, 0, 0, 0, 0], RefusalReason::UnsupportedVersion, "version 1"),
        // Version 1's SessionOpen type is retired, never reassigned.
        (vec![V, 5, 0, 0, 0, 0], RefusalReason::BadFrame, "unknown frame type 5"),
        (oversized, RefusalReason::BadFrame, "exceeds"),
        // A ChannelOpen whose name is not a valid hub name.
        (
            [&[V, OPEN, 0, 0, 0, 3][..], &[2, b'A', b'B']].concat(),
            RefusalReason::BadFrame,
            "invalid hub name",
        ),
        // A frame that is valid but cannot open a stream.
        (Frame::Ping { nonce: 1 }.encode().unwrap(), RefusalReason::ProtocolViolation, "Ping"),
    ];
    for (bytes, want, text) in cases {
        let (mut send, mut recv) = app_conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let (reason, message) = refusal_of(&mut recv).await;
        assert_eq!(reason, want, "{message}");
        assert!(message.contains(text), "{message:?} should mention {text:?}");
    }
    assert_eq!(stats.refusals(RefusalReason::BadFrame), 4);
    assert_eq!(stats.refusals(RefusalReason::UnsupportedVersion), 2);
    assert_eq!(stats.refusals(RefusalReason::ProtocolViolation), 1);

    // Same connection, same relay: still served.
    let (_s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    assert_eq!(refusal_of(&mut r).await.0, RefusalReason::HubOffline);
    let (_hub_conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[]).await;
    ping(&mut control, 7).await;

    // A second Register on a hub's connection is a protocol violation; the first stays.
    let (_c, answer) = register(&_hub_conn, "home", &[], false).await;
    assert!(matches!(answer, Frame::Refused { reason: RefusalReason::ProtocolViolation, .. }), "{answer:?}");
    ping(&mut control, 8).await;
}

#[tokio::test]
async fn a_bad_frame_on_the_control_stream_ends_the_registration() {
    let hub = identity();
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[]).await;
    control.send.write_all(&[keyway_proto::codec::PROTOCOL_VERSION, 200, 0, 0, 0, 0]).await.unwrap();
    let (reason, message) = refusal_of(&mut control.recv).await;
    assert_eq!(reason, RefusalReason::BadFrame);
    assert!(message.contains("200"), "{message}");
    assert_eq!(app_code(within("closed", conn.closed()).await), Some(codes::PROTOCOL.into_inner()));
    let stats = relay.handle.stats();
    eventually("hub forgotten", || async { (stats.hubs_connected() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn reload_applies_authorized_hubs_changes_and_disconnects_removed_hubs() {
    let (hub, newcomer) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[]).await;

    // A broken file is reported with its line and changes nothing.
    std::fs::write(&relay.hubs_file, format!("office {}\nnot-a-line\n", newcomer.public_key())).unwrap();
    let err = relay.handle.reload().unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    ping(&mut control, 1).await;

    write_hubs(&relay.hubs_file, &[("office", newcomer.public_key())]);
    relay.handle.reload().unwrap();
    let (reason, message) = refusal_of(&mut control.recv).await;
    assert_eq!(reason, RefusalReason::NameNotAuthorized);
    assert!(message.contains("home"), "{message}");
    assert_eq!(app_code(within("disconnected", conn.closed()).await), Some(codes::REVOKED.into_inner()));
    assert_eq!(relay.handle.stats().hubs_connected(), 0);
    let (_c, _control) = registered_hub(&relay.handle, &newcomer, "office", &[]).await;

    let app = identity();
    let (_s, mut r) =
        open_session(&connect(&relay.handle, &app).await, "home", hub.public_key(), SessionPurpose::Connect)
            .await;
    assert_eq!(refusal_of(&mut r).await.0, RefusalReason::UnknownHub);
    drop(relay.dir);
}

#[tokio::test]
async fn a_changed_hubs_file_is_picked_up_without_reload() {
    let (hub, late) = (identity(), identity());
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    write_hubs(&relay.hubs_file, &[("home", hub.public_key()), ("late-comer", late.public_key())]);
    // The file is polled (no reload() call): keep trying until the new name is admitted.
    within("file change noticed", async {
        loop {
            let conn = connect(&relay.handle, &late).await;
            match register(&conn, "late-comer", &[], false).await.1 {
                Frame::Registered { replaced: false } => break,
                Frame::Refused { reason: RefusalReason::NameNotAuthorized, .. } => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn shutdown_sends_goaway_and_closes_connections() {
    let hub = identity();
    let relay = closed_relay(&[("home", hub.public_key())]).await;
    let (conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[]).await;
    let TestRelay { handle, dir: _dir, .. } = relay;
    let shutdown = tokio::spawn(handle.shutdown());
    match within("goaway", read_frame(&mut control.recv)).await.unwrap() {
        Frame::GoAway { retry_after_ms, message } => {
            assert!((1000..=2000).contains(&retry_after_ms), "{retry_after_ms}");
            assert!(!message.is_empty());
        }
        other => panic!("expected GoAway, got {other:?}"),
    }
    assert_eq!(app_code(within("closed", conn.closed()).await), Some(codes::SHUTTING_DOWN.into_inner()));
    within("shutdown completes", shutdown).await.unwrap();
}
