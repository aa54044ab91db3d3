//! systemd's readiness and watchdog protocol (`Type=notify`, `WatchdogSec=`), for the relay and
//! the hub connector: one datagram of `KEY=VALUE` lines to the unix socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). A few lines over std's
//! `UnixDatagram` instead of a binding to libsystemd. Without `NOTIFY_SOCKET` every call does
//! nothing, so the binaries behave the same outside systemd.
//!
//! The watchdog pings come from a task on the binary's async runtime: if the runtime wedges
//! (a blocked worker, a dead-locked task holding every thread), the pings stop and systemd
//! restarts the service. A hub that merely cannot reach its relay keeps pinging: that is not
//! something a restart fixes.

use std::io;
use std::time::Duration;

/// The environment variable naming systemd's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1"`, `"WATCHDOG=1"`, `"STOPPING=1"`) to the socket `socket`
/// names: a file system path, or `@name` for the abstract namespace.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets are Linux-only"));
        }
    }
    sock.send_to(state.as_bytes(), socket)?;
    Ok(())
}

/// Sends `state` to systemd if `NOTIFY_SOCKET` is set. `Ok(false)`: not under systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var(NOTIFY_SOCKET) {
        Ok(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// How often to ping, given `WATCHDOG_USEC` and `WATCHDOG_PID` as set (or not) and this
/// process's id: half the timeout, as systemd recommends; `None` if the watchdog is off or
/// meant for another process. Pure, for testing.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

/// Tells systemd the service is ready and, if it asked for a watchdog, starts pinging it from
/// a task on the current tokio runtime. Failures are logged once; they never stop the service.
pub fn ready(what: &str) {
    match notify(&format!("READY=1\nSTATUS={what}")) {
        Ok(true) => tracing::debug!("told systemd: ready"),
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
            return;
        }
    }
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    let Some(every) = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id()) else { return };
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            if let Err(e) = notify("WATCHDOG=1") {
                if !warned {
                    tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                    warned = true;
                }
            }
        }
    });
}

/// Tells systemd the service is stopping (it then waits for the exit instead of counting the
/// time since the last watchdog ping).
pub fn stopping() {
    if let Err(e) = notify("STOPPING=1") {
        tracing::debug!(error = %e, "cannot notify systemd of the stop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_and_only_for_this_process() {
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_state_arrives_as_one_datagram_on_a_path_or_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=test").unwrap();
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("keyway-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let systemd = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
            notify_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
            let n = systemd.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
        // Nobody listening: an error, not a hang.
        assert!(notify_to(dir.path().join("nobody").to_str().unwrap(), "READY=1").is_err());
    }
}
