//! What strangers with fresh keys can make the shipped relay binary hold during their grace,
//! with its default limits: streams that each start a large frame and never finish it, and
//! DATAGRAM frames the relay never reads. The relay's RSS growth per attacking connection is
//! measured from `/proc` and must stay far below the frame and window sizes such an attacker
//! asks for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyway_proto::codec::{kind, PROTOCOL_VERSION};
use keyway_proto::Identity;
use keyway_test_support::child::Lines;
use keyway_test_support::raw;

const BIN: &str = env!("CARGO_BIN_EXE_keyway-relay");
/// Attacking connections, each with a key of its own: under every per-source limit.
const STRANGERS: usize = 10;
/// Streams each stranger tries to open (the relay's `max_streams_per_connection`).
const STREAMS: usize = 256;
/// The payload one unfinished frame announces and mostly sends: the largest the wire allowed
/// for every frame type before types had their own maximum.
const ANNOUNCED: usize = 64 * 1024;
const SENT: usize = ANNOUNCED - 1024;
/// Unread DATAGRAM frames each stranger sends, where the relay allows them.
const DATAGRAMS: usize = 1000;

/// Kills the child even when an assertion fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One stranger: a fresh key, its streams each holding an unfinished frame, and datagrams.
/// Returns the bytes it handed to its connection.
async fn stranger(
    relay: std::net::SocketAddr,
    key: keyway_proto::PublicKey,
) -> (quinn::Endpoint, quinn::Connection, u64) {
    let (endpoint, conn) = raw::connect(relay, key, &Identity::generate().unwrap()).await;
    let mut spent = 0u64;
    if let Some(max) = conn.max_datagram_size() {
        let datagram = vec![0x41u8; max.min(1200)];
        for _ in 0..DATAGRAMS {
            if conn.send_datagram(datagram.clone().into()).is_ok() {
                spent += datagram.len() as u64;
            }
        }
    }
    for _ in 0..STREAMS {
        let conn = conn.clone();
        spent += (6 + SENT) as u64;
        tokio::spawn(async move {
            let Ok((mut send, _recv)) = conn.open_bi().await else { return };
            let mut frame = vec![PROTOCOL_VERSION, kind::PING];
            frame.extend((ANNOUNCED as u32).to_be_bytes());
            frame.resize(6 + SENT, 0);
            let _ = send.write_all(&frame).await;
            // Hold the stream open, its frame unfinished.
            std::future::pending::<()>().await;
        });
    }
    (endpoint, conn, spent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_with_unfinished_frames_and_unread_datagrams_pin_little_of_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Running(
        Command::new(BIN)
            .arg("run")
            .current_dir(dir.path())
            .env("KEYWAY_RELAY_LISTEN", "127.0.0.1:0")
            .env_remove("KEYWAY_RELAY_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = Lines::new(relay.0.stdout.take().unwrap());
    lines.until("the start-up lines", |l| l.contains("keyway-hub run").then_some(()));
    let all = lines.into_seen().join("\n");
    let word_after = |prefix: &str| {
        all.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let udp: std::net::SocketAddr = word_after("keyway-relay listening on ").parse().unwrap();
    let key: keyway_proto::PublicKey = word_after("relay public key: ").parse().unwrap();
    let pid = relay.0.id();

    // A first stranger that leaves at once warms up the relay's allocations.
    drop(stranger(udp, key).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let started = Instant::now();
    let mut held = Vec::new();
    let mut spent = 0;
    for _ in 0..STRANGERS {
        let (endpoint, conn, bytes) = stranger(udp, key).await;
        spent += bytes;
        held.push((endpoint, conn));
    }
    // Within the default 10 s grace: sample the peak for 4 s.
    let mut peak = before;
    while started.elapsed() < Duration::from_secs(4) {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_connection = (peak.saturating_sub(before)) / STRANGERS as u64;
    let streams: u64 = held.iter().map(|(_, c)| c.stats().frame_tx.stream).sum();
    println!(
        "relay RSS {before} KiB before, {peak} KiB peak with {STRANGERS} strangers: {per_connection} KiB per \
         connection; strangers handed over {} KiB, sent {streams} STREAM frames, {:.0} KiB/s on the wire",
        spent / 1024,
        held.iter().map(|(_, c)| c.stats().udp_tx.bytes).sum::<u64>() as f64 / 1024.0 / started.elapsed().as_secs_f64()
    );
    assert!(
        per_connection < 1024,
        "a stranger pins {per_connection} KiB of the relay (RSS {before} -> {peak} KiB for {STRANGERS})"
    );
}
