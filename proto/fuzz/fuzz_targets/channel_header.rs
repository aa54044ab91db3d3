//! The channel header, as the relay and the path socket read every datagram on their UDP
//! port: no panic on any input, and a datagram that parses as channel data survives its own
//! encoding and an in-place id rewrite (what the relay does to every forwarded segment).
#![no_main]

use keyway_proto::channel::{self, ChannelId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((id, packet)) = channel::parse(data) else {
        assert!(!channel::is_channel_data(data) || data.len() < channel::HEADER_LEN);
        return;
    };
    let mut again = Vec::new();
    channel::encode_into(&mut again, id, packet);
    assert_eq!(again, data);
    let other = ChannelId::new(id.get() ^ u64::MAX);
    assert!(channel::write_header(&mut again, other));
    assert_eq!(channel::parse(&again), Some((other, packet)));
});
