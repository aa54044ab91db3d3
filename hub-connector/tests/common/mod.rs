//! Helpers shared by the hub connector's integration tests (real in-process relays, real
//! UDP on loopback): the hub name they use and a one-shot echo check. The waits, identities and
//! the echo service come from `keyway-test-support`. Not every test file uses every helper.
#![allow(dead_code)]

use keyway_proto::HubName;
pub use keyway_test_support::{echo_service, eventually, identity_for, name, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn home() -> HubName {
    name("home")
}

pub async fn echo_once(stream: &mut keyway_client::HubStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data).await?;
    stream.flush().await?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}
