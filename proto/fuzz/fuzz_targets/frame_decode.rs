//! Feeds arbitrary bytes to the frame decoder (what relay and hub do with every control and
//! session-header byte they receive). Properties: no panic; a decoded frame re-encodes to
//! exactly the bytes it came from (the encoding is canonical), and decoding is prefix-stable.
#![no_main]

use keyway_proto::codec::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        let encoded = frame.encode().expect("a decoded frame re-encodes");
        assert_eq!(&encoded[..], &rest[..used], "encoding is not canonical for {frame:?}");
        rest = &rest[used..];
    }
});
