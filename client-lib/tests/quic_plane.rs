//! The app side of the end-to-end QUIC data plane over real UDP on loopback, against a small
//! test relay and test hub built from real quinn endpoints: the relay answers `ChannelOpen` and
//! forwards channel datagrams inside its socket's `poll_recv`; the hub sits on a path socket
//! whose channel the test relay binds directly (the test plays the hub's control plane).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use keyway_client::{ChannelEnd, Client, ClientConfig, ClientError};
use keyway_path::{bind_path_endpoint, e2e_transport_config, ChannelBinding, Paths};
use keyway_proto::channel::{self, ChannelId};
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::tls::{self, AllowList, AnyKey};
use keyway_proto::{codes, Frame, HubName, Identity, PublicKey, RefusalReason, ALPN_E2E, ALPN_RELAY};
use keyway_test_support::{eventually, fresh_seed, identity, name, payload, within};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Routes = Arc<Mutex<HashMap<ChannelId, (SocketAddr, SocketAddr, ChannelId)>>>;

/// The test relay's socket: channel datagrams are forwarded (source checked, id rewritten),
/// everything else goes to quinn.
#[derive(Debug)]
struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    routes: Routes,
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }
    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }
    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let n = std::task::ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..n {
                let m = meta[i];
                if !channel::is_channel_data(&bufs[i][..m.len]) {
                    bufs.swap(kept, i);
                    meta.swap(kept, i);
                    kept += 1;
                    continue;
                }
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for segment in bufs[i][..m.len].chunks(stride) {
                    let Some((id, _)) = channel::parse(segment) else { continue };
                    let route = self.routes.lock().unwrap().get(&id).copied();
                    let Some((src, dst, out)) = route.filter(|(src, _, _)| *src == m.addr) else { continue };
                    let _ = src;
                    let mut datagram = segment.to_vec();
                    channel::write_header(&mut datagram, out);
                    let _ = self.inner.try_send(&Transmit {
                        destination: dst,
                        ecn: None,
                        contents: &datagram,
                        segment_size: None,
                        src_ip: None,
                    });
                }
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }
    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// What the test relay answers to `ChannelOpen`.
const RELAY_ACCEPTS: u8 = 0;
const RELAY_HUB_OFFLINE: u8 = 1;
/// Refuses with `HubOffline` too, but only once the test adds a permit to `Bed::gate`.
const RELAY_HOLDS_THEN_OFFLINE: u8 = 2;

/// What the test hub answers to `StreamOpen`.
const HUB_ECHOES: u8 = 0;
const HUB_REFUSES: u8 = 1;
const HUB_LIMITS: u8 = 2;
/// Accepts, then runs the hub's half of the pairing exchange (any secret pairs).
const HUB_PAIRS: u8 = 3;

struct Bed {
    relay_addr: SocketAddr,
    relay_key: PublicKey,
    hub_key: PublicKey,
    hub_paths: Paths,
    app_seed: [u8; 32],
    relay_mode: Arc<AtomicU8>,
    hub_mode: Arc<AtomicU8>,
    /// `ChannelOpen`s received.
    channel_requests: Arc<AtomicU64>,
    /// Permits for answers held back in `RELAY_HOLDS_THEN_OFFLINE`.
    gate: Arc<tokio::sync::Semaphore>,
    /// `ChannelOpen`s answered with `ChannelReady`.
    channels_opened: Arc<AtomicU64>,
    /// Channels whose app stream ended (the app finished or reset it).
    channels_ended: Arc<AtomicU64>,
    /// The relay side of every live channel stream, for the test to cut.
    live: Arc<Mutex<Vec<quinn::SendStream>>>,
    /// The hub's end-to-end connections, for the test to close.
    hub_conns: Arc<Mutex<Vec<quinn::Connection>>>,
}

fn loopback(addr: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], addr.port()))
}

async fn bed() -> Bed {
    let (relay_id, hub_id, app_seed) = (identity(), identity(), fresh_seed());
    let app = Identity::from_seed(app_seed);
    let routes: Routes = Arc::default();
    let runtime = quinn::default_runtime().unwrap();
    let inner = runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    let socket = Arc::new(RelaySocket { inner, routes: routes.clone() });
    let crypto = tls::quic_server_crypto(&relay_id, Arc::new(AnyKey), ALPN_RELAY).unwrap();
    let relay = quinn::Endpoint::new_with_abstract_socket(
        tls::endpoint_config(&relay_id),
        Some(quinn::ServerConfig::with_crypto(crypto)),
        socket,
        runtime,
    )
    .unwrap();
    let relay_addr = relay.local_addr().unwrap();

    let crypto =
        tls::quic_server_crypto(&hub_id, Arc::new(AllowList::new([app.public_key()])), ALPN_E2E).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(Arc::new(
        e2e_transport_config(Duration::from_secs(5), Duration::from_secs(30)).unwrap(),
    ));
    let (hub, hub_paths) = bind_path_endpoint(relay_addr, Some(server)).unwrap();
    let hub_addr = loopback(hub.local_addr().unwrap());

    let bed = Bed {
        relay_addr,
        relay_key: relay_id.public_key(),
        hub_key: hub_id.public_key(),
        hub_paths: hub_paths.clone(),
        app_seed,
        relay_mode: Arc::default(),
        hub_mode: Arc::default(),
        channel_requests: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        channels_opened: Arc::default(),
        channels_ended: Arc::default(),
        live: Arc::default(),
        hub_conns: Arc::default(),
    };

    // The relay's control plane: every bi stream of an app connection asks for a channel.
    let (mode, opened, ended, live) =
        (bed.relay_mode.clone(), bed.channels_opened.clone(), bed.channels_ended.clone(), bed.live.clone());
    let (requests, gate) = (bed.channel_requests.clone(), bed.gate.clone());
    tokio::spawn(async move {
        while let Some(incoming) = relay.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let (mode, opened, ended, live, routes, hub_paths) = (
                mode.clone(),
                opened.clone(),
                ended.clone(),
                live.clone(),
                routes.clone(),
                hub_paths.clone(),
            );
            let (requests, gate) = (requests.clone(), gate.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(Frame::ChannelOpen { channel: app_id, .. }) = read_frame(&mut recv).await else {
                        continue;
                    };
                    requests.fetch_add(1, Ordering::SeqCst);
                    let mode = mode.load(Ordering::SeqCst);
                    if mode == RELAY_HOLDS_THEN_OFFLINE {
                        gate.acquire().await.unwrap().forget();
                    }
                    if mode != RELAY_ACCEPTS {
                        let refusal = Frame::refused(RefusalReason::HubOffline, "hub home is offline");
                        write_frame(&mut send, &refusal).await.unwrap();
                        let _ = send.finish();
                        continue;
                    }
                    // The app chose its id; this relay holds no early flight (quinn resends it).
                    let hub_id = ChannelId::random().unwrap();
                    let app_addr = conn.remote_address();
                    routes.lock().unwrap().insert(app_id, (app_addr, hub_addr, hub_id));
                    routes.lock().unwrap().insert(hub_id, (hub_addr, app_addr, app_id));
                    let binding: ChannelBinding = hub_paths.bind(hub_id);
                    write_frame(&mut send, &Frame::ChannelReady { channel: app_id }).await.unwrap();
                    opened.fetch_add(1, Ordering::SeqCst);
                    live.lock().unwrap().push(send);
                    let (routes, ended) = (routes.clone(), ended.clone());
                    tokio::spawn(async move {
                        let _ = recv.read_to_end(1024).await;
                        routes.lock().unwrap().retain(|id, _| *id != app_id && *id != hub_id);
                        drop(binding);
                        ended.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
        }
    });

    // The hub: every stream starts with `StreamOpen`; the mode decides the answer.
    let (mode, conns) = (bed.hub_mode.clone(), bed.hub_conns.clone());
    tokio::spawn(async move {
        while let Some(incoming) = hub.accept().await {
            let Ok(conn) = incoming.await else { continue };
            conns.lock().unwrap().push(conn.clone());
            let mode = mode.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mode = mode.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        assert_eq!(read_frame(&mut recv).await.unwrap(), Frame::StreamOpen);
                        match mode {
                            HUB_REFUSES => {
                                let refusal =
                                    Frame::refused(RefusalReason::ServiceUnavailable, "nothing on 8123");
                                write_frame(&mut send, &refusal).await.unwrap();
                                let _ = send.finish();
                                let _ = recv.stop(codes::NORMAL);
                            }
                            HUB_PAIRS => {
                                write_frame(&mut send, &Frame::StreamAccepted).await.unwrap();
                                let secret = keyway_proto::pairing::read_request(&mut recv).await.unwrap();
                                assert_eq!(secret.as_deref(), Some(&b"0123456789abcdef"[..]));
                                let paired = keyway_proto::pairing::PairStatus::Paired;
                                keyway_proto::pairing::write_answer(&mut send, paired, "").await.unwrap();
                                let _ = send.finish();
                            }
                            HUB_LIMITS => {
                                let _ = send.reset(codes::LIMIT);
                                let _ = recv.stop(codes::LIMIT);
                            }
                            _ => {
                                write_frame(&mut send, &Frame::StreamAccepted).await.unwrap();
                                let _ = tokio::io::copy(&mut recv, &mut send).await;
                                let _ = send.finish();
                            }
                        }
                    });
                }
            });
        }
    });
    bed
}

impl Bed {
    fn client(&self) -> Client {
        let config = ClientConfig::new(Identity::from_seed(self.app_seed), self.relay_addr, self.relay_key);
        Client::new(config).unwrap()
    }
}

fn home() -> HubName {
    name("home")
}

async fn echo(stream: &mut keyway_client::HubStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (written, read) = within("the echo", async { tokio::join!(write, read) }).await;
    written?;
    read?;
    Ok(back)
}

/// The `ClientError` inside an `io::Error` from a stream.
fn typed(e: &std::io::Error) -> &ClientError {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<ClientError>())
        .unwrap_or_else(|| panic!("untyped: {e:?}"))
}

#[tokio::test]
async fn sessions_are_streams_on_one_end_to_end_connection_dialed_once() {
    let bed = bed().await;
    let client = bed.client();
    let data = payload(1024 * 1024, 21);
    let mut first = within("connect", client.connect(&home(), &bed.hub_key)).await.unwrap();
    assert!(!first.resumed(), "the first session dials");
    assert_eq!(echo(&mut first, &data).await.unwrap(), data);

    // Concurrent sessions share the connection: no second channel.
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let (client, key) = (client.clone(), bed.hub_key);
        tasks.push(tokio::spawn(async move {
            let mut s = client.connect(&home(), &key).await.unwrap();
            assert!(s.resumed(), "rides on the connection that is up");
            let data = payload(64 * 1024, i);
            assert_eq!(echo(&mut s, &data).await.unwrap(), data);
        }));
    }
    for t in tasks {
        within("a concurrent session", t).await.unwrap();
    }
    assert_eq!(bed.channels_opened.load(Ordering::SeqCst), 1);
    let stats = client.path_stats();
    assert!(stats.channel_in > 100 && stats.channel_out > 100 && stats.relay_in > 0, "{stats:?}");
    assert_eq!((stats.dropped_foreign, stats.dropped_unknown_channel, stats.bound), (0, 0, 1), "{stats:?}");
    assert_eq!(bed.hub_paths.stats().dropped_unknown_channel, 0);
}

#[tokio::test]
async fn concurrent_first_connects_dial_once() {
    let bed = bed().await;
    let client = bed.client();
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let (client, key) = (client.clone(), bed.hub_key);
        tasks.push(tokio::spawn(async move {
            let mut s = client.connect_pipelined(&home(), &key).await.unwrap();
            let data = payload(1000, i);
            assert_eq!(echo(&mut s, &data).await.unwrap(), data);
        }));
    }
    for t in tasks {
        within("a first session", t).await.unwrap();
    }
    assert_eq!(bed.channels_opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refusals_from_the_relay_and_the_hub_are_typed() {
    let bed = bed().await;
    let client = bed.client();

    bed.relay_mode.store(RELAY_HUB_OFFLINE, Ordering::SeqCst);
    let err = client.connect(&home(), &bed.hub_key).await.unwrap_err();
    assert_eq!(err.refusal(), Some(RefusalReason::HubOffline), "{err}");
    bed.relay_mode.store(RELAY_ACCEPTS, Ordering::SeqCst);

    bed.hub_mode.store(HUB_REFUSES, Ordering::SeqCst);
    let err = client.connect(&home(), &bed.hub_key).await.unwrap_err();
    assert_eq!(err.refusal(), Some(RefusalReason::ServiceUnavailable), "{err}");
    assert!(err.to_string().contains("nothing on 8123"), "{err}");

    // Pipelined: the stream exists at once, the refusal comes with the first read.
    let mut stream = client.connect_pipelined(&home(), &bed.hub_key).await.unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut buf = [0u8; 16];
    let e = within("the refusal", stream.read(&mut buf)).await.unwrap_err();
    assert_eq!(typed(&e).refusal(), Some(RefusalReason::ServiceUnavailable), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

    // A per-app cap: the hub resets the stream with LIMIT.
    bed.hub_mode.store(HUB_LIMITS, Ordering::SeqCst);
    let err = client.connect(&home(), &bed.hub_key).await.unwrap_err();
    assert_eq!(err.refusal(), Some(RefusalReason::OverLimit), "{err}");
    let mut stream = client.connect_pipelined(&home(), &bed.hub_key).await.unwrap();
    let e = within("the reset", stream.read(&mut buf)).await.unwrap_err();
    assert_eq!(typed(&e).refusal(), Some(RefusalReason::OverLimit), "{e}");

    // None of that cost the connection: still one channel, and it still serves.
    bed.hub_mode.store(HUB_ECHOES, Ordering::SeqCst);
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert_eq!(echo(&mut stream, b"still here").await.unwrap(), b"still here");
    assert_eq!(bed.channels_opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_wrong_hub_key_is_a_mismatch_naming_both_keys() {
    let bed = bed().await;
    let client = bed.client();
    let pinned = identity().public_key();
    let err = client.connect(&home(), &pinned).await.unwrap_err();
    match &err {
        ClientError::HubKeyMismatch(m) => assert_eq!((m.expected, m.seen), (pinned, bed.hub_key)),
        other => panic!("expected HubKeyMismatch, got {other:?}"),
    }
    // The failed dial gave its channel back.
    eventually("the channel of the failed dial ends", || async {
        (bed.channels_ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(client.path_stats().bound, 0);
}

#[tokio::test]
async fn a_relay_cut_ends_the_connection_with_its_reason_and_the_next_connect_redials() {
    let bed = bed().await;
    let client = bed.client();
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert_eq!(echo(&mut stream, b"before").await.unwrap(), b"before");
    let mut open = client.connect(&home(), &bed.hub_key).await.unwrap();
    open.write_all(b"x").await.unwrap();

    // The relay revokes: it resets the app's channel stream with REVOKED.
    for mut send in bed.live.lock().unwrap().drain(..) {
        send.reset(codes::REVOKED).unwrap();
    }
    let mut buf = vec![0u8; 16];
    let e = loop {
        match within("the cut", open.read(&mut buf)).await {
            Ok(0) => panic!("the stream ended cleanly instead of with the cut"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(typed(&e), ClientError::ChannelEnded(ChannelEnd::Revoked)), "{e}");
    eventually("the app ends its channel stream and unbinds", || async {
        let ended = bed.channels_ended.load(Ordering::SeqCst) == 1;
        (ended && client.path_stats().bound == 0).then_some(())
    })
    .await;

    let mut again = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert!(!again.resumed(), "a new end-to-end connection");
    assert_eq!(echo(&mut again, b"after").await.unwrap(), b"after");
    assert_eq!(bed.channels_opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_hub_that_closes_with_revoked_gives_a_typed_error_and_the_channel_is_released() {
    let bed = bed().await;
    let client = bed.client();
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    stream.read_exact(&mut one).await.unwrap();
    for conn in bed.hub_conns.lock().unwrap().iter() {
        conn.close(codes::REVOKED, b"revoked");
    }
    let e = loop {
        match within("the close", stream.read(&mut one)).await {
            Ok(0) => panic!("ended cleanly"),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(typed(&e), ClientError::Revoked), "{e}");
    eventually("the app finishes its channel stream", || async {
        (bed.channels_ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(client.path_stats().bound, 0);
}

#[tokio::test]
async fn callers_queued_behind_a_refused_dial_get_its_refusal_without_asking_again() {
    let bed = bed().await;
    let client = bed.client();
    bed.relay_mode.store(RELAY_HOLDS_THEN_OFFLINE, Ordering::SeqCst);
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, key, started) = (client.clone(), bed.hub_key, started.clone());
        tasks.push(tokio::spawn(async move {
            started.fetch_add(1, Ordering::SeqCst);
            client.connect(&home(), &key).await
        }));
    }
    eventually("the first dial reaches the relay and every caller has queued", || async {
        let asked = bed.channel_requests.load(Ordering::SeqCst) == 1;
        (asked && started.load(Ordering::SeqCst) == 20).then_some(())
    })
    .await;
    bed.gate.add_permits(1);
    for t in tasks {
        let err = within("a refused connect", t).await.unwrap().unwrap_err();
        assert_eq!(err.refusal(), Some(RefusalReason::HubOffline), "{err}");
    }
    assert_eq!(bed.channel_requests.load(Ordering::SeqCst), 1, "one question for twenty callers");

    // A caller that comes after the refusal asks again.
    bed.relay_mode.store(RELAY_ACCEPTS, Ordering::SeqCst);
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert_eq!(echo(&mut stream, b"back").await.unwrap(), b"back");
}

#[tokio::test]
async fn dropping_the_client_and_its_streams_closes_the_connection_and_its_channel() {
    let bed = bed().await;
    let client = bed.client();
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert_eq!(echo(&mut stream, b"once").await.unwrap(), b"once");
    drop(client);
    // The stream still holds the connection: the channel lives on.
    let mut again = [0u8; 1];
    assert_eq!(stream.read(&mut again).await.unwrap(), 0, "the echo's end, not an error");
    assert_eq!(bed.channels_ended.load(Ordering::SeqCst), 0);
    drop(stream);
    eventually("the channel ends once nothing uses the connection", || async {
        (bed.channels_ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let conns = bed.hub_conns.lock().unwrap().clone();
    for conn in conns {
        within("the hub sees the close", conn.closed()).await;
    }
}

#[tokio::test]
async fn pairing_runs_on_a_connection_of_its_own_closed_when_done() {
    let bed = bed().await;
    let client = bed.client();
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert_eq!(echo(&mut stream, b"cached").await.unwrap(), b"cached");

    bed.hub_mode.store(HUB_PAIRS, Ordering::SeqCst);
    let code = keyway_client::PairingCode {
        relay: bed.relay_addr.to_string(),
        relay_key: bed.relay_key,
        hub: home(),
        hub_key: bed.hub_key,
        secret: b"0123456789abcdef".to_vec(),
    };
    let paired = within("pairing", keyway_client::pairing::pair_with(&client, &code)).await.unwrap();
    assert_eq!((paired.hub, paired.hub_key), (home(), bed.hub_key));
    assert_eq!(
        bed.channels_opened.load(Ordering::SeqCst),
        2,
        "pairing does not ride on the cached connection"
    );
    eventually("the pairing connection is closed and its channel ends", || async {
        (bed.channels_ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The cached connection is untouched.
    bed.hub_mode.store(HUB_ECHOES, Ordering::SeqCst);
    let mut stream = client.connect(&home(), &bed.hub_key).await.unwrap();
    assert!(stream.resumed());
    assert_eq!(echo(&mut stream, b"still").await.unwrap(), b"still");
}
