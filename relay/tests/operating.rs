//! Operating the relay: metrics scraped over HTTP while real sessions run, every limit's
//! refusal and metric, run-time limit changes, and the drain on shutdown. Real QUIC on
//! loopback, spoken to with a raw quinn client; nothing asserts on elapsed time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::future::Future;
use std::time::Duration;

use common::*;
use keyway_relay::LimitKind;
use keyway_test_support::http::get as http_get_addr;

/// GETs `path` from the relay's metrics listener: (status code, body).
async fn http_get(relay: &RelayHandle, path: &str) -> (u16, String) {
    http_get_addr(relay.metrics_addr().expect("metrics listener up"), path).await
}

/// The value of one series (`name{labels}` exactly as exposed) in a scrape.
fn series(text: &str, series: &str) -> f64 {
    keyway_test_support::http::series(text, series).unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

async fn scrape(relay: &RelayHandle) -> String {
    let (status, body) = http_get(relay, "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn metrics_follow_a_real_session_live() {
    let (hub, app) = (identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], Limits::default()).await;
    let h = &relay.handle;
    assert_eq!(http_get(h, "/healthz").await.0, 200);
    assert_eq!(http_get(h, "/nope").await.0, 404);
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_hubs_connected"), 0.0);
    assert_eq!(series(&m, "keyway_relay_limit{limit=\"max_hubs\"}"), 1000.0);

    let (hub_conn, _control) = registered_hub(h, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (mut app_send, mut app_recv) =
        open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (mut hub_send, _hub_recv, _, _) = hub_accepts(&hub_conn).await;
    assert!(matches!(
        within("accepted", read_frame(&mut app_recv)).await.unwrap(),
        Frame::ChannelReady { .. }
    ));

    // During the channel: the gauges are up, the counters moved. (Forwarded datagrams and
    // bytes are counted in forwarding.rs, which runs real path sockets at both ends.)
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_hubs_connected"), 1.0);
    assert_eq!(series(&m, "keyway_relay_channels_active"), 1.0);
    assert_eq!(series(&m, "keyway_relay_connections_active"), 2.0);
    assert_eq!(series(&m, "keyway_relay_sessions_opened_total{result=\"accepted\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_handshakes_total{result=\"ok\",role=\"app\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_handshakes_total{result=\"ok\",role=\"hub\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_handshakes_total{result=\"ok\",role=\"quic\"}"), 2.0);
    assert_eq!(series(&m, "keyway_relay_session_setup_seconds_count"), 1.0);
    assert_eq!(series(&m, "keyway_relay_hub_registrations_total"), 1.0);
    assert_eq!(series(&m, "keyway_relay_hub_replacements_total"), 0.0);

    // A refusal is counted by reason and as a refused session.
    let (_s, mut r) = open_session(&app_conn, "nobody", hub.public_key(), SessionPurpose::Connect).await;
    assert_eq!(refusal_of(&mut r).await.0, RefusalReason::UnknownHub);

    // After the channel: its gauge goes back down, the counters stay.
    app_send.finish().unwrap();
    hub_send.finish().unwrap();
    let stats = h.stats();
    eventually("channel ends", || async { (stats.channels_active() == 0).then_some(()) }).await;
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_channels_active"), 0.0);
    assert_eq!(series(&m, "keyway_relay_sessions_opened_total{result=\"accepted\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_sessions_opened_total{result=\"refused\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_refusals_total{reason=\"unknown_hub\"}"), 1.0);
    hub_conn.close(0u32.into(), b"bye");
    eventually("hub gone", || async { (stats.hubs_connected() == 0).then_some(()) }).await;
    assert_eq!(series(&scrape(h).await, "keyway_relay_hubs_connected"), 0.0);
}

#[tokio::test]
async fn max_hubs_refuses_a_new_hub_but_not_a_reconnecting_one() {
    let (a, b) = (identity(), identity());
    let limits = Limits { max_hubs: 1, ..Limits::default() };
    let relay = relay_with(&[("a", a.public_key()), ("b", b.public_key())], limits).await;
    let h = &relay.handle;
    let (_a_conn, _a_control) = registered_hub(h, &a, "a", &[]).await;
    let (_control, answer) = register(&connect(h, &b).await, "b", &[], false).await;
    let Frame::Refused { reason, message } = answer else { panic!("{answer:?}") };
    assert_eq!(reason, RefusalReason::OverLimit);
    assert!(message.contains("max_hubs"), "{message}");
    // The registered hub may always come back (replacement).
    let (_control, answer) = register(&connect(h, &a).await, "a", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: true });
    assert_eq!(h.stats().limit_hits(LimitKind::MaxHubs), 1);
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_limit_hits_total{limit=\"max_hubs\"}"), 1.0);
    assert_eq!(series(&m, "keyway_relay_refusals_total{reason=\"over_limit\"}"), 1.0);

    // Lifting the limit at run time lets the second hub in, without touching the first.
    h.set_limits(Limits { max_hubs: 0, ..Limits::default() }).unwrap();
    let (_control, answer) = register(&connect(h, &b).await, "b", &[], false).await;
    assert_eq!(answer, Frame::Registered { replaced: false });
    assert_eq!(h.stats().hubs_connected(), 2);
}

#[tokio::test]
async fn max_sessions_per_hub_refuses_the_extra_session() {
    let (hub, app) = (identity(), identity());
    let limits = Limits { max_sessions_per_hub: 1, ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let h = &relay.handle;
    let (hub_conn, _control) = registered_hub(h, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (_s1, mut r1) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let _hub_side = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r1)).await.unwrap(), Frame::ChannelReady { .. }));
    let (_s2, mut r2) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (reason, message) = refusal_of(&mut r2).await;
    assert_eq!(reason, RefusalReason::OverLimit);
    assert!(message.contains("max_sessions_per_hub"), "{message}");
    assert_eq!(h.stats().limit_hits(LimitKind::MaxSessionsPerHub), 1);
}

#[tokio::test]
async fn one_app_at_its_session_cap_is_refused_while_another_app_is_served() {
    let (hub, greedy, other) = (identity(), identity(), identity());
    let limits = Limits { max_sessions_per_hub: 10, max_sessions_per_app: 2, ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let h = &relay.handle;
    let apps = [greedy.public_key(), other.public_key()];
    let (hub_conn, _control) = registered_hub(h, &hub, "home", &apps).await;
    let greedy_conn = connect(h, &greedy).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (s, mut r) = open_session(&greedy_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
        let hub_side = hub_accepts(&hub_conn).await;
        assert!(matches!(within("accepted", read_frame(&mut r)).await.unwrap(), Frame::ChannelReady { .. }));
        held.push((s, r, hub_side));
    }
    assert_eq!(h.stats().apps_at_session_cap(), 1);
    // The greedy app's next session is refused at once, without the hub hearing of it.
    let (_s, mut r) = open_session(&greedy_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (reason, message) = refusal_of(&mut r).await;
    assert_eq!(reason, RefusalReason::OverLimit);
    assert!(message.contains("max_sessions_per_app"), "{message}");
    assert_eq!(h.stats().limit_hits(LimitKind::MaxSessionsPerApp), 1);
    assert_eq!(h.stats().limit_hits(LimitKind::MaxSessionsPerHub), 0);
    // Another app of the same hub is still served.
    let other_conn = connect(h, &other).await;
    let (_s2, mut r2) = open_session(&other_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let _other_side = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r2)).await.unwrap(), Frame::ChannelReady { .. }));
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_apps_at_session_cap"), 1.0);
    assert_eq!(series(&m, "keyway_relay_limit{limit=\"max_sessions_per_app\"}"), 2.0);
    assert_eq!(series(&m, "keyway_relay_limit_hits_total{limit=\"max_sessions_per_app\"}"), 1.0);
    // One of the greedy app's sessions ends: it is below its cap again.
    drop(held.pop());
    let stats = h.stats();
    eventually("the at-cap gauge to drop", || {
        let stats = stats.clone();
        async move { (stats.apps_at_session_cap() == 0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn max_streams_per_connection_is_quic_flow_control() {
    let (hub, app) = (identity(), identity());
    let limits = Limits { max_streams_per_connection: 1, ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let h = &relay.handle;
    let (hub_conn, _control) = registered_hub(h, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (_s1, mut r1) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let _hub_side = hub_accepts(&hub_conn).await;
    assert!(matches!(within("accepted", read_frame(&mut r1)).await.unwrap(), Frame::ChannelReady { .. }));
    // The relay granted one stream: a second cannot even be opened (pending on MAX_STREAMS,
    // which is not granted while the first is open).
    let second = app_conn.open_bi();
    tokio::pin!(second);
    assert!(futures_poll_once(second.as_mut()).await.is_none(), "a second stream was granted");
}

/// Polls a future a few times, yielding in between; `None` if it is still pending.
async fn futures_poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
    for _ in 0..20 {
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = tokio::task::yield_now() => {}
        }
    }
    None
}

#[tokio::test]
async fn new_connections_per_ip_refuses_before_the_handshake() {
    let limits = Limits { new_connections_per_ip: 0.001, new_connections_burst: 1, ..Limits::default() };
    let relay = relay_with(&[], limits).await;
    let h = &relay.handle;
    let _first = connect(h, &identity()).await;
    let config = raw::client_config(&identity(), h.public_key()).unwrap();
    let endpoint = raw::endpoint();
    let second = endpoint.connect_with(config, h.local_addr(), keyway_proto::tls::SERVER_NAME).unwrap();
    let err = within("refused", second).await.unwrap_err();
    assert!(matches!(err, quinn::ConnectionError::ConnectionClosed(_)), "{err:?}");
    assert_eq!(h.stats().limit_hits(LimitKind::NewConnectionsPerIp), 1);
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_handshakes_total{result=\"refused\",role=\"quic\"}"), 1.0);
}

/// Dials `relay` from a fresh endpoint bound to `from` (port 0): `Ok` if the handshake
/// completes, the connection error if the relay refused it.
async fn dial_from(relay: &RelayHandle, from: &str) -> Result<Connection, String> {
    let endpoint = quinn::Endpoint::client(format!("{from}:0").parse().unwrap()).unwrap();
    let config = raw::client_config(&identity(), relay.public_key()).unwrap();
    raw::dial_with(&endpoint, relay.local_addr(), config).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn ipv6_sources_are_rate_limited_per_prefix_and_ipv4_sources_per_address() {
    // Loopback only: IPv6 has just ::1 here (which prefix an address falls in is the pure
    // `rate_key`, unit-tested with any address); IPv4 has the whole 127.0.0.0/8.
    let limits = Limits { new_connections_per_ip: 0.001, new_connections_burst: 1, ..Limits::default() };
    let mut config =
        RelayConfig::new("[::1]:0".parse().unwrap(), identity(), NamePolicy::Open { state_file: None });
    config.limits = limits.clone();
    let v6 = Relay::start(config).await.unwrap();
    assert_eq!(v6.limits().new_connections_ipv6_prefix, 64, "the default prefix is a /64");
    let _first = within("first", dial_from(&v6, "[::1]")).await.unwrap();
    let second = within("second", dial_from(&v6, "[::1]")).await;
    assert!(second.is_err(), "the /64's bucket is empty, so a second connection is refused");
    assert_eq!(v6.stats().limit_hits(LimitKind::NewConnectionsPerIp), 1);
    // The prefix is reloadable; a bad one is refused and the old one stays.
    let bad = Limits { new_connections_ipv6_prefix: 0, ..limits.clone() };
    assert!(v6.set_limits(bad).unwrap_err().to_string().contains("new_connections_ipv6_prefix"));
    v6.set_limits(Limits { new_connections_ipv6_prefix: 128, ..limits.clone() }).unwrap();
    assert_eq!(v6.limits().new_connections_ipv6_prefix, 128);

    let v4 = relay_with(&[], limits).await;
    let h = &v4.handle;
    let _first = within("first", dial_from(h, "127.0.0.1")).await.unwrap();
    assert!(within("second", dial_from(h, "127.0.0.1")).await.is_err());
    // Another IPv4 address is another source.
    let _other = within("other address", dial_from(h, "127.0.0.2")).await.unwrap();
    assert_eq!(h.stats().limit_hits(LimitKind::NewConnectionsPerIp), 1);
    let m = scrape(h).await;
    assert_eq!(series(&m, "keyway_relay_limit{limit=\"new_connections_ipv6_prefix\"}"), 64.0);
}

#[tokio::test]
async fn address_validation_kicks_in_over_the_retry_threshold() {
    let relay = relay_with(&[], Limits { retry_threshold: 0, ..Limits::default() }).await;
    let h = &relay.handle;
    // The client answers the Retry transparently; the connection still comes up.
    let _conn = connect(h, &identity()).await;
    assert!(h.stats().address_validations() >= 1);
    assert!(series(&scrape(h).await, "keyway_relay_address_validations_total") >= 1.0);
}

#[tokio::test]
async fn a_handshake_that_never_completes_times_out() {
    let relay =
        relay_with(&[], Limits { handshake_timeout: Duration::from_millis(200), ..Limits::default() }).await;
    let h = &relay.handle;
    // A one-way proxy: the client's packets reach the relay, the relay's never come back.
    let proxy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = h.local_addr();
    let proxy_addr = proxy.local_addr().unwrap();
    let forward = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, _)) = proxy.recv_from(&mut buf).await else { return };
            let _ = upstream.send_to(&buf[..n], relay_addr).await;
        }
    });
    let config = raw::client_config(&identity(), h.public_key()).unwrap();
    let endpoint = raw::endpoint();
    let _connecting = endpoint.connect_with(config, proxy_addr, keyway_proto::tls::SERVER_NAME).unwrap();
    let stats = h.stats();
    eventually("handshake timeout", || async {
        (stats.limit_hits(LimitKind::HandshakeTimeout) >= 1).then_some(())
    })
    .await;
    let m = scrape(h).await;
    assert!(series(&m, "keyway_relay_handshakes_total{result=\"timeout\",role=\"quic\"}") >= 1.0);
    forward.abort();
}

#[tokio::test]
async fn past_max_handshakes_in_flight_a_connection_is_refused_before_the_handshake_until_a_slot_frees() {
    let limits = Limits {
        max_handshakes_in_flight: 1,
        handshake_timeout: Duration::from_millis(500),
        new_connections_per_ip: 0.0,
        ..Limits::default()
    };
    let relay = relay_with(&[], limits).await;
    let h = &relay.handle;
    // One handshake that never completes holds the only slot: its packets reach the relay
    // through a one-way proxy, the relay's answers never come back.
    let proxy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (relay_addr, proxy_addr) = (h.local_addr(), proxy.local_addr().unwrap());
    let forward = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, _)) = proxy.recv_from(&mut buf).await else { return };
            let _ = upstream.send_to(&buf[..n], relay_addr).await;
        }
    });
    let endpoint = raw::endpoint();
    let config = raw::client_config(&identity(), h.public_key()).unwrap();
    let _stuck = endpoint.connect_with(config, proxy_addr, keyway_proto::tls::SERVER_NAME).unwrap();
    let stats = h.stats();
    eventually("the stuck handshake holds the slot", || async {
        (stats.handshakes_in_flight() == 1).then_some(())
    })
    .await;
    let refused = raw::dial(&endpoint, relay_addr, h.public_key(), &identity()).await;
    let is_refused = |e: &raw::DialError| {
        matches!(e, raw::DialError::Handshake(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
    };
    match refused {
        Err(e) if is_refused(&e) => {}
        other => panic!("expected CONNECTION_REFUSED while the slot is taken, got {other:?}"),
    }
    assert_eq!(stats.connections_refused(keyway_relay::ConnectionRefusal::HandshakesInFlight), 1);
    assert_eq!(stats.limit_hits(LimitKind::MaxHandshakesInFlight), 1);
    let m = scrape(h).await;
    assert_eq!(
        series(&m, "keyway_relay_connections_refused_total{reason=\"max_handshakes_in_flight\"}"),
        1.0
    );
    assert_eq!(series(&m, "keyway_relay_limit{limit=\"max_handshakes_in_flight\"}"), 1.0);
    // The stuck one times out and frees the slot: the next attempt gets its handshake.
    eventually("the slot comes back", || async {
        match raw::dial(&endpoint, relay_addr, h.public_key(), &identity()).await {
            Ok(conn) => Some(conn),
            Err(e) if is_refused(&e) => None,
            Err(e) => panic!("unexpected dial error: {e}"),
        }
    })
    .await;
    assert_eq!(stats.limit_hits(LimitKind::HandshakeTimeout), 1);
    forward.abort();
}

#[tokio::test]
async fn an_idle_session_is_cut_with_the_limit_code() {
    let (hub, app) = (identity(), identity());
    let limits = Limits { idle_session_timeout: Duration::from_millis(200), ..Limits::default() };
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let h = &relay.handle;
    let (hub_conn, _control) = registered_hub(h, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(h, &app).await;
    let (_app_send, mut app_recv) =
        open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (_hub_send, mut hub_recv, _, _) = hub_accepts(&hub_conn).await;
    assert!(matches!(
        within("accepted", read_frame(&mut app_recv)).await.unwrap(),
        Frame::ChannelReady { .. }
    ));
    let err = within("idle cut", app_recv.read_to_end(1024)).await.unwrap_err();
    assert!(
        matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == codes::LIMIT),
        "{err:?}"
    );
    let err = within("idle cut (hub)", hub_recv.read_to_end(1024)).await.unwrap_err();
    assert!(matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == codes::LIMIT));
    assert_eq!(h.stats().limit_hits(LimitKind::IdleSessionTimeout), 1);
    assert_eq!(h.stats().channels_active(), 0);
}

#[tokio::test]
async fn invalid_limits_are_refused_and_the_old_ones_stay() {
    let relay = relay_with(&[], Limits::default()).await;
    let bad = Limits { max_streams_per_connection: 0, ..Limits::default() };
    assert!(relay.handle.set_limits(bad).is_err());
    assert_eq!(relay.handle.limits(), Limits::default());
}

#[tokio::test]
async fn shutdown_drains_live_sessions_and_reports_unhealthy_meanwhile() {
    let (hub, app) = (identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], Limits::default()).await;
    let (hub_conn, mut control) = registered_hub(&relay.handle, &hub, "home", &[app.public_key()]).await;
    let app_conn = connect(&relay.handle, &app).await;
    let (mut app_send, mut app_recv) =
        open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    let (mut hub_send, _hub_recv, _, _) = hub_accepts(&hub_conn).await;
    assert!(matches!(
        within("accepted", read_frame(&mut app_recv)).await.unwrap(),
        Frame::ChannelReady { .. }
    ));
    let metrics = relay.handle.metrics_addr().unwrap();
    let stats = relay.handle.stats();
    let TestRelay { handle, dir: _dir, .. } = relay;
    let shutdown = tokio::spawn(handle.shutdown());
    assert!(matches!(within("goaway", read_frame(&mut control.recv)).await.unwrap(), Frame::GoAway { .. }));
    // Draining: unhealthy, new channels refused, the live one kept.
    let (status, body) = http_get_addr(metrics, "/healthz").await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert!(series(&http_get_addr(metrics, "/metrics").await.1, "keyway_relay_draining") == 1.0);
    let (_s, mut r) = open_session(&app_conn, "home", hub.public_key(), SessionPurpose::Connect).await;
    assert_eq!(refusal_of(&mut r).await.0, RefusalReason::ShuttingDown);
    assert!(!shutdown.is_finished(), "the drain waits for the live channel");
    // The channel ends on its own; the relay then finishes shutting down.
    app_send.finish().unwrap();
    hub_send.finish().unwrap();
    let _ = within("app sees the end", app_recv.read_to_end(1024)).await;
    within("shutdown completes", shutdown).await.unwrap();
    assert_eq!(stats.channels_active(), 0);
    assert_eq!(app_code(within("closed", app_conn.closed()).await), Some(codes::SHUTTING_DOWN.into_inner()));
}
