//! Hostile input against a real relay process while a legitimate hub keeps serving.
//!
//! Attackers, one after another while the session is measured: garbage QUIC Initials and a
//! flood of real handshakes that never authenticate, handshakes with random keys followed by
//! garbage / oversized / truncated frames, slowloris streams that never finish a header, claims
//! of a name they do not own, a replayed session-open, and an unauthorized app at a high rate.
//! Every attack must end in a typed refusal (or a refused connection) and be counted in
//! `/metrics`; the legitimate session must keep flowing byte-exact; relay memory stays bounded.
//! The legitimate throughput before and during the attack is printed as a JSON line (a
//! measurement for the closing report, not an assertion).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_e2e::raw::{dial, encode, endpoint, send_raw};
use keyway_e2e::*;
use keyway_hub::HubConfig;
use keyway_proto::codec::{Frame, SessionPurpose};
use keyway_proto::RefusalReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Streams pseudo-random bytes through the tunnel and verifies the echo as it arrives.
struct SteadySession {
    echoed: Arc<AtomicU64>,
    corrupt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadySession {
    async fn start(stream: keyway_client::HubStream) -> Self {
        let (mut r, mut w) = tokio::io::split(stream);
        let echoed = Arc::new(AtomicU64::default());
        let corrupt = Arc::new(AtomicBool::default());
        let stop = Arc::new(AtomicBool::default());
        let stop_w = stop.clone();
        let writer = tokio::spawn(async move {
            let mut offset = 0u64;
            while !stop_w.load(Ordering::Relaxed) {
                let block = payload(64 * 1024, offset / (64 * 1024) + 1);
                if w.write_all(&block).await.is_err() {
                    return;
                }
                offset += block.len() as u64;
            }
            let _ = w.shutdown().await;
        });
        let (echoed_r, corrupt_r) = (echoed.clone(), corrupt.clone());
        let reader = tokio::spawn(async move {
            let mut block_no = 1u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read_exact(&mut buf).await {
                    Ok(_) => {
                        if buf != payload(64 * 1024, block_no) {
                            corrupt_r.store(true, Ordering::Relaxed);
                        }
                        block_no += 1;
                        echoed_r.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        });
        Self { echoed, corrupt, stop, tasks: vec![writer, reader] }
    }

    /// Bytes echoed back during `window`, as Mbit/s.
    async fn measure(&self, window: Duration) -> (u64, f64) {
        let before = self.echoed.load(Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(window).await;
        let bytes = self.echoed.load(Ordering::Relaxed) - before;
        (bytes, bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
    }
}

/// Real handshakes in the unauthenticated flood.
const HANDSHAKE_FLOOD: u64 = 2000;
/// Replays of the legitimate app's session-open from an unauthorized key.
const REPLAYS: u64 = 300;

#[derive(Default, Debug)]
struct Outcomes {
    refused: std::collections::BTreeMap<String, u64>,
    /// Handshakes refused before any crypto (per-IP limit).
    connection_refused: u64,
    /// Handshakes that started and failed (the attacker's wrong pin).
    handshake_failed: u64,
    other: Vec<String>,
}

impl Outcomes {
    fn frame(
        &mut self,
        attack: &str,
        result: Result<Frame, keyway_proto::io::FrameIoError>,
        expected: &[RefusalReason],
    ) {
        match result {
            Ok(Frame::Refused { reason, .. }) if expected.contains(&reason) => {
                *self.refused.entry(reason.label().to_owned()).or_default() += 1
            }
            other => self.other.push(format!("{attack}: {other:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_are_refused_counted_and_the_legitimate_session_keeps_flowing() {
    let (hub_id, app_id) = (identity(), identity());
    // The frame-level attackers use connections dialed before the handshake flood; the grace
    // that ends strangers' connections (tested in strangers.rs) must not end them mid-attack.
    let mut relay = RelayProcess::start(
        &[("home", hub_id.public_key())],
        &["--session-open-timeout", "1s", "--unauthorized-grace", "10m"],
    );
    relay.wait_ready().await;
    let pid = relay.bin.child.id();

    // The legitimate hub and app, through the library, as a real deployment would.
    let service = echo_service(b"").await;
    let dir = tempfile::tempdir().unwrap();
    let apps_file = dir.path().join("authorized_apps");
    write_apps(&apps_file, &[app_id.public_key()]);
    let config = HubConfig::new(relay.addr, relay.key, name("home"), hub_id.duplicate(), apps_file, service);
    let hub = keyway_hub::start(config).await.unwrap();
    hub.wait_registered(PATIENCE).await.unwrap();
    let app = keyway_client::Client::new(keyway_client::ClientConfig::new(
        app_id.duplicate(),
        relay.addr,
        relay.key,
    ))
    .unwrap();
    let stream = app.connect(&name("home"), &hub_id.public_key()).await.unwrap();
    let steady = SteadySession::start(stream).await;
    let rss_before = rss_kib(pid).unwrap();
    let (_, baseline_mbps) = steady.measure(Duration::from_secs(2)).await;

    // All attacks run one after another in one task while the legitimate session is measured
    // over exactly the attack's duration.
    let relay_addr = relay.addr;
    let relay_key = relay.key;
    let hub_key = hub_id.public_key();
    let legit_open = encode(&Frame::ChannelOpen {
        hub: name("home"),
        hub_key,
        purpose: SessionPurpose::Connect,
        channel: keyway_proto::channel::ChannelId::random().expect("channel id"),
    });
    let echoed_before = steady.echoed.load(Ordering::Relaxed);
    let attack_started = Instant::now();
    let outcomes = tokio::spawn(async move {
        let mut out = Outcomes::default();
        let ep = endpoint();

        // The connections the frame-level attackers need are dialed first (with fresh random
        // keys: anyone may complete a handshake with the relay), because the handshake flood
        // below exhausts this source address's new-connection budget, which is the point of it.
        let mut conns = Vec::new();
        for _ in 0..10 {
            match dial(&ep, relay_addr, relay_key, &identity()).await {
                Ok(conn) => conns.push(conn),
                Err(e) => out.other.push(format!("attacker handshake within the per-IP burst: {e}")),
            }
        }
        if conns.len() < 10 {
            return out;
        }
        let [malformed_conns @ .., slowloris, claims_a, claims_b, replay] = &conns[..] else {
            unreachable!("ten connections");
        };

        // 1. Garbage that looks like QUIC Initials, then real handshakes that never
        //    authenticate: the client pins a key the relay does not have and aborts.
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..3000u64 {
            let mut packet = payload(1200, i + 7);
            packet[0] = 0xc0 | (packet[0] & 0x0f); // long header, Initial
            packet[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
            let _ = udp.send_to(&packet, relay_addr).await;
        }
        let wrong_pin = identity().public_key();
        let flood = ep.clone();
        let mut handshakes = tokio::task::JoinSet::new();
        for _ in 0..HANDSHAKE_FLOOD {
            let flood = flood.clone();
            handshakes.spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    dial(&flood, relay_addr, wrong_pin, &identity()),
                )
                .await
            });
        }
        while let Some(attempt) = handshakes.join_next().await {
            match attempt.unwrap() {
                Ok(Ok(_)) => out.other.push("a handshake with a wrong pin succeeded".into()),
                Ok(Err(e)) if e.to_string().contains("refused") => out.connection_refused += 1,
                Ok(Err(_)) => out.handshake_failed += 1,
                Err(_) => out.other.push("a flood handshake hung".into()),
            }
        }

        // 2. Garbage, oversized and truncated frames, each on a fresh stream.
        const V: u8 = keyway_proto::codec::PROTOCOL_VERSION;
        const OPEN: u8 = 11; // ChannelOpen
        let mut oversized = vec![V, 1];
        oversized.extend(u32::MAX.to_be_bytes());
        let malformed: [(&[u8], RefusalReason); 5] = [
            (b"GET / HTTP/1.1\r\n\r\n", RefusalReason::UnsupportedVersion),
            (&oversized, RefusalReason::BadFrame),
            (&[V, OPEN, 0, 0, 0, 40, 4, b'h', b'o'], RefusalReason::BadFrame), // truncated, then FIN
            (&[V, OPEN, 0], RefusalReason::BadFrame),                          // truncated header
            (&[V, 99, 0, 0, 0, 0], RefusalReason::BadFrame),                   // unknown frame type
        ];
        for conn in malformed_conns {
            for _ in 0..10 {
                for (bytes, reason) in &malformed {
                    out.frame("malformed frame", send_raw(conn, bytes, true).await, &[*reason]);
                }
            }
        }

        // 3. Slowloris: as many streams as the relay allows, each starting a header and never
        //    finishing it; each is refused when the session-open timeout expires.
        let mut pending = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let conn = slowloris.clone();
            pending.spawn(async move { send_raw(&conn, &[1], false).await });
        }
        while let Some(p) = pending.join_next().await {
            out.frame("slowloris", p.unwrap(), &[RefusalReason::ProtocolViolation]);
        }

        // 4. Claims of a name the attacker does not own (closed policy: the name is listed
        //    with the legitimate hub's key, so the answer says it is claimed).
        for conn in [claims_a, claims_b] {
            let register =
                encode(&Frame::Register { name: name("home"), allowed_apps: vec![], pairing_open: false });
            out.frame("name claim", send_raw(conn, &register, false).await, &[RefusalReason::NameClaimed]);
        }

        // 5. The legitimate app's session-open replayed byte for byte from another key, which
        //    is also 6. an unauthorized app opening sessions as fast as it can.
        for _ in 0..REPLAYS {
            out.frame(
                "replayed open",
                send_raw(replay, &legit_open, true).await,
                &[RefusalReason::AppNotAuthorized],
            );
        }
        for conn in &conns {
            conn.close(0u32.into(), b"done");
        }
        out
    })
    .await
    .unwrap();
    let attack_secs = attack_started.elapsed().as_secs_f64();
    let attack_bytes = steady.echoed.load(Ordering::Relaxed) - echoed_before;
    let attack_mbps = attack_bytes as f64 * 8.0 / attack_secs / 1e6;
    let rss_after = rss_kib(pid).unwrap();

    // The legitimate session kept flowing, byte-exact.
    assert!(attack_bytes > 0, "legitimate session stalled during the attack");
    assert!(!steady.corrupt.load(Ordering::Relaxed), "legitimate session corrupted");
    println!(
        "{{\"measurement\":\"adversarial\",\"baseline_mbps\":{baseline_mbps:.1},\"under_attack_mbps\":{attack_mbps:.1},\
         \"ratio\":{:.3},\"attack_seconds\":{attack_secs:.1},\"rss_before_kib\":{rss_before},\"rss_after_kib\":{rss_after}}}",
        attack_mbps / baseline_mbps.max(f64::MIN_POSITIVE)
    );

    // Every attack got the right typed answer.
    eprintln!("attack outcomes: {outcomes:?}");
    assert!(outcomes.other.is_empty(), "unexpected outcomes: {:#?}", outcomes.other);
    let typed = |label: &str| outcomes.refused.get(label).copied().unwrap_or(0);
    assert_eq!(typed("unsupported_version"), 6 * 10);
    assert_eq!(typed("bad_frame"), 6 * 10 * 4);
    assert_eq!(typed("protocol_violation"), 64);
    assert_eq!(typed("name_claimed"), 2);
    assert_eq!(typed("app_not_authorized"), REPLAYS);
    assert_eq!(outcomes.connection_refused + outcomes.handshake_failed, HANDSHAKE_FLOOD);
    assert!(outcomes.connection_refused > 0, "the per-IP connection limit never refused the flood");

    // ...and was counted by reason in /metrics.
    let text = scrape(relay.metrics).unwrap();
    for (label, count) in &outcomes.refused {
        let counted = metric(&text, "keyway_relay_refusals_total", &[("reason", label)]);
        assert!(counted >= *count as f64, "{label}: {count} refusals seen, {counted} counted");
    }
    let per_ip = metric(&text, "keyway_relay_limit_hits_total", &[("limit", "new_connections_per_ip")]);
    assert!(per_ip >= outcomes.connection_refused as f64, "per-IP refusals: {per_ip} counted");
    let failed = metric(&text, "keyway_relay_handshakes_total", &[("role", "quic"), ("result", "failed")]);
    assert!(failed >= outcomes.handshake_failed as f64, "failed handshakes: {failed} counted");
    // Memory stays bounded: generous ceiling on growth (handshake state is freed).
    assert!(rss_after < rss_before + 256 * 1024, "relay RSS grew from {rss_before} to {rss_after} KiB");

    // The legitimate app still gets new sessions after the storm.
    app.connect(&name("home"), &hub_id.public_key()).await.expect("legitimate session after the attack");
    steady.stop.store(true, Ordering::Relaxed);
    for t in steady.tasks {
        t.abort();
    }
    let _ = relay.bin.child.kill();
}
