//! [`Stream`]: one end-to-end encrypted byte stream to a hub's service, for the foreign side.
//!
//! The Rust [`HubStream`] is split into its read and write halves, each behind its own async
//! lock, so an app can read in one task while it writes in another (an HTTP client, a
//! WebSocket). `read` returns empty bytes at the end of the stream; `shutdown` finishes the write
//! side, wakes a pending `read` (which then gets [`KeywayError::StreamClosed`]) and drops the
//! stream; any use after it is the same typed error, never a crash. (Kotlin's `close()`, from
//! `AutoCloseable`, frees the object, which drops the stream too.)

use keyway_client::HubStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{watch, Mutex};

use crate::error::KeywayError;
use crate::runtime;

/// The largest `read` buffer: a foreign `read(max)` allocates `max` bytes up front, so a huge
/// `max` must not turn into a huge allocation (or an abort).
pub const MAX_READ: u32 = 1 << 20;

/// An end-to-end encrypted stream to the service behind a hub.
#[derive(Debug, uniffi::Object)]
pub struct Stream {
    read: Mutex<Option<ReadHalf<HubStream>>>,
    write: Mutex<Option<WriteHalf<HubStream>>>,
    closed: watch::Sender<bool>,
    hub_key: String,
    resumed: bool,
}

impl Stream {
    pub(crate) fn new(stream: HubStream) -> Self {
        let hub_key = stream.hub_key().to_string();
        let resumed = stream.resumed();
        let (read, write) = tokio::io::split(stream);
        Self {
            read: Mutex::new(Some(read)),
            write: Mutex::new(Some(write)),
            closed: watch::Sender::new(false),
            hub_key,
            resumed,
        }
    }

    fn closed_error() -> KeywayError {
        KeywayError::StreamClosed { detail: "the stream was closed; open a new one with connect".into() }
    }

    /// Completes once `shutdown` was called.
    async fn until_closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

#[uniffi::export]
impl Stream {
    /// Up to `max` bytes (at most 1 MiB per call); empty bytes at the end of the stream.
    pub async fn read(&self, max: u32) -> Result<Vec<u8>, KeywayError> {
        if max == 0 {
            return Err(KeywayError::BadArgument {
                detail: "read size must be at least 1 (empty bytes mean end of stream)".into(),
            });
        }
        runtime::run(async {
            let mut guard = tokio::select! {
                guard = self.read.lock() => guard,
                () = self.until_closed() => return Err(Self::closed_error()),
            };
            let half = guard.as_mut().ok_or_else(Self::closed_error)?;
            let mut buf = vec![0u8; max.min(MAX_READ) as usize];
            tokio::select! {
                n = half.read(&mut buf) => {
                    buf.truncate(n?);
                    Ok(buf)
                }
                () = self.until_closed() => Err(Self::closed_error()),
            }
        })
        .await?
    }

    /// Writes all of `data`.
    pub async fn write(&self, data: Vec<u8>) -> Result<(), KeywayError> {
        runtime::run(async {
            let mut guard = tokio::select! {
                guard = self.write.lock() => guard,
                () = self.until_closed() => return Err(Self::closed_error()),
            };
            let half = guard.as_mut().ok_or_else(Self::closed_error)?;
            tokio::select! {
                written = half.write_all(&data) => Ok(written?),
                () = self.until_closed() => Err(Self::closed_error()),
            }
        })
        .await?
    }

    /// Ends the write side (the hub's service sees end of input) but keeps reading: for
    /// request/response protocols that read until the service closes.
    pub async fn finish(&self) -> Result<(), KeywayError> {
        runtime::run(async {
            let mut guard = self.write.lock().await;
            let half = guard.as_mut().ok_or_else(Self::closed_error)?;
            Ok(half.shutdown().await?)
        })
        .await?
    }

    /// Finishes the write side and drops the stream; a pending `read` or `write` ends with
    /// `StreamClosed`. Calling it twice is fine. (Named `shutdown`, not `close`: Kotlin objects
    /// are `AutoCloseable`, whose `close()` frees the handle; the Python layer calls it `close`.)
    pub async fn shutdown(&self) -> Result<(), KeywayError> {
        runtime::run(async {
            self.closed.send_replace(true);
            if let Some(mut half) = self.write.lock().await.take() {
                // Best effort: the stream may already be reset by the hub.
                let _ = half.shutdown().await;
            }
            self.read.lock().await.take();
        })
        .await
    }

    /// Whether `shutdown` was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// The hub key this stream was authenticated against (`kw…`).
    pub fn hub_key(&self) -> String {
        self.hub_key.clone()
    }

    /// Whether the stream rode on an end-to-end connection that was already up (no handshake).
    pub fn resumed(&self) -> bool {
        self.resumed
    }
}
