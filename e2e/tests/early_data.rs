//! Warm sessions and 0-RTT early data against a real relay and hub over real UDP, with a tap on
//! each leg: the app's (to see what it sends, and whether any of it is early data) and the
//! hub's (to capture a first flight and replay it as a hostile relay would).
//!
//! The local service counts the requests it receives: "once" is checked there, at the end that
//! matters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_client::{Client, ClientConfig, ClientError};
use keyway_e2e::*;
use keyway_proto::channel;
use keyway_test_support::tap::{long_packets, LongPacket, Tap, Way};
use keyway_test_support::{eventually, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A service that answers each connection's one request line with `ok` and counts them.
async fn counting_service() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind service");
    let addr = listener.local_addr().expect("service addr");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while tcp.read(&mut byte).await.unwrap_or(0) == 1 {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = tcp.write_all(b"ok\n").await;
                        break;
                    }
                }
            });
        }
    });
    (addr, served)
}

/// What the service answers to one request.
async fn answer(stream: &mut keyway_client::HubStream) -> Vec<u8> {
    let mut back = [0u8; 3];
    within("the service's answer", stream.read_exact(&mut back)).await.expect("answer");
    back.to_vec()
}

/// The long-header packets inside channel datagrams.
fn packets(datagrams: &[Vec<u8>]) -> Vec<LongPacket> {
    datagrams.iter().filter_map(|d| channel::parse(d)).flat_map(|(_, packet)| long_packets(packet)).collect()
}

struct Bed {
    relay: TestRelay,
    hub: keyway_hub::HubHandle,
    apps_file: std::path::PathBuf,
    hub_key: keyway_proto::PublicKey,
    app_tap: Tap,
    hub_tap: Tap,
    served: Arc<AtomicUsize>,
    client: Client,
}

async fn bed() -> Bed {
    let (hub_id, app_id) = (identity(), identity());
    let relay = TestRelay::start(&[("home", hub_id.public_key())]).await;
    let (service, served) = counting_service().await;
    let (app_tap, hub_tap) = (Tap::start(relay.addr()).await, Tap::start(relay.addr()).await);
    let apps_file = relay.dir.path().join("authorized_apps.early");
    write_apps(&apps_file, &[app_id.public_key()]);
    let hub_key = hub_id.public_key();
    let config = keyway_hub::HubConfig::new(
        hub_tap.addr(),
        relay.key(),
        name("home"),
        hub_id,
        apps_file.clone(),
        service,
    );
    let hub = keyway_hub::start(config).await.expect("hub starts");
    hub.wait_registered(PATIENCE).await.expect("hub registers");
    let client = Client::new(ClientConfig::new(app_id, app_tap.addr(), relay.key())).expect("client");
    Bed { relay, hub, apps_file, hub_key, app_tap, hub_tap, served, client }
}

impl Bed {
    /// One request on a plain `connect` (no early data asked for).
    async fn request(&self) {
        let mut stream = self.client.connect(&name("home"), &self.hub_key).await.expect("connect");
        stream.write_all(b"GET\n").await.expect("request");
        assert_eq!(answer(&mut stream).await, b"ok\n");
        assert!(!stream.early_data());
    }

    async fn disconnect(&self) {
        self.client.disconnect(&name("home"), &self.hub_key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_only_when_asked_and_a_replayed_first_flight_reaches_the_service_once() {
    let bed = bed().await;
    let stats = bed.hub.stats();
    // A full handshake; the hub's tickets arrive with it.
    bed.request().await;
    bed.disconnect().await;
    assert_eq!(stats.resumed(), 0);

    // Resumed with a ticket, but nothing asked for early data: no 0-RTT packet leaves the app.
    bed.app_tap.clear();
    bed.request().await;
    assert_eq!(stats.resumed(), 1, "the second connection resumes");
    let sent = packets(&bed.app_tap.seen(Way::ToRelay));
    assert!(sent.contains(&LongPacket::Initial), "the dial went through the tap: {sent:?}");
    assert!(!sent.contains(&LongPacket::ZeroRtt), "0-RTT without the opt-in: {sent:?}");
    bed.disconnect().await;

    // Asked for: the request travels as early data and is served once.
    bed.app_tap.clear();
    bed.hub_tap.clear();
    let mut stream =
        bed.client.connect_early(&name("home"), &bed.hub_key, b"GET\n").await.expect("connect_early");
    assert_eq!(answer(&mut stream).await, b"ok\n");
    assert!(stream.early_data(), "the hub took the early data");
    assert!(packets(&bed.app_tap.seen(Way::ToRelay)).contains(&LongPacket::ZeroRtt));
    assert_eq!(bed.served.load(Ordering::SeqCst), 3);
    // The first flight as the hub received it: the Initial with the ticket, and the 0-RTT.
    let flight: Vec<Vec<u8>> = bed
        .hub_tap
        .seen(Way::FromRelay)
        .into_iter()
        .filter(|d| {
            let kinds = packets(std::slice::from_ref(d));
            kinds.contains(&LongPacket::Initial) || kinds.contains(&LongPacket::ZeroRtt)
        })
        .collect();
    assert!(packets(&flight).contains(&LongPacket::ZeroRtt), "captured the early data");
    drop(stream);
    bed.disconnect().await;

    // A new connection, so the hub has a live channel to replay into.
    bed.hub_tap.clear();
    bed.request().await;
    assert_eq!(bed.served.load(Ordering::SeqCst), 4);
    let resumed = stats.resumed();
    let live = bed.hub_tap.seen(Way::FromRelay);
    let (live_id, _) =
        channel::parse(live.last().expect("datagrams of the new channel")).expect("channel data");

    // The hostile relay: the captured flight again, into the old channel and into the live
    // one, until the hub's quinn has forgotten the original connection (while it drains, its
    // Initial's connection ID still routes to it) and takes the replayed Initial as a new
    // attempt: it answers with a handshake of its own, not resumed, as the ticket is used up.
    eventually("the hub answers the replayed Initial", || async {
        bed.hub_tap.clear();
        for datagram in &flight {
            bed.hub_tap.inject(datagram).await;
            let mut rewritten = datagram.clone();
            assert!(channel::write_header(&mut rewritten, live_id));
            bed.hub_tap.inject(&rewritten).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        packets(&bed.hub_tap.seen(Way::ToRelay)).contains(&LongPacket::Handshake).then_some(())
    })
    .await;
    // ...which the replayer cannot complete; its early data was never read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.resumed(), resumed, "the replay resumed nothing");
    assert_eq!(bed.served.load(Ordering::SeqCst), 4, "the replayed request never reached the service");
    // And the app's live connection is unharmed.
    bed.request().await;
    drop(bed.relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_app_holding_a_ticket_gets_no_early_data_to_the_service() {
    let bed = bed().await;
    bed.request().await;
    bed.disconnect().await;
    write_apps(&bed.apps_file, &[]);
    bed.hub.reload_apps().expect("reload");
    let err = within("the revoked attempt", bed.client.connect_early(&name("home"), &bed.hub_key, b"GET\n"))
        .await
        .map(|mut stream| async move {
            // Refused after the stream was handed out: the read says so.
            let mut buf = [0u8; 3];
            stream.read_exact(&mut buf).await.map(|_| buf)
        });
    // Which refusal depends on who learns of the revocation first: the relay (refused before
    // the hub hears of the app), the hub's TLS (when it does not resume: the early data turned
    // down, the key turned away in the full handshake) or its re-check of a resumed key.
    match err {
        Err(e) => assert!(
            matches!(e, ClientError::Refused { .. } | ClientError::Revoked | ClientError::HubRejected(_)),
            "typed refusal: {e}"
        ),
        Ok(read) => {
            let read = within("the refusal", read).await;
            assert!(read.is_err(), "a revoked app was answered: {read:?}");
        }
    }
    assert_eq!(bed.served.load(Ordering::SeqCst), 1, "the revoked app's request reached the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyway_forward_sends_early_data_only_with_its_option() {
    let bed = bed().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let local = listener.local_addr().expect("local addr");
    let options = keyway_client::forward::Options { early_data: true };
    let forwarder = tokio::spawn(keyway_client::forward::run_with(
        bed.client.clone(),
        name("home"),
        bed.hub_key,
        listener,
        options,
        std::future::pending(),
    ));
    let get = || async {
        let mut tcp = tokio::net::TcpStream::connect(local).await.expect("connect forwarder");
        tcp.write_all(b"GET\n").await.expect("request");
        let mut back = [0u8; 3];
        within("answer through the forwarder", tcp.read_exact(&mut back)).await.expect("answer");
        assert_eq!(&back, b"ok\n");
    };
    // The first connection is a full handshake; the second, on a new end-to-end connection,
    // resumes and carries the request as early data.
    get().await;
    bed.client.disconnect(&name("home"), &bed.hub_key).await;
    bed.app_tap.clear();
    get().await;
    assert!(packets(&bed.app_tap.seen(Way::ToRelay)).contains(&LongPacket::ZeroRtt), "no early data");
    assert_eq!(bed.served.load(Ordering::SeqCst), 2);
    forwarder.abort();
}
