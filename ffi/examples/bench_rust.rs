//! The Rust side of `bindings/bench/bench.py`: the same measurements as the Python binding
//! makes, through `keyway_client` directly, so the two differ only by the binding layer.
//!
//! `bench_rust RELAY RELAY_KEY HUB HUB_KEY KEY_FILE BYTES SETUPS` prints one JSON object:
//! the first connect (relay and end-to-end handshakes), the median of `SETUPS` further
//! connects (a stream on the warm end-to-end connection: one round trip to the hub), and the
//! throughput of reading `BYTES` from the service (which, sent `s`, sends that many bytes and
//! closes).

use std::time::{Duration, Instant};

use keyway_client::{Client, ClientConfig};
use keyway_proto::{HubName, Identity, PublicKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One read's buffer: what the Python side asks for per `read` (the binding's maximum).
const READ: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("usage: bench_rust RELAY RELAY_KEY HUB HUB_KEY KEY_FILE BYTES SETUPS")]
    Usage,
    #[error(transparent)]
    Client(#[from] keyway_client::ClientError),
    #[error(transparent)]
    Identity(#[from] keyway_proto::IdentityError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the service sent {got} bytes, not {want}")]
    Short { got: u64, want: u64 },
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [relay, relay_key, hub, hub_key, key_file, bytes, setups] = args.as_slice() else {
        return Err(BenchError::Usage);
    };
    let relay = relay.parse().map_err(|_| BenchError::Usage)?;
    let relay_key: PublicKey = relay_key.parse()?;
    let hub: HubName = hub.parse().map_err(|_| BenchError::Usage)?;
    let hub_key: PublicKey = hub_key.parse()?;
    let bytes: u64 = bytes.parse().map_err(|_| BenchError::Usage)?;
    let setups: usize = setups.parse().map_err(|_| BenchError::Usage)?;
    let identity = Identity::load(std::path::Path::new(key_file))?;
    let client = Client::new(ClientConfig::new(identity, relay, relay_key))?;

    let started = Instant::now();
    let first = client.connect(&hub, &hub_key).await?;
    let cold = started.elapsed();
    drop(first);
    let mut warm = Vec::with_capacity(setups);
    for _ in 0..setups {
        let started = Instant::now();
        let stream = client.connect(&hub, &hub_key).await?;
        warm.push(started.elapsed());
        drop(stream);
    }
    warm.sort();
    let median = warm.get(warm.len() / 2).copied().unwrap_or_default();

    let mut stream = client.connect(&hub, &hub_key).await?;
    stream.write_all(b"s").await?;
    let mut buf = vec![0u8; READ];
    let started = Instant::now();
    let mut got = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let took = started.elapsed();
    if got != bytes {
        return Err(BenchError::Short { got, want: bytes });
    }
    client.close().await;
    let mib_s = bytes as f64 / (1 << 20) as f64 / took.as_secs_f64();
    println!(
        "{{\"cold_connect_ms\": {:.3}, \"setup_ms_median\": {:.3}, \"setups\": {setups}, \"bytes\": {bytes}, \"throughput_mib_s\": {mib_s:.1}}}",
        ms(cold),
        ms(median)
    );
    Ok(())
}
