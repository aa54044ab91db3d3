//! A bare quinn server that answers `Register` with `Registered` and then just holds the
//! connection: the floor under the relay's per-hub memory. Comparing the relay with it
//! separates quinn's per-connection cost from the relay's own tables and tasks, and running it
//! with different [`Knobs`] shows what quinn transport settings change at idle.
//!
//! It runs as its own process (`keyway-loadtest bare-server`, spawned by [`BareProc`]) so its
//! RSS is measured exactly like the relay's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::tls::{quic_server_crypto, AnyKey};
use keyway_proto::{Frame, Identity, PublicKey, ALPN_RELAY};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{free_udp_port, ProcUsage};

/// Transport presets for the server side of the idle-hub experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Knobs {
    /// quinn defaults with 1024 bidi streams granted up front (what the relay did before it
    /// granted stream credit with use), no uni streams, 60 s idle: the per-stream cost, large.
    Relay,
    /// The same with 8 concurrent bidi streams, the relay's initial stream credit: quinn-proto
    /// pre-inserts a map entry per allowed remote stream at connection set-up, so this is
    /// quinn's floor under the relay's settings.
    Streams8,
    /// Small windows and buffers: 64 KiB stream / 256 KiB connection receive window, 256 KiB
    /// send window, 8 bidi streams, no DATAGRAM buffer, no MTU discovery.
    Lean,
}

impl Knobs {
    /// The transport config of this preset.
    pub fn transport(self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()))
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(None);
        match self {
            Knobs::Relay => {
                t.max_concurrent_bidi_streams(1024u32.into());
            }
            Knobs::Streams8 => {
                t.max_concurrent_bidi_streams(8u32.into());
            }
            Knobs::Lean => {
                t.max_concurrent_bidi_streams(8u32.into())
                    .stream_receive_window((64u32 * 1024).into())
                    .receive_window((256u32 * 1024).into())
                    .send_window(256 * 1024)
                    .datagram_receive_buffer_size(None)
                    .datagram_send_buffer_size(0)
                    .mtu_discovery_config(None);
            }
        }
        t
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Knobs::Relay => "relay",
            Knobs::Streams8 => "streams8",
            Knobs::Lean => "lean",
        }
    }
}

/// Serves until killed. Prints `bare-server listening on ADDR` on stdout once bound.
pub async fn serve(listen: SocketAddr, key_file: &Path, knobs: Knobs) -> anyhow::Result<()> {
    let identity = Identity::load(key_file)?;
    let crypto = quic_server_crypto(&identity, Arc::new(AnyKey), ALPN_RELAY)?;
    let mut config = quinn::ServerConfig::with_crypto(crypto);
    config.transport_config(Arc::new(knobs.transport()));
    let endpoint = crate::bulk::endpoint_on(listen, Some(config))?;
    println!("bare-server listening on {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            if let Ok(Frame::Register { .. }) = read_frame(&mut recv).await {
                let _ = write_frame(&mut send, &Frame::Registered { replaced: false }).await;
            }
            // Hold the control stream as the relay does, until the hub goes away.
            let _ = conn.closed().await;
            drop((send, recv));
        });
    }
    Ok(())
}

/// A `bare-server` child process.
pub struct BareProc {
    _dir: tempfile::TempDir,
    child: Child,
    pub addr: SocketAddr,
    pub key: PublicKey,
}

impl BareProc {
    /// Starts `loadtest_bin bare-server` and waits until it listens.
    pub async fn start(
        loadtest_bin: &PathBuf,
        knobs: Knobs,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("bare.key");
        let (identity, _) = Identity::load_or_create(&key_file)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let mut child = Command::new(loadtest_bin)
            .arg("bare-server")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--key")
            .arg(&key_file)
            .arg("--knobs")
            .arg(knobs.as_str())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} bare-server", loadtest_bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("stdout not piped"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line.starts_with("bare-server listening") => {}
            other => bail!("bare-server did not start: {other:?}"),
        }
        Ok(Self { _dir: dir, child, addr, key: identity.public_key() })
    }

    pub fn usage(&self) -> anyhow::Result<ProcUsage> {
        ProcUsage::read(self.child.id().ok_or_else(|| anyhow!("bare-server exited"))?)
    }
}
