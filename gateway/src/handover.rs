//! Process lifecycle around Pingora's signals: a zero-downtime upgrade that cannot take the
//! service down, connections accepted at the last moment that still get their answer, and one
//! instance per run directory.
//!
//! - **SIGQUIT** starts an upgrade only when a new process (`sallyport -u`) is listening on
//!   the upgrade socket. Pingora's own handling sends the sockets to whoever is there and
//!   shuts down even when nobody took them: a failed `-u` (a bad config) then left nothing
//!   listening. Without a taker the signal is logged and the process keeps serving.
//! - **Last-moment connections**: once the listeners close, Pingora drops every connection
//!   whose request head it has not read yet. A client that connected just before (its
//!   request in flight) would see the connection close without an answer; the connection
//!   guard ([`crate::conn::Guard`]) gives such connections [`FIRST_REQUEST_GRACE`] to deliver
//!   their head first, by delaying Pingora's cleanup.
//! - **Run files**: the pid file names the live instance; a second one with the same run
//!   directory refuses to start (a `-u` process is the expected exception).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};

/// How long a connection accepted before the listeners closed may take to deliver its first
/// request head before shutdown closes it.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// SIGHUP, SIGQUIT, SIGTERM and SIGINT caught from the first line of `main`: their default
/// action kills the process, so one sent while it starts (an operator's `kill -QUIT` right
/// after the new process of an upgrade took the sockets, a reload during start-up) would
/// take it down. A caught SIGQUIT/SIGTERM/SIGINT is acted on once the gateway runs; an early
/// SIGHUP needs nothing (the config being loaded is the newest).
#[derive(Debug, Default, Clone)]
pub struct EarlySignals {
    quit: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
    int: Arc<AtomicBool>,
}

impl EarlySignals {
    pub fn install() -> std::io::Result<EarlySignals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        let early = EarlySignals::default();
        signal_hook::flag::register(SIGHUP, Arc::new(AtomicBool::new(false)))?;
        signal_hook::flag::register(SIGQUIT, Arc::clone(&early.quit))?;
        signal_hook::flag::register(SIGTERM, Arc::clone(&early.term))?;
        signal_hook::flag::register(SIGINT, Arc::clone(&early.int))?;
        Ok(early)
    }
}

/// Pingora's signal watch with a guarded upgrade (see the module docs).
pub struct Signals {
    pub upgrade_sock: String,
    pub early: EarlySignals,
}

impl Signals {
    /// The decision for a SIGQUIT: upgrade when someone takes the listeners, else `None`.
    fn on_quit(&self) -> Option<ShutdownSignal> {
        if upgrade_taker_waiting(&self.upgrade_sock) {
            log::info!(
                "SIGQUIT: handing the listeners to the process waiting on {}",
                self.upgrade_sock
            );
            return Some(ShutdownSignal::GracefulUpgrade);
        }
        log::error!(
            "SIGQUIT ignored: no new process is waiting on {}; start `sallyport -u -c <config>` \
             first and signal once it listens there. Still serving.",
            self.upgrade_sock
        );
        None
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot listen for SIGQUIT/SIGTERM/SIGINT; stopping");
            return ShutdownSignal::GracefulTerminate;
        };
        // Handlers are in place now; signals caught before them are acted on first.
        if self.early.int.swap(false, Ordering::AcqRel) {
            return ShutdownSignal::FastShutdown;
        }
        if self.early.term.swap(false, Ordering::AcqRel) {
            return ShutdownSignal::GracefulTerminate;
        }
        if self.early.quit.swap(false, Ordering::AcqRel) {
            if let Some(decision) = self.on_quit() {
                return decision;
            }
        }
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    if let Some(decision) = self.on_quit() {
                        return decision;
                    }
                }
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

/// Whether a process listens on the Unix socket at `path`. Read from `/proc/net/unix`
/// rather than by connecting: the new process accepts exactly one connection there and
/// expects the sockets on it, so a probe would spoil the upgrade.
///
/// `/proc/net/unix` names sockets by the path they were bound to, in whatever mount
/// namespace: a process with a private `/tmp` (systemd's `PrivateTmp`) could bind the same
/// name elsewhere. The path must therefore also be a socket as this process sees it.
pub fn upgrade_taker_waiting(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    // __SO_ACCEPTCON in the Flags column: the socket is listening.
    const LISTENING: u32 = 1 << 16;
    let visible_here = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !visible_here {
        return false;
    }
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & LISTENING != 0)
    })
}

/// The pid in `pid_file` when it names a live process other than this one that runs the same
/// program (a pid left by a killed gateway may since belong to something else).
pub fn live_instance(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let program = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    let same_program = program(&pid.to_string()).is_some_and(|c| Some(c) == program("self"));
    (pid != std::process::id() && same_program).then_some(pid)
}

/// Writes this process's pid (creating the run directory when needed).
pub fn write_pid(pid_file: &Path) -> std::io::Result<()> {
    if let Some(dir) = pid_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(pid_file, format!("{}\n", std::process::id()))
}

/// Removes the pid file if it still names this process (a successor may have replaced it).
pub fn remove_pid(pid_file: &Path) {
    let ours = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(std::process::id());
    if ours {
        let _ = std::fs::remove_file(pid_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_unix_socket_is_seen_and_a_stale_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let path_s = path.display().to_string();
        assert!(!upgrade_taker_waiting(&path_s));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(upgrade_taker_waiting(&path_s));
        drop(listener);
        assert!(path.exists(), "the file stays behind");
        // A process forked by a concurrent test holds a copy of the descriptor until it
        // execs (close-on-exec): the socket stops listening once that copy is gone too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while upgrade_taker_waiting(&path_s) {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening after close"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Run only as the "twin" process of `pid_files_name_live_instances`.
    #[test]
    #[ignore]
    fn never_returns() {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    #[test]
    fn pid_files_name_live_instances() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run/sallyport.pid");
        assert_eq!(live_instance(&file), None);
        write_pid(&file).unwrap();
        assert_eq!(
            live_instance(&file),
            None,
            "this process is not another instance"
        );
        std::fs::write(&file, "1\n").unwrap();
        assert_eq!(
            live_instance(&file),
            None,
            "pid 1 is alive but another program"
        );
        // The test binary again, waiting in a test that never ends until killed.
        let mut twin = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "handover::tests::never_returns", "--ignored"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(&file, format!("{}\n", twin.id())).unwrap();
        let seen = live_instance(&file);
        let _ = twin.kill();
        let _ = twin.wait();
        assert_eq!(seen, Some(twin.id()), "the same program, alive");
        std::fs::write(&file, "4194305\n").unwrap();
        assert_eq!(live_instance(&file), None, "beyond pid_max: dead");
        remove_pid(&file);
        assert!(file.exists(), "not ours: kept");
    }
}
