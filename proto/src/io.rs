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
    #[error("stream ended before the first byte of a frame")]
    Closed,
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one frame. A clean end of stream before the first byte is `Closed`; an end
/// of stream inside a frame is a malformed frame ([`FrameError::Truncated`]), so that the
/// relay answers a truncated frame with a typed refusal instead of silently dropping it.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, FrameIoError> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut head).await?;
    if got == 0 {
        return Err(FrameIoError::Closed);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated { field: "header", needed: HEADER_LEN - got }.into());
    }
    let header = Header::decode(&head)?;
    let mut payload = vec![0u8; header.payload_len];
    let got = read_full(reader, &mut payload).await?;
    if got < payload.len() {
        return Err(FrameError::Truncated { field: "payload", needed: payload.len() - got }.into());
    }
    Ok(Frame::decode_payload(header, &payload)?)
}

/// Fills `buf` unless the stream ends first; returns how many bytes were read.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
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

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_a_truncated_frame_not_a_clean_close() {
        let whole = Frame::Ping { nonce: 9 }.encode().unwrap();
        for cut in 1..whole.len() {
            let mut partial = &whole[..cut];
            let field = if cut < HEADER_LEN { "header" } else { "payload" };
            match read_frame(&mut partial).await {
                Err(FrameIoError::Frame(FrameError::Truncated { field: f, needed })) => {
                    assert_eq!(
                        (f, needed),
                        (field, if cut < HEADER_LEN { HEADER_LEN } else { whole.len() } - cut)
                    );
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty).await, Err(FrameIoError::Closed)));
    }
}
