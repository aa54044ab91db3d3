//! Async adapters that move [`Frame`]s over any tokio byte stream.
//!
//! This is where `proto` meets I/O for the wire, as a thin shell over the pure codec (the
//! shape of mini-redis's `connection.rs`): [`FrameReader`] keeps the bytes of a frame that has
//! not fully arrived in its own buffer and parses with [`Frame::decode`], so a read can sit in a
//! `select!` against a shutdown signal or a control message and lose nothing when the other
//! branch wins.
//!
//! Two rules keep a peer from steering our memory or our stream:
//! * the header is validated ([`Frame::decode`] checks it before waiting for the payload), so a
//!   peer cannot make us buffer more than one frame of at most what its type can hold
//!   ([`max_payload`](crate::codec::max_payload): 8 bytes for a `Ping`, about 32 KiB for the
//!   allow-list frames); a caller that expects only some types says so
//!   ([`FrameReader::read_frame_if`]) and nothing of another type's payload is read;
//! * the reader never reads past the frame it is assembling. Session streams carry one frame
//!   and then opaque end-to-end TLS: whoever takes the stream back ([`FrameReader::into_inner`],
//!   or after the free [`read_frame`]) must find the first TLS byte still in it.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{Frame, FrameError, Header, HEADER_LEN};

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("stream ended before the first byte of a frame")]
    Closed,
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a byte stream, cancel-safely.
///
/// A clean end of stream before the first byte of a frame is [`FrameIoError::Closed`]; an end
/// of stream inside a frame is a malformed frame ([`FrameError::Truncated`]), so that the relay
/// answers a truncated frame with a typed refusal instead of silently dropping it. After any
/// error the stream is out of step with the frames: drop the reader (and the stream).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    /// The bytes of the frame being assembled, never more (see the module doc).
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, buffer: BytesMut::with_capacity(HEADER_LEN) }
    }

    /// Reads the next frame.
    ///
    /// Cancel-safe: if the future is dropped (e.g. it lost a `select!`), no byte is lost; the
    /// next call continues the same frame.
    pub async fn read_frame(&mut self) -> Result<Frame, FrameIoError> {
        self.read_frame_if(|_| Ok(())).await
    }

    /// Reads the next frame if `check` accepts its header, which it is shown as soon as the
    /// header is complete, before any byte of the payload is read or buffered; its error is
    /// the read's. Cancel-safe as [`FrameReader::read_frame`], but a read continued after a
    /// cancel may show `check` the same header again.
    pub async fn read_frame_if(
        &mut self,
        mut check: impl FnMut(&Header) -> Result<(), FrameError>,
    ) -> Result<Frame, FrameIoError> {
        let mut checked = false;
        loop {
            if let (false, Some(head)) = (checked, self.buffer.first_chunk::<HEADER_LEN>()) {
                check(&Header::decode(head)?)?;
                checked = true;
            }
            if let Some((frame, used)) = Frame::decode(&self.buffer)? {
                self.buffer.advance(used);
                return Ok(frame);
            }
            let (field, missing) = self.missing()?;
            self.buffer.reserve(missing);
            // `read_buf` only appends what one completed `poll_read` returned, so dropping this
            // future between polls leaves `buffer` consistent: that is the cancel safety.
            let got = (&mut self.inner).take(missing as u64).read_buf(&mut self.buffer).await?;
            if got == 0 {
                return Err(if self.buffer.is_empty() {
                    FrameIoError::Closed
                } else {
                    FrameError::Truncated { field, needed: missing }.into()
                });
            }
        }
    }

    /// Which part of the frame is incomplete and how many bytes it still lacks (never zero:
    /// `decode` just said the buffer holds no whole frame).
    fn missing(&self) -> Result<(&'static str, usize), FrameError> {
        match self.buffer.first_chunk::<HEADER_LEN>() {
            None => Ok(("header", HEADER_LEN - self.buffer.len())),
            Some(head) => {
                let header = Header::decode(head)?;
                Ok(("payload", HEADER_LEN + header.payload_len - self.buffer.len()))
            }
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream itself. Reading from it directly while a frame is half read would take
    /// that frame's bytes away from the reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives the stream back. Only the bytes of a frame whose read was cancelled half-way are
    /// left behind (the reader never reads past a frame).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads exactly one frame, with the errors of [`FrameReader::read_frame`] and without reading
/// past it. Not cancel-safe (a dropped call loses what it had read): use it for one-shot reads
/// under a timeout that gives up on the stream, and a [`FrameReader`] inside a `select!`.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, FrameIoError> {
    FrameReader::new(reader).read_frame().await
}

/// [`read_frame`] with a check of the header ([`FrameReader::read_frame_if`]).
pub async fn read_frame_if<R: AsyncRead + Unpin>(
    reader: &mut R,
    check: impl FnMut(&Header) -> Result<(), FrameError>,
) -> Result<Frame, FrameIoError> {
    FrameReader::new(reader).read_frame_if(check).await
}

/// Encodes and writes one frame (no flush: QUIC streams send on their own; call `flush` on
/// buffered writers).
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> Result<(), FrameIoError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{RefusalReason, SessionPurpose};
    use crate::identity::Identity;

    fn samples() -> Vec<Frame> {
        let key = |seed| Identity::from_seed([seed; 32]).public_key();
        vec![
            Frame::Ping { nonce: 7 },
            Frame::refused(RefusalReason::HubOffline, "offline"),
            Frame::StreamAccepted,
            Frame::AllowList { allowed_apps: vec![key(1), key(2)], pairing_open: true },
            Frame::ChannelAnnounce {
                app_key: key(3),
                observed: "[2001:db8::1]:443".parse().unwrap(),
                purpose: SessionPurpose::Pair,
                channel: crate::channel::ChannelId::new(9),
            },
            Frame::GoAway { retry_after_ms: 1500, message: "relay restarting".into() },
        ]
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.encode().unwrap()).collect()
    }

    #[tokio::test]
    async fn frames_cross_a_stream_in_order() {
        let (mut a, b) = tokio::io::duplex(16);
        let frames = samples();
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in &sent {
                write_frame(&mut a, f).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(b);
        for f in frames {
            assert_eq!(reader.read_frame().await.unwrap(), f);
        }
        writer.await.unwrap();
        assert!(matches!(reader.read_frame().await, Err(FrameIoError::Closed)));
    }

    #[tokio::test]
    async fn the_free_function_reads_one_frame_after_another_too() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let frames = vec![Frame::Ping { nonce: 7 }, Frame::refused(RefusalReason::HubOffline, "offline")];
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in &sent {
                write_frame(&mut a, f).await.unwrap();
            }
        });
        for f in frames {
            assert_eq!(read_frame(&mut b).await.unwrap(), f);
        }
        writer.await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(FrameIoError::Closed)));
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_reading_the_payload() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[crate::codec::PROTOCOL_VERSION, 8, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        a.write_all(&[0; 32]).await.unwrap();
        let mut reader = FrameReader::new(b);
        assert!(matches!(reader.read_frame().await, Err(FrameIoError::Frame(FrameError::TooLarge { .. }))));
        assert_eq!(reader.buffer.len(), HEADER_LEN, "nothing past the header was read");
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[crate::codec::PROTOCOL_VERSION, 8, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(FrameIoError::Frame(FrameError::TooLarge { .. }))));
    }

    #[tokio::test]
    async fn a_header_the_check_refuses_is_refused_before_its_payload_is_read() {
        let register = Frame::Register {
            name: crate::HubName::new("home").unwrap(),
            allowed_apps: vec![],
            pairing_open: false,
        };
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&register.encode().unwrap()).await.unwrap();
        let mut reader = FrameReader::new(b);
        let only_pings = |h: &Header| match h.kind == crate::codec::kind::PING {
            true => Ok(()),
            false => Err(FrameError::Unexpected {
                expected: "Ping",
                got: crate::codec::kind_name(h.kind).unwrap(),
            }),
        };
        let refused = reader.read_frame_if(only_pings).await;
        assert!(matches!(refused, Err(FrameIoError::Frame(FrameError::Unexpected { got: "Register", .. }))));
        assert_eq!(reader.buffer.len(), HEADER_LEN, "nothing past the header was read");
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&Frame::Ping { nonce: 5 }.encode().unwrap()).await.unwrap();
        assert_eq!(read_frame_if(&mut b, only_pings).await.unwrap(), Frame::Ping { nonce: 5 });
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_a_truncated_frame_not_a_clean_close() {
        let whole = Frame::Ping { nonce: 9 }.encode().unwrap();
        for cut in 1..whole.len() {
            let field = if cut < HEADER_LEN { "header" } else { "payload" };
            let expected = (field, if cut < HEADER_LEN { HEADER_LEN } else { whole.len() } - cut);
            let mut partial = &whole[..cut];
            match read_frame(&mut partial).await {
                Err(FrameIoError::Frame(FrameError::Truncated { field: f, needed })) => {
                    assert_eq!((f, needed), expected);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            // The same through a reader, also when a frame came first.
            let mut stream = Frame::StreamAccepted.encode().unwrap();
            stream.extend_from_slice(&whole[..cut]);
            let mut reader = FrameReader::new(stream.as_slice());
            assert_eq!(reader.read_frame().await.unwrap(), Frame::StreamAccepted);
            match reader.read_frame().await {
                Err(FrameIoError::Frame(FrameError::Truncated { field: f, needed })) => {
                    assert_eq!((f, needed), expected);
                }
                other => panic!("reader, cut at {cut}: {other:?}"),
            }
        }
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty).await, Err(FrameIoError::Closed)));
        assert!(matches!(FrameReader::new(empty).read_frame().await, Err(FrameIoError::Closed)));
    }

    #[tokio::test]
    async fn a_read_cancelled_mid_frame_in_select_loses_no_byte() {
        let frame = Frame::GoAway { retry_after_ms: 250, message: "moving".into() };
        let bytes = frame.encode().unwrap();
        let (mut a, b) = tokio::io::duplex(4096);
        let (other_tx, mut other_rx) = tokio::sync::mpsc::unbounded_channel::<&str>();
        let mut reader = FrameReader::new(b);
        // Stop inside the header, then inside the payload.
        for (from, to) in [(0, 3), (3, HEADER_LEN + 4)] {
            a.write_all(&bytes[from..to]).await.unwrap();
            other_tx.send("control message").unwrap();
            tokio::select! {
                // Polled first, so it takes the bytes that are there before it loses.
                biased;
                got = reader.read_frame() => panic!("only {to} of {} bytes were sent: {got:?}", bytes.len()),
                msg = other_rx.recv() => assert_eq!(msg, Some("control message")),
            }
            assert_eq!(reader.buffer.len(), to, "the cancelled read kept what it had read");
        }
        a.write_all(&bytes[HEADER_LEN + 4..]).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap(), frame);
        drop(a);
        assert!(matches!(reader.read_frame().await, Err(FrameIoError::Closed)));
    }

    #[tokio::test]
    async fn frames_split_at_every_byte_boundary_arrive_intact() {
        let frames = samples();
        let bytes = wire(&frames);
        // Every split point, with a cancelled read in between the two halves.
        for cut in 0..=bytes.len() {
            let (mut a, b) = tokio::io::duplex(bytes.len());
            let mut reader = FrameReader::new(b);
            let mut got = Vec::new();
            a.write_all(&bytes[..cut]).await.unwrap();
            loop {
                tokio::select! {
                    biased;
                    frame = reader.read_frame() => got.push(frame.unwrap()),
                    () = tokio::task::yield_now() => break,
                }
            }
            a.write_all(&bytes[cut..]).await.unwrap();
            drop(a);
            loop {
                match reader.read_frame().await {
                    Ok(frame) => got.push(frame),
                    Err(FrameIoError::Closed) => break,
                    Err(e) => panic!("cut at {cut}: {e}"),
                }
            }
            assert_eq!(got, frames, "cut at {cut}");
        }
        // And a stream that hands over one byte per read.
        let (mut a, b) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move { a.write_all(&bytes).await.unwrap() });
        let mut reader = FrameReader::new(b);
        for frame in &frames {
            assert_eq!(&reader.read_frame().await.unwrap(), frame);
        }
        writer.await.unwrap();
        assert!(matches!(reader.read_frame().await, Err(FrameIoError::Closed)));
    }

    #[tokio::test]
    async fn the_reader_never_reads_past_the_frame_it_returns() {
        // A session head, then what would be end-to-end TLS.
        let mut stream = Frame::StreamAccepted.encode().unwrap();
        stream.extend_from_slice(b"\x16\x03\x01 client hello");
        let mut reader = FrameReader::new(stream.as_slice());
        assert_eq!(reader.read_frame().await.unwrap(), Frame::StreamAccepted);
        assert_eq!(reader.into_inner(), b"\x16\x03\x01 client hello");
        let mut rest = stream.as_slice();
        assert_eq!(read_frame(&mut rest).await.unwrap(), Frame::StreamAccepted);
        assert_eq!(rest, b"\x16\x03\x01 client hello");
    }
}
