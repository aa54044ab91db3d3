//! The path socket over real UDP on loopback: two quinn endpoints on path sockets talk end to
//! end through a small forwarder that plays the relay (checks the source, rewrites the channel
//! id, sends on), and a plain quinn server stands in for the relay's own QUIC endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_path::{bind_path_endpoint, e2e_transport_config, ChannelBinding, Paths};
use keyway_proto::channel::{self, ChannelId};
use keyway_proto::tls::{self, AllowList};
use keyway_proto::{Identity, ALPN_E2E};
use keyway_test_support::raw::echo_on;
use keyway_test_support::{eventually, identity, payload, within};
use tokio::net::UdpSocket;

const APP_SIDE: ChannelId = ChannelId::new(0x0a0a_0a0a_0a0a_0a0a);
const HUB_SIDE: ChannelId = ChannelId::new(0x0b0b_0b0b_0b0b_0b0b);

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(e2e_transport_config(Duration::from_secs(5), Duration::from_secs(30)).unwrap())
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], addr.port()))
}

/// The test's relay: one UDP socket that forwards channel datagrams between two registered
/// (source address, id) pairs, rewriting the id, one datagram at a time.
struct Forwarder {
    socket: Arc<UdpSocket>,
    forwarded: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Forwarder {
    async fn bind() -> Self {
        Self {
            socket: Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
            forwarded: Arc::default(),
            refused: Arc::default(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Starts forwarding between `a` (under `a_id`) and `b` (under `b_id`).
    fn run(&self, a: SocketAddr, a_id: ChannelId, b: SocketAddr, b_id: ChannelId) {
        let routes = HashMap::from([(a_id, (a, b, b_id)), (b_id, (b, a, a_id))]);
        let (socket, forwarded, refused) =
            (self.socket.clone(), self.forwarded.clone(), self.refused.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                let datagram = &mut buf[..n];
                let route = channel::parse(datagram).and_then(|(id, _)| routes.get(&id));
                match route {
                    Some(&(src, dst, out_id)) if src == from => {
                        channel::write_header(datagram, out_id);
                        let _ = socket.send_to(datagram, dst).await;
                        forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
}

struct Pair {
    app: quinn::Endpoint,
    app_paths: Paths,
    app_binding: ChannelBinding,
    hub: quinn::Endpoint,
    hub_paths: Paths,
    hub_binding: ChannelBinding,
    forwarder: Forwarder,
    app_id: Identity,
    hub_key: keyway_proto::PublicKey,
}

/// An app endpoint and a hub endpoint (with a server config admitting the app) on path
/// sockets, both bound to their side of one channel through a forwarder.
async fn pair() -> Pair {
    let (app_id, hub_id) = (identity(), identity());
    let forwarder = Forwarder::bind().await;
    let crypto =
        tls::quic_server_crypto(&hub_id, Arc::new(AllowList::new([app_id.public_key()])), ALPN_E2E).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(transport());
    let (app, app_paths) = bind_path_endpoint(forwarder.addr(), None).unwrap();
    let (hub, hub_paths) = bind_path_endpoint(forwarder.addr(), Some(server)).unwrap();
    forwarder.run(
        loopback(app.local_addr().unwrap()),
        APP_SIDE,
        loopback(hub.local_addr().unwrap()),
        HUB_SIDE,
    );
    let app_binding = app_paths.bind(APP_SIDE);
    let hub_binding = hub_paths.bind(HUB_SIDE);
    Pair {
        app,
        app_paths,
        app_binding,
        hub,
        hub_paths,
        hub_binding,
        forwarder,
        app_id,
        hub_key: hub_id.public_key(),
    }
}

/// Dials the hub through the channel; the hub side echoes every bi stream and checks that the
/// connection comes from its binding's virtual address.
async fn connect(p: &Pair) -> quinn::Connection {
    let hub = p.hub.clone();
    let expected = p.hub_binding.addr();
    tokio::spawn(async move {
        while let Some(incoming) = hub.accept().await {
            let conn = incoming.await.unwrap();
            assert_eq!(conn.remote_address(), expected, "quinn sees the virtual address only");
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        tokio::io::copy(&mut recv, &mut send).await.unwrap();
                        send.finish().unwrap();
                    });
                }
            });
        }
    });
    let (crypto, _) = tls::quic_client_crypto(&p.app_id, p.hub_key, ALPN_E2E).unwrap();
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(transport());
    let connecting = p.app.connect_with(config, p.app_binding.addr(), tls::SERVER_NAME).unwrap();
    within("the end-to-end handshake through the forwarder", connecting).await.unwrap()
}

#[tokio::test]
async fn an_end_to_end_connection_through_a_forwarder_echoes_10_mib_byte_exact() {
    let p = pair().await;
    let conn = connect(&p).await;
    let data = payload(10 * 1024 * 1024, 11);
    let back = echo_on(&conn, &data).await;
    assert!(back == data, "echo differs: {} bytes back of {}", back.len(), data.len());
    let (app, hub) = (p.app_paths.stats(), p.hub_paths.stats());
    // Every datagram of the connection went through the forwarder under a channel header.
    assert!(app.channel_out > 1000 && hub.channel_in > 1000, "{app:?} {hub:?}");
    assert!(hub.channel_out > 0 && app.channel_in > 0, "{app:?} {hub:?}");
    assert_eq!(p.forwarder.refused.load(Ordering::Relaxed), 0);
    assert!(p.forwarder.forwarded.load(Ordering::Relaxed) > 1000);
    for s in [app, hub] {
        assert_eq!((s.dropped_foreign, s.dropped_unknown_channel, s.dropped_malformed), (0, 0, 0), "{s:?}");
        assert_eq!((s.relay_in, s.bound), (0, 1));
    }
}

#[tokio::test]
async fn foreign_sources_and_unknown_ids_are_dropped_and_counted_and_the_channel_survives() {
    let p = pair().await;
    let conn = connect(&p).await;
    let app_port = loopback(p.app.local_addr().unwrap());

    // A stranger who knows the app's channel id and port, from its own address.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut spoof = Vec::new();
    channel::encode_into(&mut spoof, APP_SIDE, &[0x40; 100]);
    stranger.send_to(&spoof, app_port).await.unwrap();
    // From the relay's own address, under an id the app never bound.
    let mut unknown = Vec::new();
    channel::encode_into(&mut unknown, ChannelId::new(0xdead), &[0x40; 100]);
    p.forwarder.socket.send_to(&unknown, app_port).await.unwrap();

    let stats = eventually("the foreign datagram dropped, the unknown one held", || {
        let s = p.app_paths.stats();
        async move { (s.dropped_foreign >= 1 && s.held >= 1).then_some(s) }
    })
    .await;
    assert_eq!((stats.dropped_foreign, stats.held), (1, 1), "{stats:?}");
    // Nobody binds its id: it expires, dropped and counted.
    eventually("the unknown datagram dropped once expired", || {
        let s = p.app_paths.stats();
        async move { (s.dropped_unknown_channel >= 1).then_some(()) }
    })
    .await;
    let data = payload(64 * 1024, 3);
    assert!(echo_on(&conn, &data).await == data, "the channel is unharmed");

    // Once the hub unbinds its side, the app's packets reach it under an unknown id: held a
    // moment (nobody binds it), then dropped.
    let before = p.hub_paths.stats().dropped_unknown_channel;
    drop(p.hub_binding);
    assert_eq!(p.hub_paths.stats().bound, 0);
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"after the unbind").await.unwrap();
    eventually("the hub drops the app's packets once unbound", || {
        let s = p.hub_paths.stats();
        async move { (s.dropped_unknown_channel > before).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn the_relay_connection_passes_unchanged() {
    // A plain quinn server with the relay's endpoint config stands in for the relay.
    let relay_id = identity();
    let crypto = tls::quic_server_crypto(&relay_id, Arc::new(tls::AnyKey), keyway_proto::ALPN_RELAY).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = quinn::Endpoint::new(
        tls::endpoint_config(&relay_id),
        Some(quinn::ServerConfig::with_crypto(crypto)),
        socket,
        quinn::default_runtime().unwrap(),
    )
    .unwrap();
    let relay_addr = relay.local_addr().unwrap();
    tokio::spawn(async move {
        let conn = relay.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        tokio::io::copy(&mut recv, &mut send).await.unwrap();
        send.finish().unwrap();
        conn.closed().await;
    });

    let (endpoint, paths) = bind_path_endpoint(relay_addr, None).unwrap();
    let (crypto, _) =
        tls::quic_client_crypto(&identity(), relay_id.public_key(), keyway_proto::ALPN_RELAY).unwrap();
    let connecting =
        endpoint.connect_with(quinn::ClientConfig::new(crypto), relay_addr, tls::SERVER_NAME).unwrap();
    let conn = within("the relay handshake", connecting).await.unwrap();
    assert_eq!(conn.remote_address(), relay_addr);
    let data = payload(1024 * 1024, 5);
    assert!(echo_on(&conn, &data).await == data);
    let s = paths.stats();
    assert!(s.relay_in > 100, "{s:?}");
    assert_eq!((s.channel_in, s.channel_out, s.dropped_foreign, s.dropped_malformed), (0, 0, 0, 0), "{s:?}");
}

/// What one end-to-end connection can make its peer buffer is bounded as a whole, not per
/// stream: a peer that opens many streams and writes to a side that never reads gets no more
/// credit than the connection window (quinn's defaults would grant every stream its own 1.25 MB).
#[tokio::test]
async fn a_peer_that_never_reads_is_sent_no_more_than_the_connection_window() {
    let p = pair().await;
    let hub = p.hub.clone();
    let (hold_tx, _hold_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let conn = hub.accept().await.unwrap().await.unwrap();
        // Accepts every stream and keeps it, unread.
        while let Ok(streams) = conn.accept_bi().await {
            let _ = hold_tx.send(streams);
        }
    });
    let (crypto, _) = tls::quic_client_crypto(&p.app_id, p.hub_key, ALPN_E2E).unwrap();
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(transport());
    let connecting = p.app.connect_with(config, p.app_binding.addr(), tls::SERVER_NAME).unwrap();
    let conn = within("the end-to-end handshake", connecting).await.unwrap();

    let written = Arc::new(AtomicU64::new(0));
    const STREAMS: usize = 40;
    for _ in 0..STREAMS {
        let (conn, written) = (conn.clone(), written.clone());
        tokio::spawn(async move {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let chunk = vec![0x5a; 64 * 1024];
            for _ in 0..16 {
                let mut at = 0;
                while at < chunk.len() {
                    let Ok(n) = send.write(&chunk[at..]).await else { return };
                    at += n;
                    written.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    }
    // Wait until the writers stall: the total stops growing for half a second.
    let mut last = u64::MAX;
    let total = eventually("the writers stall on flow control", || {
        let now = written.load(Ordering::Relaxed);
        let stalled = now == last && now > 0;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            stalled.then_some(now)
        }
    })
    .await;
    let window = u64::from(keyway_path::socket::E2E_CONNECTION_WINDOW);
    println!("{STREAMS} streams x 1 MiB to a peer that never reads: {total} bytes sent (window {window})");
    assert!(total <= window, "sent {total} bytes into a connection window of {window}");
    assert!(total >= window / 2, "sent only {total}: the window is not what it should be");
}
