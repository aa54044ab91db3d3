//! Writes the fuzzers' seed corpus: one file per kind of valid frame and text input.
//! Run: `cargo run -p keyway-proto --example fuzz_seeds` (from the repository root).

use keyway_proto::channel::ChannelId;
use keyway_proto::codec::{Frame, HubName, RefusalReason, SessionPurpose};
use keyway_proto::Identity;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = |s: u8| Identity::from_seed([s; 32]).public_key();
    let name = HubName::new("home")?;
    let frames = [
        Frame::Register { name: name.clone(), allowed_apps: vec![key(1), key(2)], pairing_open: false },
        Frame::Registered { replaced: true },
        Frame::AllowList { allowed_apps: vec![key(3)], pairing_open: true },
        Frame::refused(RefusalReason::HubOffline, "hub home is offline"),
        Frame::ChannelOpen {
            hub: name,
            hub_key: key(4),
            purpose: SessionPurpose::Connect,
            channel: keyway_proto::channel::ChannelId::new(0x0a0b_0c0d_0e0f_1011),
        },
        Frame::ChannelAnnounce {
            app_key: key(5),
            observed: "203.0.113.9:4433".parse()?,
            purpose: SessionPurpose::Pair,
            channel: ChannelId::new(0x0123_4567_89ab_cdef),
        },
        Frame::ChannelAccepted,
        Frame::ChannelReady { channel: ChannelId::new(7) },
        Frame::StreamOpen,
        Frame::StreamAccepted,
        Frame::Ping { nonce: 1 },
        Frame::Pong { nonce: 2 },
        Frame::GoAway { retry_after_ms: 1000, message: "restarting".into() },
        Frame::Redirect { node: "198.51.100.7:4433".parse()? },
    ];
    let dir = std::path::Path::new("proto/fuzz/seeds/frame_decode");
    std::fs::create_dir_all(dir)?;
    for (i, frame) in frames.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:02}-{}", frame.name())), frame.encode()?)?;
    }
    let dir = std::path::Path::new("proto/fuzz/seeds/text_inputs");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("hubs"), format!("# hubs\nhome {}\noffice {}\n", key(1), key(2)))?;
    std::fs::write(dir.join("apps"), format!("{} Anna's phone\n{}\n", key(3), key(4)))?;
    std::fs::write(dir.join("key"), key(5).to_string())?;
    Ok(())
}
