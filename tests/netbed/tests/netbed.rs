//! Behind real NATs: scenarios on the network test bed (see `tests/netbed/README.md`).
//! Each test builds its own bed and fails if the behaviour breaks; times are printed, not asserted.

use std::time::Duration;

use keyway_netbed::*;
// The app in B reaches the hub in A by name, through the relay, for every NAT flavour.

fn reach_by_name(label: &str, flavour: Flavour, cgnat: bool) {
    let Some(mut bed) = Bed::up(label, flavour, cgnat, None) else { return };
    let keys = bed.start_keyway(&[]);
    bed.start_forward(&keys, &[]);
    let secs = bed.reach(30);
    // The hub's packets really crossed NAT-A: the relay sees NAT-A's public address.
    let mapping = bed.hub_mapping().expect("NAT-A has a conntrack entry for the hub's tunnel");
    assert!(mapping.starts_with(NAT_A_WAN), "hub not masqueraded behind NAT-A: {mapping}");
    // Nothing was let in unsolicited: the only tunnel is the hub's own outbound one.
    assert_eq!(bed.registrations(), 1, "{}", bed.log("hub"));
    if cgnat {
        // The app's packets crossed two NATs: the CGN saw them from home router B's address.
        let cgn = bed.exec_ok("cgn", &["conntrack", "-L", "-p", "udp", "-s", "100.64.0.2"]);
        assert!(cgn.contains("dport=4433"), "app traffic did not cross the carrier-grade NAT: {cgn}");
    }
    report(label, format!("reached in {secs:.2}s; hub mapped to {mapping}"));
}

#[test]
fn reach_by_name_port_preserving_nat() {
    reach_by_name("reach/preserve", Flavour::Preserve, false);
}

#[test]
fn reach_by_name_random_port_nat() {
    reach_by_name("reach/random", Flavour::Random, false);
}

#[test]
fn reach_by_name_short_udp_timeout_nat() {
    reach_by_name("reach/short-timeout", Flavour::ShortTimeout, false);
}

#[test]
fn reach_by_name_behind_carrier_grade_nat() {
    reach_by_name("reach/cgnat+preserve", Flavour::Preserve, true);
}

#[test]
fn reach_by_name_behind_carrier_grade_random_nat() {
    reach_by_name("reach/cgnat+random", Flavour::Random, true);
}

// ---------------------------------------------------------------------------------------------
// Hub UDP mapping expiry (UDP conntrack timeouts of 3 s on every NAT, random ports so that a
// re-created mapping is visible as a new port).

#[test]
fn keep_alive_shorter_than_the_nat_timeout_keeps_the_mapping() {
    let label = "expiry/keep-alive 1s < timeout 3s";
    let Some(mut bed) = Bed::up(label, Flavour::Random, false, Some(3)) else { return };
    // The default keep-alive (15 s) is longer than this NAT's 3 s timeout; the hub is configured
    // below the timeout, as an owner behind such a NAT would.
    let keys = bed.start_keyway(&["--keep-alive", "1s"]);
    let before = bed.hub_mapping().expect("hub mapping at NAT-A");
    std::thread::sleep(Duration::from_secs(10));
    let after = bed.hub_mapping().expect("hub mapping still at NAT-A after 10 s idle");
    assert_eq!(before, after, "the hub's NAT mapping expired despite the keep-alive");
    bed.start_forward(&keys, &[]);
    let secs = bed.reach(30);
    assert_eq!(bed.registrations(), 1, "the hub had to reconnect:\n{}", bed.log("hub"));
    report(label, format!("mapping {before} kept over 10 s idle; reached in {secs:.2}s"));
}

#[test]
fn keep_alive_longer_than_the_nat_timeout_recovers() {
    let label = "expiry/keep-alive 8s > timeout 3s";
    let Some(mut bed) = Bed::up(label, Flavour::Random, false, Some(3)) else { return };
    let keys = bed.start_keyway(&["--keep-alive", "8s", "--ping-interval", "8s"]);
    bed.start_forward(&keys, &[]);
    bed.reach(30);
    let before = bed.hub_mapping().expect("hub mapping at NAT-A");
    // Let both mappings expire (the hub sends nothing for up to 8 s).
    bed.wait_for("the hub's mapping to expire", Duration::from_secs(30), |b| b.hub_mapping().is_none());
    let secs = bed.reach(60);
    let after = bed.hub_mapping().unwrap_or_default();
    let how = if bed.registrations() == 1 { "same QUIC connection (migrated)" } else { "hub reconnected" };
    report(
        label,
        format!("mapping {before} expired; reachable again after {secs:.2}s via {how}; now {after}"),
    );
}

// ---------------------------------------------------------------------------------------------
// NAT rebinding mid-session: the tunnel survives (QUIC migration) or recovers.

#[test]
fn nat_rebinding_mid_session() {
    let label = "rebinding";
    let Some(mut bed) = Bed::up(label, Flavour::Random, false, None) else { return };
    let keys = bed.start_keyway(&["--keep-alive", "2s"]);
    bed.start_forward(&keys, &["--keep-alive", "2s"]);
    bed.reach(30);
    let mut session = bed.session();
    let first = session.get();
    assert!(first.starts_with("ok"), "first request on the session: {first}");

    // 1. Flush every NAT's conntrack table: all mappings are re-created with new random ports.
    let before = bed.hub_mapping().expect("hub mapping");
    for nat in ["nata", "natb"] {
        bed.exec_ok(nat, &["conntrack", "-F"]);
    }
    let line = session.get();
    assert!(line.starts_with("ok"), "the open session died after conntrack -F: {line}\n{}", bed.log("hub"));
    let how =
        if bed.registrations() == 1 { "survived (QUIC migration)" } else { "recovered (hub reconnected)" };
    report(
        label,
        format!(
            "conntrack -F: {how}; next request on the open session took {}s; hub {before} -> {}",
            line.trim_start_matches("ok "),
            bed.hub_mapping().unwrap_or_default()
        ),
    );

    // 2. Change the masquerade port range and flush again.
    for nat in ["nata", "natb"] {
        bed.nft(
            nat,
            "flush chain ip kwt postrouting\n\
             add rule ip kwt postrouting oifname \"wan\" meta l4proto udp masquerade to :40000-40999 random\n\
             add rule ip kwt postrouting oifname \"wan\" masquerade random\n",
        );
        bed.exec_ok(nat, &["conntrack", "-F"]);
    }
    let line = session.get();
    assert!(
        line.starts_with("ok"),
        "the open session died after the port-range change: {line}\n{}",
        bed.log("hub")
    );
    let mapping = bed.hub_mapping().expect("hub mapping after the range change");
    let port: u16 = mapping.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    assert!((40000..=40999).contains(&port), "the new port range is not in effect: {mapping}");
    let how =
        if bed.registrations() == 1 { "survived (QUIC migration)" } else { "recovered (hub reconnected)" };
    report(
        label,
        format!(
            "masquerade port range -> 40000-40999: {how}; next request took {}s; hub now {mapping}",
            line.trim_start_matches("ok ")
        ),
    );
    // A brand-new connection through the tunnel works too.
    bed.reach(30);
}

// ---------------------------------------------------------------------------------------------
// The app's NAT rebinds with the default keep-alives (15 s): the relay drops the app's channel
// datagrams from the new address until the app's relay connection shows it there. The path
// socket sees channel data go out with nothing back for a second and nudges that connection.

#[test]
fn app_nat_rebinding_with_default_keep_alive_stalls_about_a_second() {
    let label = "rebinding, defaults";
    let Some(mut bed) = Bed::up(label, Flavour::Random, false, None) else { return };
    let keys = bed.start_keyway(&[]);
    bed.start_forward(&keys, &[]);
    bed.reach(30);
    let mut session = bed.session();
    let first = session.get();
    assert!(first.starts_with("ok"), "first request on the session: {first}");
    let mut stalls = Vec::new();
    for _ in 0..3 {
        bed.exec_ok("natb", &["conntrack", "-F"]);
        let line = session.get();
        assert!(line.starts_with("ok"), "the open session died after the app's NAT rebound: {line}");
        let took: f64 = line.trim_start_matches("ok ").trim().parse().expect("seconds");
        stalls.push(took);
    }
    report(
        label,
        format!("next request after conntrack -F on the app's NAT took {stalls:?} s (keep-alive 15 s)"),
    );
    // Generous: without the nudge the stall is the keep-alive, 15 s.
    assert!(
        stalls.iter().all(|&s| s < 8.0),
        "a request stalled {stalls:?} s: the app did not nudge its relay connection\n{}",
        bed.log("forward")
    );
}

// ---------------------------------------------------------------------------------------------
// 5 % random loss on the NATs' forward paths: 20 MiB arrive byte-exact.

#[test]
fn twenty_mib_byte_exact_through_five_percent_loss() {
    let label = "loss 5%";
    let Some(mut bed) = Bed::up(label, Flavour::Preserve, false, None) else { return };
    let keys = bed.start_keyway(&[]);
    bed.start_forward(&keys, &[]);
    bed.reach(30);
    for nat in ["nata", "natb"] {
        bed.nft(nat, "add rule ip kwt loss numgen random mod 100 < 5 counter drop\n");
    }
    let line = bed.probe(&["sha", FORWARD_PORT, "/blob", "120"]);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"ok"), "transfer failed: {line}");
    assert_eq!(fields[1], (20u64 << 20).to_string(), "length: {line}");
    assert_eq!(fields[2], bed.blob_sha256(), "the 20 MiB arrived altered");
    let dropped: u64 = ["nata", "natb"].iter().map(|n| bed.dropped(n, "loss")).sum();
    assert!(dropped > 0, "the loss rule dropped nothing: the test exercised no loss");
    report(label, format!("20 MiB byte-exact in {}s, {dropped} packets dropped by the NATs", fields[3]));
}

// ---------------------------------------------------------------------------------------------
// UDP blocked on network B: `keyway forward` fails fast with a clear error.

#[test]
fn udp_blocked_on_network_b_fails_fast_with_a_clear_error() {
    let label = "udp blocked";
    let Some(mut bed) = Bed::up(label, Flavour::Preserve, false, None) else { return };
    let keys = bed.start_keyway(&[]);
    bed.nft("natb", "add rule ip kwt block meta l4proto udp counter drop\n");
    bed.start_forward(&keys, &["--connect-timeout", "3s"]);
    // Wait until the forwarder listens (it binds before it dials).
    let line = bed.probe(&["closes", FORWARD_PORT, "30"]);
    assert!(line.starts_with("closed"), "keyway forward kept the connection open or never listened: {line}");
    assert!(line.ends_with(" 0"), "something answered although UDP is blocked: {line}");
    bed.wait_for("forward to log the error", Duration::from_secs(10), |b| {
        b.log("forward").contains("blocked")
    });
    let log = bed.log("forward");
    let error = log.lines().find(|l| l.contains("blocked")).unwrap_or_default().to_owned();
    assert!(error.contains("UDP") && error.contains("relay"), "unclear error: {error}");
    assert!(bed.dropped("natb", "block") > 0, "nothing was blocked");
    report(
        label,
        format!(
            "connection closed after {}s; forward logged: {error}",
            line.split_whitespace().nth(1).unwrap_or("?")
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Relay restart: the hub comes back and is reachable again.

fn relay_restart(label: &str, signal: &str) {
    let Some(mut bed) = Bed::up(label, Flavour::Preserve, false, None) else { return };
    let keys = bed.start_keyway(&["--ping-interval", "5s"]);
    bed.start_forward(&keys, &[]);
    bed.reach(30);
    let start = std::time::Instant::now();
    bed.kill("relay", signal);
    bed.start_relay();
    bed.wait_for("the hub to register again", Duration::from_secs(60), |b| b.registrations() >= 2);
    let registered = start.elapsed().as_secs_f64();
    let secs = bed.reach(60);
    for warning in bed.log("forward").lines().filter(|l| l.contains("WARN")) {
        eprintln!("[{label}] forward: {warning}");
    }
    report(
        label,
        format!(
            "hub registered again {registered:.2}s after the restart began; app reached it {:.2}s after that",
            secs
        ),
    );
}

#[test]
fn relay_graceful_restart_hub_comes_back() {
    relay_restart("relay restart (SIGTERM)", "-TERM");
}

#[test]
fn relay_crash_restart_hub_comes_back() {
    relay_restart("relay restart (SIGKILL)", "-KILL");
}

// ---------------------------------------------------------------------------------------------
// A real browser in network B: the hub's page and a WebSocket echo through `keyway forward`.

#[test]
fn headless_chromium_loads_the_hub_page_and_a_websocket_echo() {
    let label = "browser";
    let Some(mut bed) = Bed::up(label, Flavour::Preserve, false, None) else { return };
    let chromium = which("chromium");
    if chromium.as_os_str().is_empty() {
        assert!(!in_ci(), "chromium is not installed (CI must install it: .ci/run)");
        eprintln!("SKIPPED {label}: chromium not installed");
        return;
    }
    let keys = bed.start_keyway(&[]);
    bed.start_forward(&keys, &[]);
    bed.reach(30);
    let url = format!("http://127.0.0.1:{FORWARD_PORT}/ws.html");
    let expected = format!("WS-OK echo:ping-through-keyway-{FORWARD_PORT}");
    let mut dom = String::new();
    // Virtual time lets the page's asynchronous WebSocket finish before the DOM is dumped; a
    // few bounded attempts absorb a slow start of the browser on a busy machine.
    for attempt in 1..=3 {
        let profile = bed.path().join(format!("chromium-profile-{attempt}"));
        let out = bed
            .netns_cmd("app", &chromium)
            .env("HOME", bed.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=10000",
                "--timeout=30000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--dump-dom", &url])
            .stderr(std::process::Stdio::null())
            .output()
            .expect("run chromium");
        dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains(&expected) {
            break;
        }
        eprintln!("[{label}] attempt {attempt}: DOM without the echo:\n{dom}");
    }
    assert!(dom.contains("<h1>hub page</h1>"), "the hub's page did not load through the tunnel:\n{dom}");
    assert!(dom.contains(&expected), "no WebSocket echo in the DOM:\n{dom}");
    // The hub saw the page load and the WebSocket as sessions of its own.
    let sessions = bed.log("hub").matches("session accepted").count();
    report(label, format!("page + WebSocket echo through the tunnel ({sessions} sessions at the hub)"));
}
