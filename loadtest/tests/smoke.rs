//! Smoke runs of every scenario with tiny sizes, so the load generator never rots. They check
//! that each scenario completes without failures and produces its records and figure; they
//! assert nothing about speed (that is what the real runs in `run-all.sh` are for).

use std::path::PathBuf;
use std::time::Duration;

use keyway_loadtest::{bare, bulk, churn, common, handshakes, idle, plot, report, storm, storm_raw, Record};

/// The relay binary: `cargo test --workspace` builds it before any test runs; when this crate
/// is tested alone, build it here.
fn relay_bin() -> PathBuf {
    if let Ok(path) = common::relay_bin(None) {
        return path;
    }
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--bin", "keyway-relay", "-p", "keyway-relay"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building keyway-relay failed");
    common::relay_bin(None).expect("keyway-relay built")
}

fn plots(records: &[Record]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("figure.svg");
    plot::scenario(&path, records).expect("plot");
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "not an SVG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_runs() {
    let opts = bulk::BulkOpts {
        relay_bin: relay_bin(),
        bytes: 1 << 20,
        streams: vec![1, 2],
        repeat: 1,
        paths: bulk::PATHS.iter().map(|p| p.to_string()).collect(),
        links: Vec::new(),
        quiet: true,
    };
    let records = bulk::run(&opts).await.expect("bulk");
    let summaries: Vec<_> = records.iter().filter(|r| r["kind"] == "summary").collect();
    assert_eq!(summaries.len(), 2);
    assert!(summaries.iter().all(|r| r["relayed_gbps"].as_f64().unwrap() > 0.0));
    assert!(summaries.iter().all(|r| r["relay_cpu_s_per_gib"].as_f64().is_some()));
    plots(&records);
}

/// `bulk --rtt 0,20ms --loss 0,0.01`: one summary per combination, carrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_runs_through_links_with_delay_and_loss() {
    let opts = bulk::BulkOpts {
        relay_bin: relay_bin(),
        bytes: 256 << 10,
        streams: vec![1],
        repeat: 1,
        paths: vec!["direct".into(), "relayed".into()],
        links: vec![(Duration::ZERO, 0.0), (Duration::from_millis(20), 0.01)],
        quiet: true,
    };
    let records = bulk::run(&opts).await.expect("bulk through links");
    let summaries: Vec<_> = records.iter().filter(|r| r["kind"] == "summary").collect();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    assert_eq!((summaries[1]["rtt_ms"].as_f64(), summaries[1]["loss"].as_f64()), (Some(20.0), Some(0.01)));
    assert!(summaries
        .iter()
        .all(|r| r["relayed_gbps"].as_f64().unwrap() > 0.0 && r["direct_gbps"].as_f64().unwrap() > 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_hubs_run_against_relay_and_bare_server() {
    let mut opts = idle::IdleOpts {
        target: idle::Target::Relay { bin: relay_bin(), open: false, nodes: 1, cluster: None },
        counts: vec![5, 10],
        hold: Duration::from_millis(200),
        hubs_per_endpoint: 4,
        concurrency: 4,
        env: Vec::new(),
        quiet: true,
    };
    let records = idle::run(&opts).await.expect("idle against relay");
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["failures"] == 0), "{records:?}");
    assert_eq!(records[1]["hubs"], 10);
    plots(&records);

    opts.target = idle::Target::Relay { bin: relay_bin(), open: true, nodes: 1, cluster: None };
    let records = idle::run(&opts).await.expect("idle against open relay");
    assert!(records.iter().all(|r| r["failures"] == 0), "{records:?}");

    opts.target = idle::Target::Bare {
        loadtest_bin: PathBuf::from(env!("CARGO_BIN_EXE_keyway-loadtest")),
        knobs: bare::Knobs::Lean,
    };
    let records = idle::run(&opts).await.expect("idle against bare server");
    assert!(records.iter().all(|r| r["failures"] == 0), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_brings_every_hub_back() {
    let opts = storm::StormOpts {
        relay_bin: relay_bin(),
        hubs: 5,
        signal: "TERM".into(),
        ping_interval: Duration::from_secs(20),
        deadline: Duration::from_secs(60),
        quiet: true,
    };
    let records = storm::run(&opts).await.expect("storm");
    assert_eq!(records[0]["failures"], 0, "{records:?}");
    let back: u64 = records[0]["buckets"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(back, 5);
    plots(&records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_storm_brings_every_hub_back_after_term_and_kill() {
    let mut opts = storm_raw::RawStormOpts {
        relay_bin: relay_bin(),
        hubs: 6,
        signal: "TERM".into(),
        sources: 3,
        per_ip_rate: 10.0,
        per_ip_burst: 30,
        retry_threshold: 100,
        max_handshakes_in_flight: 256,
        deadline: Duration::from_secs(60),
        concurrency: 4,
        generator_in_flight: 2,
        quiet: true,
    };
    let term = storm_raw::run(&opts).await.expect("raw storm, TERM");
    assert_eq!(term[0]["failures"], 0, "{term:?}");
    assert_eq!(term[0]["sources"], 3);
    // A graceful stop tells every hub to move.
    assert_eq!(term[0]["go_aways"], 6, "{term:?}");
    plots(&term);

    // After a crash nobody says goodbye: the hubs learn of the new run from the stateless reset
    // that answers their next keep-alive (the raw hub has no liveness ping).
    opts.signal = "KILL".into();
    let kill = storm_raw::run(&opts).await.expect("raw storm, KILL");
    assert_eq!(kill[0]["failures"], 0, "{kill:?}");
    assert_eq!(kill[0]["resets"], 6, "{kill:?}");
    assert_eq!(kill[0]["go_aways"], 0, "{kill:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_at_a_fixed_rate_all_complete_and_a_cap_of_one_refuses_some() {
    let mut opts = handshakes::HandshakeOpts {
        relay_bin: relay_bin(),
        rates: vec![20],
        duration: Duration::from_millis(500),
        sources: 2,
        relay_flags: vec![],
        quiet: true,
    };
    let records = handshakes::run(&opts).await.expect("handshakes");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["registered"], 10, "{records:?}");
    assert_eq!(records[0]["timed_out"], 0, "{records:?}");

    // 400 attempts in 0.2 s against one handshake at a time: some find it busy and are
    // refused before the handshake, and each one is either registered or refused.
    opts.rates = vec![2000];
    opts.duration = Duration::from_millis(200);
    opts.relay_flags = vec![("--max-handshakes-in-flight".into(), "1".into())];
    let capped = handshakes::run(&opts).await.expect("handshakes, capped");
    let (done, refused) = (capped[0]["registered"].as_u64().unwrap(), capped[0]["refused"].as_u64().unwrap());
    assert!(refused > 0, "{capped:?}");
    assert_eq!(done + refused, 400, "{capped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_measures_cold_and_warm() {
    let opts = churn::ChurnOpts {
        relay_bin: relay_bin(),
        rate: 10.0,
        duration: Duration::from_millis(500),
        pings: 2,
        quiet: true,
    };
    let records = churn::run(&opts).await.expect("churn");
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r["failures"], 0, "{r}");
        assert!(r["sessions"].as_u64().unwrap() >= 5);
    }
    plots(&records);

    // The README table renders from these records.
    let dir = tempfile::tempdir().unwrap();
    common::write_records(&records, Some(&dir.path().join("churn.jsonl"))).unwrap();
    let table = report::table(dir.path(), "test machine").unwrap();
    assert!(table.contains("| churn | cold"), "{table}");
}
