//! End-to-end connections through a real relay over real UDP on loopback: an app and a hub, each one
//! quinn endpoint on a path socket (`keyway_path::socket`) carrying both its relay connection
//! and, under the channel header, the end-to-end QUIC connection, which the relay forwards
//! without being able to read it (it holds no key of it: the app pins the hub's key, the hub
//! admits the app's, and the relay's own key is neither).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keyway_path::{bind_path_endpoint, e2e_transport_config, ChannelBinding, Paths};
use keyway_proto::channel::{self, ChannelId, HEADER_LEN};
use keyway_proto::tls::{self, AllowList};
use keyway_proto::ALPN_E2E;
use keyway_test_support::payload;
use keyway_test_support::raw::echo_on;
use keyway_test_support::tap::{Tap, Way};
use tokio::net::UdpSocket;

fn e2e_transport() -> Arc<quinn::TransportConfig> {
    Arc::new(e2e_transport_config(Duration::from_secs(1), Duration::from_secs(30)).unwrap())
}

/// The relay connection of a peer on its path endpoint, with a short keep-alive so a rebound
/// path is shown to the relay soon.
async fn relay_connection(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    key: PublicKey,
    id: &Identity,
) -> Connection {
    let mut config = raw::client_config(id, key).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    config.transport_config(Arc::new(transport));
    within("relay handshake", raw::dial_with(endpoint, relay, config)).await.unwrap()
}

fn series(relay: &RelayHandle, series: &str) -> f64 {
    keyway_test_support::http::series(&relay.stats().encode(), series).unwrap_or_else(|| panic!("{series}"))
}

fn dropped(relay: &RelayHandle, reason: &str) -> f64 {
    series(relay, &format!("keyway_relay_channel_packets_dropped_total{{reason=\"{reason}\"}}"))
}

/// An app and a hub on path endpoints behind taps, with a channel between them through the
/// relay and the hub echoing every stream of the end-to-end connection.
struct Bed {
    relay: TestRelay,
    /// The taps on the app's and the hub's leg (none: the peers send to the relay directly, so
    /// the relay gets their GSO batches as GRO batches).
    taps: Option<(Tap, Tap)>,
    app_paths: Paths,
    hub_paths: Paths,
    _bindings: (ChannelBinding, ChannelBinding),
    app_id: ChannelId,
    hub_id: ChannelId,
    e2e: Connection,
    /// The hub's control stream (to publish a new allow-list).
    control: Control,
    /// The app's channel stream (the relay's end of it tells how the channel ended).
    app_channel: (SendStream, RecvStream),
    _keep: (quinn::Endpoint, quinn::Endpoint, Connection, Connection, SendStream, RecvStream),
}

async fn bed(limits: Limits, tapped: bool) -> Bed {
    let (app, hub) = (identity(), identity());
    let relay = relay_with(&[("home", hub.public_key())], limits).await;
    let (relay_addr, relay_key) = (relay.handle.local_addr(), relay.handle.public_key());
    let taps = match tapped {
        true => Some((Tap::start(relay_addr).await, Tap::start(relay_addr).await)),
        false => None,
    };
    let (app_relay, hub_relay) =
        taps.as_ref().map_or((relay_addr, relay_addr), |(a, h)| (a.addr(), h.addr()));

    let crypto =
        tls::quic_server_crypto(&hub, Arc::new(AllowList::new([app.public_key()])), ALPN_E2E).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(e2e_transport());
    let (hub_ep, hub_paths) = bind_path_endpoint(hub_relay, Some(server)).unwrap();
    let hub_conn = relay_connection(&hub_ep, hub_relay, relay_key, &hub).await;
    let (control, answer) = raw::register(&hub_conn, name("home"), &[app.public_key()], false).await.unwrap();
    assert_eq!(answer, Frame::Registered { replaced: false });

    let (app_ep, app_paths) = bind_path_endpoint(app_relay, None).unwrap();
    let app_conn = relay_connection(&app_ep, app_relay, relay_key, &app).await;
    let (mut app_send, mut app_recv) = app_conn.open_bi().await.unwrap();
    let open = Frame::ChannelOpen {
        hub: name("home"),
        hub_key: hub.public_key(),
        purpose: SessionPurpose::Connect,
        channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
    };
    write_frame(&mut app_send, &open).await.unwrap();
    let (mut hub_send, mut hub_recv) = within("announce", hub_conn.accept_bi()).await.unwrap();
    let Frame::ChannelAnnounce { channel: hub_id, .. } = read_frame(&mut hub_recv).await.unwrap() else {
        panic!("expected ChannelAnnounce")
    };
    let hub_binding = hub_paths.bind(hub_id);
    write_frame(&mut hub_send, &Frame::ChannelAccepted).await.unwrap();
    let Frame::ChannelReady { channel: app_id } = within("ready", read_frame(&mut app_recv)).await.unwrap()
    else {
        panic!("expected ChannelReady")
    };
    let app_binding = app_paths.bind(app_id);

    let echo_ep = hub_ep.clone();
    let expected = hub_binding.addr();
    tokio::spawn(async move {
        while let Some(incoming) = echo_ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            assert_eq!(conn.remote_address(), expected, "the hub's quinn sees the virtual address only");
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let (crypto, _) = tls::quic_client_crypto(&app, hub.public_key(), ALPN_E2E).unwrap();
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(e2e_transport());
    let connecting = app_ep.connect_with(config, app_binding.addr(), tls::SERVER_NAME).unwrap();
    let e2e = within("end-to-end handshake through the relay", connecting).await.unwrap();
    Bed {
        relay,
        taps,
        app_paths,
        hub_paths,
        _bindings: (app_binding, hub_binding),
        app_id,
        hub_id,
        e2e,
        control,
        app_channel: (app_send, app_recv),
        _keep: (app_ep, hub_ep, app_conn, hub_conn, hub_send, hub_recv),
    }
}

#[tokio::test]
async fn an_end_to_end_connection_through_the_relay_echoes_byte_exact_and_is_counted() {
    let bed = bed(Limits::default(), false).await;
    let data = payload(8 * 1024 * 1024, 21);
    let back = echo_on(&bed.e2e, &data).await;
    assert!(back == data, "echo differs: {} bytes back of {}", back.len(), data.len());

    let relay = &bed.relay.handle;
    let stats = relay.stats();
    assert_eq!(stats.channels_active(), 1);
    for direction in ["app_to_hub", "hub_to_app"] {
        let packets = series(
            relay,
            &format!("keyway_relay_channel_packets_forwarded_total{{direction=\"{direction}\"}}"),
        );
        assert!(packets > 1000.0, "{direction}: {packets}");
    }
    // Both byte counters count end-to-end packets without their headers: more than the payload
    // (QUIC framing and AEAD tags on top), each direction.
    assert!(stats.bytes_app_to_hub() > data.len() as u64, "{}", stats.bytes_app_to_hub());
    assert!(stats.bytes_hub_to_app() > data.len() as u64, "{}", stats.bytes_hub_to_app());
    assert_eq!((dropped(relay, "unknown_channel"), dropped(relay, "wrong_source")), (0.0, 0.0));
    let (app, hub) = (bed.app_paths.stats(), bed.hub_paths.stats());
    assert_eq!((app.dropped_foreign, app.dropped_unknown_channel), (0, 0), "{app:?}");
    assert_eq!((hub.dropped_foreign, hub.dropped_unknown_channel), (0, 0), "{hub:?}");
}

#[tokio::test]
async fn the_relay_is_blind_datagrams_leave_it_as_they_came_but_for_the_header() {
    let bed = bed(Limits::default(), true).await;
    let data = payload(512 * 1024, 22);
    assert!(echo_on(&bed.e2e, &data).await == data);

    let (app_tap, hub_tap) = bed.taps.as_ref().unwrap();
    for (from, to, from_id, to_id) in
        [(app_tap, hub_tap, bed.app_id, bed.hub_id), (hub_tap, app_tap, bed.hub_id, bed.app_id)]
    {
        let sent = from.seen(Way::ToRelay);
        let delivered = to.seen(Way::FromRelay);
        assert!(delivered.len() > 100, "{} datagrams delivered", delivered.len());
        let mut entered: std::collections::HashMap<Vec<u8>, usize> = std::collections::HashMap::new();
        for datagram in &sent {
            let (id, packet) = channel::parse(datagram).unwrap();
            assert_eq!(id, from_id, "the sender uses its own id");
            *entered.entry(packet.to_vec()).or_default() += 1;
        }
        for datagram in &delivered {
            let (id, packet) = channel::parse(datagram).unwrap();
            assert_eq!(id, to_id, "the receiver gets its own id");
            assert_eq!(datagram.len(), HEADER_LEN + packet.len());
            let left = entered.get_mut(packet).unwrap_or_else(|| panic!("a datagram the sender never sent"));
            assert!(*left > 0, "a datagram delivered more often than sent");
            *left -= 1;
        }
    }
}

#[tokio::test]
async fn spoofed_and_unknown_datagrams_are_dropped_and_counted_and_the_channel_is_unharmed() {
    let bed = bed(Limits::default(), false).await;
    let relay = &bed.relay.handle;
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Valid ids from an address the relay never authenticated for them.
    for id in [bed.app_id, bed.hub_id] {
        let mut spoof = Vec::new();
        channel::encode_into(&mut spoof, id, &[0x40; 200]);
        stranger.send_to(&spoof, relay.local_addr()).await.unwrap();
    }
    // Unknown ids, from the stranger and from the app's own path.
    let mut unknown = Vec::new();
    channel::encode_into(&mut unknown, ChannelId::new(0x5eed), &[0x40; 200]);
    stranger.send_to(&unknown, relay.local_addr()).await.unwrap();
    stranger.send_to(&unknown[..HEADER_LEN - 1], relay.local_addr()).await.unwrap();
    eventually("drops counted", || async {
        (dropped(relay, "wrong_source") >= 2.0 && dropped(relay, "unknown_channel") >= 2.0).then_some(())
    })
    .await;
    assert_eq!((dropped(relay, "wrong_source"), dropped(relay, "unknown_channel")), (2.0, 2.0));
    // Nothing reached either peer from them, and the channel carries on.
    let (app, hub) = (bed.app_paths.stats(), bed.hub_paths.stats());
    assert_eq!((app.dropped_unknown_channel, hub.dropped_unknown_channel), (0, 0));
    let data = payload(256 * 1024, 23);
    assert!(echo_on(&bed.e2e, &data).await == data, "the channel is unharmed");
}

#[tokio::test]
async fn a_channel_follows_the_app_when_its_nat_mapping_changes_mid_transfer() {
    let bed = bed(Limits::default(), true).await;
    let app_tap = &bed.taps.as_ref().unwrap().0;
    let data = payload(4 * 1024 * 1024, 24);
    let (mut send, mut recv) = bed.e2e.open_bi().await.unwrap();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
        })
    };
    let mut back = vec![0u8; 512 * 1024];
    within("first part", recv.read_exact(&mut back)).await.unwrap();
    let new = app_tap.rebind().await;
    let rest = within("the rest after the rebinding", recv.read_to_end(usize::MAX)).await.unwrap();
    writer.await.unwrap();
    back.extend_from_slice(&rest);
    assert!(back == data, "echo differs after the rebinding: {} bytes of {}", back.len(), data.len());
    // The relay followed the app: what it forwards to the app goes to the new address.
    let data = payload(64 * 1024, 25);
    assert!(echo_on(&bed.e2e, &data).await == data);
    assert!(app_tap.delivered_via(new) > 10, "{} datagrams via the new address", app_tap.delivered_via(new));
    assert_eq!(bed.relay.handle.stats().channels_active(), 1);
}

#[tokio::test]
async fn the_per_key_byte_rate_drops_what_is_over_it_and_the_connection_still_completes() {
    // 512 KiB/s per key: a 1 MiB echo is over it at loopback speed, so runs are dropped and
    // QUIC's loss recovery brings the transfer home anyway.
    let limits = Limits { bytes_per_second_per_key: 512 * 1024, ..Limits::default() };
    let bed = bed(limits, false).await;
    let data = payload(1024 * 1024, 26);
    assert!(echo_on(&bed.e2e, &data).await == data);
    let relay = &bed.relay.handle;
    assert!(dropped(relay, "rate_limited") > 0.0);
    assert!(relay.stats().limit_hits(keyway_relay::LimitKind::BytesPerSecondPerKey) > 0);
}

#[tokio::test]
async fn after_a_revocation_the_apps_datagrams_are_dropped_and_counted_and_never_reach_the_hub() {
    let mut bed = bed(Limits::default(), false).await;
    let data = payload(64 * 1024, 27);
    assert!(echo_on(&bed.e2e, &data).await == data);

    let update = Frame::AllowList { allowed_apps: Vec::new(), pairing_open: false };
    write_frame(&mut bed.control.send, &update).await.unwrap();
    let ended = within("the channel stream ends", bed.app_channel.1.read_to_end(64)).await;
    assert!(
        matches!(ended, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == codes::REVOKED),
        "{ended:?}"
    );
    let relay = &bed.relay.handle;
    eventually("channel unlisted", || async { (relay.stats().channels_active() == 0).then_some(()) }).await;

    // The app's end-to-end connection does not know yet and keeps sending: the relay drops it all.
    // (A moment first for datagrams forwarded before the cut to be counted at the hub.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reached_hub = bed.hub_paths.stats().channel_in;
    let before = dropped(relay, "unknown_channel");
    let (mut send, _recv) = bed.e2e.open_bi().await.unwrap();
    send.write_all(&payload(32 * 1024, 28)).await.unwrap();
    eventually("the app's datagrams dropped as unknown", || async {
        (dropped(relay, "unknown_channel") > before).then_some(())
    })
    .await;
    assert_eq!(bed.hub_paths.stats().channel_in, reached_hub, "nothing reached the hub after the revocation");
}

#[tokio::test]
async fn a_graceful_shutdown_waits_for_live_channels_which_keep_forwarding_meanwhile() {
    let Bed {
        relay,
        taps: _taps,
        app_paths: _ap,
        hub_paths: _hp,
        _bindings,
        e2e,
        mut control,
        app_channel,
        _keep,
        ..
    } = bed(Limits::default(), false).await;
    let TestRelay { handle, dir: _dir, .. } = relay;
    let stats = handle.stats();
    let shutdown = tokio::spawn(handle.shutdown());
    assert!(matches!(within("goaway", read_frame(&mut control.recv)).await.unwrap(), Frame::GoAway { .. }));
    // Draining: a new channel is refused, the live one still carries the end-to-end connection
    // (without the drain waiting for it, the relay would be gone by now).
    let app_conn = &_keep.2;
    let (mut send, mut recv) = app_conn.open_bi().await.unwrap();
    // (Any hub key: the relay refuses before looking.)
    let open = Frame::ChannelOpen {
        hub: name("home"),
        hub_key: identity().public_key(),
        purpose: SessionPurpose::Connect,
        channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
    };
    write_frame(&mut send, &open).await.unwrap();
    assert_eq!(refusal_of(&mut recv).await.0, RefusalReason::ShuttingDown);
    // Once the GoAway is delivered nothing but the drain holds the relay up: give a relay that
    // did not wait for channels the time to close (it would close the app's connection).
    let _ = within("control stream finished", control.recv.read_to_end(1024)).await;
    tokio::select! {
        _ = app_conn.closed() => panic!("the relay closed while a channel was live"),
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    let data = payload(256 * 1024, 29);
    assert!(echo_on(&e2e, &data).await == data, "the live channel forwards during the drain");
    assert_eq!(stats.channels_active(), 1);
    // The app ends its channel; the relay then finishes shutting down.
    let (mut app_send, _app_recv) = app_channel;
    app_send.finish().unwrap();
    within("shutdown completes", shutdown).await.unwrap();
    assert_eq!(stats.channels_active(), 0);
    assert_eq!(app_code(within("closed", app_conn.closed()).await), Some(codes::SHUTTING_DOWN.into_inner()));
}
