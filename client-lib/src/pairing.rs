//! Pairing: turning a one-time pairing code into an authorized app key.
//!
//! `keyway-hub pair` prints a [`PairingCode`], a `keyway://pair?…` URI holding everything an
//! app needs to reach the hub for the first time (relay address and key, hub name and key)
//! plus a one-time secret. [`pair`] connects through the relay with purpose `Pair`, runs the
//! end-to-end TLS handshake pinning the hub key from the code, and only *inside* that
//! session sends the secret: the relay never sees it, and an impostor hub cannot learn it
//! because the hub key is pinned. The hub adds the key proven in that same TLS session, so
//! the secret is bound to the app's key without a separate MAC.
//!
//! This module is the app's *flow*. The wire it speaks (the code's URI form, the request and
//! the answer inside the end-to-end stream) is [`keyway_proto::pairing`], shared with the hub;
//! its items are re-exported here so `keyway_client::pairing::PairingCode` and friends keep
//! working.

use std::time::Duration;

use keyway_proto::{HubName, Identity, PublicKey, RefusalReason, SessionPurpose};
use tokio::io::AsyncWriteExt;

pub use keyway_proto::pairing::{
    read_answer, read_request, write_answer, write_request, AnswerError, BadPairingCode, PairStatus,
    PairingCode, MAX_MESSAGE_LEN, MAX_SECRET_LEN, PAIR_VERSION, SECRET_LEN,
};

use crate::error::{ClientError, ConfigError};
use crate::{Client, ClientConfig};

/// What a successful pairing learned: enough to `connect` later with nothing else configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedHub {
    pub relay: String,
    pub relay_key: PublicKey,
    pub hub: HubName,
    pub hub_key: PublicKey,
}

/// Pairs `identity` with the hub named in `code` (see the module docs).
pub async fn pair(code: &PairingCode, identity: Identity) -> Result<PairedHub, ClientError> {
    let relay_addr = tokio::net::lookup_host(&code.relay)
        .await
        .map_err(|source| ConfigError::Resolve { relay: code.relay.clone(), source })?
        .next()
        .ok_or_else(|| ConfigError::NoAddress { relay: code.relay.clone() })?;
    let client = Client::new(ClientConfig::new(identity, relay_addr, code.relay_key))?;
    let result = pair_with(&client, code).await;
    client.close().await;
    result
}

/// How long a pairing keeps asking while the relay says the hub has no window open. A code is
/// printed the moment `keyway-hub pair` writes the window file; the running connector notices
/// it at its next poll (250 ms by default) and only then tells the relay, so a code used at
/// once would otherwise be refused although its window is open. After this long, "no
/// pairing window open" is the truth (expired, used, or no connector running).
pub const WINDOW_PUBLISH_GRACE: Duration = Duration::from_secs(3);
/// Pause between two pairing attempts within [`WINDOW_PUBLISH_GRACE`] (each refused attempt
/// costs the relay one session frame, no handshake with the hub).
const WINDOW_RETRY: Duration = Duration::from_millis(100);

/// Pairs over an existing [`Client`] (whose relay must be the code's relay).
pub async fn pair_with(client: &Client, code: &PairingCode) -> Result<PairedHub, ClientError> {
    let deadline = tokio::time::Instant::now() + WINDOW_PUBLISH_GRACE;
    let mut stream = loop {
        match client.connect_for(&code.hub, &code.hub_key, SessionPurpose::Pair).await {
            Err(e)
                if e.refusal() == Some(RefusalReason::PairingClosed)
                    && tokio::time::Instant::now() + WINDOW_RETRY < deadline =>
            {
                tokio::time::sleep(WINDOW_RETRY).await;
            }
            other => break other?,
        }
    };
    write_request(&mut stream, &code.secret).await?;
    let (status, message) = read_answer(&mut stream).await?;
    let _ = stream.shutdown().await;
    match status {
        PairStatus::Paired => Ok(PairedHub {
            relay: code.relay.clone(),
            relay_key: code.relay_key,
            hub: code.hub.clone(),
            hub_key: code.hub_key,
        }),
        status => Err(ClientError::PairingRejected { status, message }),
    }
}
