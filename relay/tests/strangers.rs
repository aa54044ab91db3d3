//! What keys nobody vouches for may hold (issue 12): a connection that carries nothing
//! authorized is closed after `unauthorized_grace` with the `LIMIT` code and a reason, the
//! connections not yet authorized are capped in total (strangers only: known keys still pass),
//! and idle app connections count against the hub that lists them. Real QUIC on loopback with
//! raw peers; the grace is short so the tests are quick, and nothing asserts on elapsed time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use keyway_relay::{CutReason, LimitKind};

/// Limits with a short grace and `cap` connections not yet authorized; the per-source rate is
/// off, since every peer of a test comes from 127.0.0.1.
fn limits(grace_ms: u64, cap: u32, idle_apps: u32) -> Limits {
    Limits {
        unauthorized_grace: Duration::from_millis(grace_ms),
        max_unauthorized_connections: cap,
        max_idle_apps_per_hub: idle_apps,
        new_connections_per_ip: 0.0,
        ..Limits::default()
    }
}

/// Waits for `conn` to be closed by the relay: the application close code and reason.
async fn closed_by_relay(conn: &Connection) -> (quinn::VarInt, String) {
    match within("the relay closes the connection", conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            (close.error_code, String::from_utf8_lossy(&close.reason).into_owned())
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    eventually(what, || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_stranger_is_cut_after_the_grace_while_hubs_and_their_apps_stay() {
    let (hub, app, idle_app) = (identity(), identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], limits(300, 100, 8)).await;
    let h = &relay.handle;
    let (hub_conn, mut control) =
        registered_hub(h, &hub, "home", &[app.public_key(), idle_app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (mut s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (mut hub_send, mut hub_recv, _, _) = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r)).await.unwrap(), Frame::ChannelReady { .. }));
    let idle_conn = connect(h, &idle_app).await;

    let stranger = connect(h, &identity()).await;
    let (code, reason) = closed_by_relay(&stranger).await;
    assert_eq!(code, codes::LIMIT);
    assert!(reason.contains("unauthorized_grace"), "{reason}");
    assert_eq!(h.stats().unauthorized_closed(CutReason::Stranger), 1);

    // A second stranger, connected later, is cut too; by then everyone else was reviewed at
    // least once, and stays: the hub (registered), the app (a live session), the idle app
    // (its hub lists it).
    let later = connect(h, &identity()).await;
    assert_eq!(closed_by_relay(&later).await.0, codes::LIMIT);
    for (who, conn) in [("hub", &hub_conn), ("app", &app_conn), ("idle app", &idle_conn)] {
        assert!(conn.close_reason().is_none(), "the {who}'s connection was closed");
    }
    assert_eq!(h.stats().idle_app_connections(), 1);
    assert_eq!(h.stats().unauthorized_closed(CutReason::IdleOverHubBudget), 0);
    // The channel is still listed (its datagrams are forwarded in forwarding.rs's tests).
    assert_eq!(h.stats().channels_active(), 1);
    let _held = (&mut s, &mut r, &mut hub_send, &mut hub_recv);
    let stats = h.stats();
    wait_for("the strangers to leave the gauges", || {
        stats.connections_active() == 3 && stats.connections_unauthorized() == 0
    })
    .await;

    // Revoking the idle app's key ends its standing: its next review cuts it.
    let allow = Frame::AllowList { allowed_apps: vec![app.public_key()], pairing_open: false };
    write_frame(&mut control.send, &allow).await.unwrap();
    let (code, reason) = closed_by_relay(&idle_conn).await;
    assert_eq!(code, codes::LIMIT);
    assert!(reason.contains("no registered hub lists it"), "{reason}");
    assert_eq!(h.stats().idle_app_connections(), 0);
}

#[tokio::test]
async fn the_unauthorized_cap_refuses_the_next_stranger_but_never_a_known_key() {
    let (hub, app) = (identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], limits(60_000, 2, 8)).await;
    let h = &relay.handle;
    let _s1 = connect(h, &identity()).await;
    let _s2 = connect(h, &identity()).await;
    let stats = h.stats();
    wait_for("two strangers counted", || stats.connections_unauthorized() == 2).await;
    // The third stranger completes its handshake and is closed at once, with the reason.
    let third = connect(h, &identity()).await;
    let (code, reason) = closed_by_relay(&third).await;
    assert_eq!(code, codes::LIMIT);
    assert!(reason.contains("max_unauthorized_connections"), "{reason}");
    assert_eq!(h.stats().limit_hits(LimitKind::MaxUnauthorizedConnections), 1);

    // At the cap, a hub key the relay lists still connects and registers, and an app its
    // allow-list holds is still served.
    let (hub_conn, _control) = registered_hub(h, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (_s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let _hub_side = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r)).await.unwrap(), Frame::ChannelReady { .. }));
    assert_eq!(h.stats().connections_unauthorized(), 2, "known keys are never counted at the cap");
    assert_eq!(h.stats().limit_hits(LimitKind::MaxUnauthorizedConnections), 1);
    // Lifting the cap at run time lets strangers in again (until their grace).
    h.set_limits(limits(60_000, 0, 8)).unwrap();
    let fourth = connect(h, &identity()).await;
    wait_for("the fourth stranger counted", || stats.connections_unauthorized() == 3).await;
    assert!(fourth.close_reason().is_none());
}

#[tokio::test]
async fn idle_app_connections_count_against_the_hub_that_lists_them() {
    let hub = identity();
    let apps: Vec<Identity> = (0..4).map(|_| identity()).collect();
    let keys: Vec<PublicKey> = apps.iter().map(Identity::public_key).collect();
    let relay = relay_with(&[("home", hub.public_key())], limits(300, 100, 2)).await;
    let h = &relay.handle;
    let (_hub_conn, _control) = registered_hub(h, &hub, "home", &keys).await;
    let mut conns = Vec::new();
    for app in &apps {
        conns.push(connect(h, app).await);
    }
    // Four listed, idle apps and a budget of two: two are cut at their review.
    let stats = h.stats();
    wait_for("two idle apps cut", || stats.unauthorized_closed(CutReason::IdleOverHubBudget) == 2).await;
    let mut cut = 0;
    for conn in &conns {
        if conn.close_reason().is_some() {
            let (code, reason) = closed_by_relay(conn).await;
            assert_eq!(code, codes::LIMIT);
            assert!(reason.contains("max_idle_apps_per_hub"), "{reason}");
            cut += 1;
        }
    }
    assert_eq!(cut, 2);
    assert_eq!(h.stats().idle_app_connections(), 2);
    assert_eq!(h.stats().unauthorized_closed(CutReason::Stranger), 0);
}

#[tokio::test]
async fn pairing_sessions_and_channels_keep_a_connection_that_no_hub_lists_while_they_live() {
    let (hub, pairer, channel_app) = (identity(), identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], limits(300, 100, 8)).await;
    let h = &relay.handle;
    // A hub with an empty allow-list and an open pairing window.
    let hub_conn = connect(h, &hub).await;
    let (_control, answer) = register(&hub_conn, "home", &[], true).await;
    assert_eq!(answer, Frame::Registered { replaced: false });

    // A v1 pairing session from a key no hub lists...
    let pairer_conn = connect(h, &pairer).await;
    let (s, mut r) = open_session(&pairer_conn, "home", hub.public_key(), SessionPurpose::Pair).await;
    let hub_side = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r)).await.unwrap(), Frame::ChannelReady { .. }));
    // ...and a v2 pairing channel from another.
    let channel_conn = connect(h, &channel_app).await;
    let (mut channel_send, mut channel_recv) = channel_conn.open_bi().await.unwrap();
    let open = Frame::ChannelOpen {
        hub: name("home"),
        hub_key: hub.public_key(),
        purpose: SessionPurpose::Pair,
        channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
    };
    write_frame(&mut channel_send, &open).await.unwrap();
    let (mut announce_send, mut announce_recv) = within("announce", hub_conn.accept_bi()).await.unwrap();
    let announce = within("announce frame", read_frame(&mut announce_recv)).await.unwrap();
    assert!(matches!(announce, Frame::ChannelAnnounce { .. }), "{announce:?}");
    write_frame(&mut announce_send, &Frame::ChannelAccepted).await.unwrap();
    let ready = within("ready", read_frame(&mut channel_recv)).await.unwrap();
    assert!(matches!(ready, Frame::ChannelReady { .. }), "{ready:?}");

    // A stranger connected now is cut at its review; the two, reviewed meanwhile, stay.
    let stranger = connect(h, &identity()).await;
    assert_eq!(closed_by_relay(&stranger).await.0, codes::LIMIT);
    assert!(pairer_conn.close_reason().is_none(), "a live pairing session keeps its connection");
    assert!(channel_conn.close_reason().is_none(), "a live pairing channel keeps its connection");

    // The pairing ends and the hub does not add the key: the connection goes at a review.
    drop((s, r, hub_side));
    let (code, reason) = closed_by_relay(&pairer_conn).await;
    assert_eq!(code, codes::LIMIT);
    assert!(reason.contains("no registered hub lists it"), "{reason}");
    assert!(channel_conn.close_reason().is_none(), "the channel still lives");
    assert_eq!(h.stats().unauthorized_closed(CutReason::Stranger), 2);
}
