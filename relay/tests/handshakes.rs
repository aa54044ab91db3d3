//! Half-open handshakes against a relay with its default limits: a prober sends client
//! Initials from a few addresses and never its second flight, while a hub registers and an app
//! is served. The prober stays under every rate limit (10 sources, each under
//! `new_connections_per_ip`; all together under `retry_threshold`), so only the bounds on
//! handshakes in flight stand between it and the relay's handshake slots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Sources the prober sends from (all of 127/8 is loopback on Linux).
const SOURCES: u8 = 10;
/// Initials per second from each source: under the default `new_connections_per_ip` (10/s),
/// and all sources together under the default `retry_threshold` (100/s).
const PER_SOURCE_PER_SECOND: u32 = 9;
/// Attempts the legitimate client makes while the prober runs; each must be served.
const ATTEMPTS: usize = 5;

/// Sends client Initials (a real ClientHello each, from quinn-proto) and never anything after.
struct Prober {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(relay: SocketAddr, relay_key: PublicKey) -> Self {
        let (stop, sent, bytes) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let sockets: Vec<UdpSocket> = (0..SOURCES)
            .map(|i| UdpSocket::bind(("127.0.0.".to_owned() + &(20 + i).to_string(), 0)).unwrap())
            .collect();
        let thread = {
            let (stop, sent, bytes): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&bytes));
            std::thread::spawn(move || {
                let mut endpoint = quinn_proto::Endpoint::new(Default::default(), None, false, None);
                let config = raw::client_config(&identity(), relay_key).unwrap();
                let period = Duration::from_secs(1) / PER_SOURCE_PER_SECOND;
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let round = Instant::now();
                    for socket in &sockets {
                        let (_, mut conn) = endpoint
                            .connect(round, config.clone(), relay, keyway_proto::tls::SERVER_NAME)
                            .unwrap();
                        buf.clear();
                        let transmit = conn.poll_transmit(round, 1, &mut buf).expect("a client Initial");
                        if socket.send_to(&buf[..transmit.size], relay).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(transmit.size as u64, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(period.saturating_sub(round.elapsed()));
                }
            })
        };
        Self { stop, sent, bytes, thread: Some(thread) }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_under_the_rate_limits_leave_room_for_a_hub_and_its_app() {
    let (hub_id, app_id) = (identity(), identity());
    let relay = closed_relay(&[("home", hub_id.public_key())]).await;
    let h = &relay.handle;
    let started = Instant::now();
    let prober = Prober::start(h.local_addr(), h.public_key());
    // Past the default `max_handshakes_in_flight` (256) Initials: enough to take every slot if
    // nothing but that cap bounds them.
    eventually("the prober has sent 300 Initials", || async { (prober.sent() >= 300).then_some(()) }).await;

    let stats = h.stats();
    let endpoint = raw::endpoint();
    let mut refused = Vec::new();
    for attempt in 0..ATTEMPTS {
        let at = Instant::now();
        match raw::dial(&endpoint, h.local_addr(), h.public_key(), &identity()).await {
            Ok(conn) => {
                println!("attempt {attempt}: handshake in {:?}", at.elapsed());
                conn.close(0u32.into(), b"");
            }
            Err(e) => refused.push(format!("attempt {attempt}: {e}")),
        }
    }
    let in_flight = stats.handshakes_in_flight();
    assert!(
        refused.is_empty(),
        "legitimate connections refused under half-open handshakes ({in_flight} in flight): {refused:?}"
    );

    // A hub registers and an app is served through it, all while the prober runs.
    let at = Instant::now();
    let (hub, _control) = registered_hub(h, &hub_id, "home", &[app_id.public_key()]).await;
    let registered_in = at.elapsed();
    let app = connect(h, &app_id).await;
    let (_send, mut recv) = open_session(&app, "home", hub_id.public_key(), SessionPurpose::Connect).await;
    let _accepted = hub_accepts(&hub).await;
    assert!(
        matches!(within("ChannelReady", read_frame(&mut recv)).await.unwrap(), Frame::ChannelReady { .. }),
        "the app's channel is ready"
    );
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "prober: {} Initials, {:.0} bytes/s from {SOURCES} sources; {in_flight} handshakes in flight; \
         hub registered in {registered_in:?}",
        prober.sent(),
        prober.bytes.load(Ordering::Relaxed) as f64 / seconds
    );
}
