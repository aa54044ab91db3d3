//! Async adapters that move [`Frame`]s over any tokio byte stream.
//!
//! This is the only place in `proto` that touches I/O, and it is a thin shell over the pure
//! codec: the header is read and validated first ([`Header::decode`]), so a peer cannot make
//! us allocate more than [`MAX_PAYLOAD`](crate::codec::MAX_PAYLOAD) bytes per frame.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{Frame, FrameError, Header, HEADER_LEN};

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("stream closed before a complete frame arrived")]
    Closed,
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one frame. A clean end of stream before the first byte is `Closed`.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, FrameIoError> {
    let mut head = [0u8; HEADER_LEN];
    reader.read_exact(&mut head).await.map_err(eof_is_closed)?;
    let header = Header::decode(&head)?;
    let mut payload = vec![0u8; header.payload_len];
    reader.read_exact(&mut payload).await.map_err(eof_is_closed)?;
    Ok(Frame::decode_payload(header, &payload)?)
}

/// Encodes and writes one frame (no flush: QUIC streams send on their own; call `flush` on
/// buffered writers).
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> Result<(), FrameIoError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).await?;
    Ok(())
}

fn eof_is_closed(e: std::io::Error) -> FrameIoError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameIoError::Closed
    } else {
        FrameIoError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::RefusalReason;

    #[tokio::test]
    async fn frames_cross_a_stream_in_order() {
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
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 8, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(FrameIoError::Frame(FrameError::TooLarge { .. }))));
    }
}
