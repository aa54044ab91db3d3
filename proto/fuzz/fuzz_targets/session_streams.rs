//! What relay and hub read from QUIC streams and from inside the end-to-end session, through
//! the same stream readers they use in production:
//! * `keyway_proto::io::FrameReader`, frame after frame, as relay and hub read control streams,
//!   and the one-shot `keyway_proto::io::read_frame`, as the relay reads `ChannelOpen`, the hub
//!   reads `ChannelAnnounce` and `StreamOpen`, and the app reads `StreamAccepted`;
//! * the pairing exchange (`read_request` on the hub, `read_answer` on the app);
//! * a pairing code (`keyway://pair?...`), which an app scans from whatever QR it is shown.
//!
//! Properties: no panic; the stream readers agree with the pure decoder frame by frame; a
//! pairing answer or code that parses survives its own encoding.
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use keyway_proto::codec::Frame;
use keyway_proto::io::{read_frame, FrameReader};
use keyway_proto::pairing::{read_answer, read_request, write_answer, PairingCode};
use libfuzzer_sys::fuzz_target;

/// Runs a future over an in-memory reader: `&[u8]` never returns `Pending`, so one poll ends it.
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory read returned Pending"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Frames, as a stream reader sees them.
    let mut stream = data;
    let mut reader = FrameReader::new(data);
    let mut rest = data;
    while let Ok(frame) = now(read_frame(&mut stream)) {
        let Ok(Some((decoded, used))) = Frame::decode(rest) else {
            panic!("read_frame accepted what Frame::decode refuses: {frame:?}");
        };
        assert_eq!(decoded, frame);
        assert_eq!(now(reader.read_frame()).ok(), Some(frame), "FrameReader disagrees with read_frame");
        rest = &rest[used..];
    }

    // The pairing request, as the hub reads it from an app.
    let mut reader = data;
    if let Ok(Some(secret)) = now(read_request(&mut reader)) {
        assert!(!secret.is_empty() && secret.len() <= keyway_proto::pairing::MAX_SECRET_LEN);
    }

    // The pairing answer, as the app reads it from a hub.
    let mut reader = data;
    // (Only messages that fit unchanged: lossy UTF-8 can grow one past the length limit, and
    // the writer then truncates it, as it should.)
    if let Ok((status, message)) = now(read_answer(&mut reader)) {
        if message.len() > keyway_proto::pairing::MAX_MESSAGE_LEN {
            return;
        }
        let mut again = Vec::new();
        now(write_answer(&mut again, status, &message)).expect("writing to a Vec");
        let (status2, message2) = now(read_answer(&mut again.as_slice())).expect("own answer parses");
        assert_eq!((status2, message2), (status, message));
    }

    // A pairing code.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(code) = text.parse::<PairingCode>() {
            let again: PairingCode = code.to_string().parse().expect("a formatted code parses");
            assert!(again == code, "a pairing code does not survive formatting");
        }
    }
});
