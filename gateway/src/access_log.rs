//! One JSON line per request. Only what operators need and nothing secret: the normalised path
//! without its query (queries carry API keys and tokens), never a header value.
//!
//! Off the request path: a request encodes its line and hands it to a bounded queue
//! (`tracing-appender`'s non-blocking writer, made for exactly this); one writer thread drains
//! it into a 64 KiB buffer and writes a batch at a time. A full queue (a disk or a pipe that
//! cannot keep up) drops the line and counts it (`sallyport_access_log_dropped_total`): a
//! request never waits for the log. A file is reopened (for logrotate) on SIGUSR1 and after a
//! reload.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};

use crate::config::AccessLogTarget;

/// Bytes the writer thread gathers before a write.
const WRITE_BUFFER: usize = 64 * 1024;

/// Where access-log lines go (`server.access_log`).
pub enum AccessLog {
    Off,
    On {
        queue: NonBlocking,
        dropped: ErrorCounter,
        /// Set by SIGUSR1 or a reload: the writer reopens its file before the next write.
        reopen: Arc<AtomicBool>,
        /// Flushes what is queued when the log is dropped (a clean exit).
        _worker: WorkerGuard,
    },
}

impl AccessLog {
    /// `lines`: how many lines may wait for the writer before new ones are dropped.
    pub fn open(target: &AccessLogTarget, lines: usize) -> std::io::Result<AccessLog> {
        let reopen = Arc::new(AtomicBool::new(false));
        let builder = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(lines.max(1))
            .thread_name("sallyport-access-log");
        let (queue, worker) = match target {
            AccessLogTarget::Off => return Ok(AccessLog::Off),
            AccessLogTarget::Stdout => {
                builder.finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stdout()))
            }
            AccessLogTarget::File(path) => builder.finish(LogFile::open(path, &reopen)?),
        };
        Ok(AccessLog::On {
            dropped: queue.error_counter(),
            queue,
            reopen,
            _worker: worker,
        })
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        match self {
            AccessLog::Off => 0,
            AccessLog::On { dropped, .. } => dropped.dropped_lines() as u64,
        }
    }

    /// The file is reopened before the next line (after logrotate moved it away).
    pub fn reopen(&self) {
        if let AccessLog::On { reopen, .. } = self {
            reopen.store(true, Ordering::Release);
        }
    }

    /// The flag SIGUSR1 sets.
    pub fn reopen_flag(&self) -> Option<Arc<AtomicBool>> {
        match self {
            AccessLog::Off => None,
            AccessLog::On { reopen, .. } => Some(Arc::clone(reopen)),
        }
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        let AccessLog::On { queue, .. } = self else {
            return;
        };
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("access log record not encodable: {e}");
                return;
            }
        };
        line.push(b'\n');
        // Never blocks: a full queue drops the line and counts it.
        let _ = queue.clone().write_all(&line);
    }
}

/// The access-log file, on the writer thread: buffered, reopened when asked.
struct LogFile {
    path: PathBuf,
    file: BufWriter<File>,
    reopen: Arc<AtomicBool>,
}

impl LogFile {
    fn open(path: &std::path::Path, reopen: &Arc<AtomicBool>) -> std::io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(WRITE_BUFFER, append(path)?),
            reopen: Arc::clone(reopen),
        })
    }

    /// Reopens the file when asked (the old one is flushed first); a file that cannot be
    /// opened keeps the old one and says so.
    fn maybe_reopen(&mut self) {
        if !self.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.file.flush() {
            log::warn!("access log: flushing before reopening: {e}");
        }
        match append(&self.path) {
            Ok(f) => self.file = BufWriter::with_capacity(WRITE_BUFFER, f),
            Err(e) => log::error!(
                "access log: cannot reopen {} ({e}); writing to the old file",
                self.path.display()
            ),
        }
    }
}

fn append(path: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    /// The writer thread writes one line per call: reopening here never splits a line.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.maybe_reopen();
        self.file.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The fields of one access-log line.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    /// RFC 3339 time the request completed, see [`now`].
    pub ts: String,
    pub request_id: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    /// `HTTP/1.1`, `HTTP/2` (or `HTTP/1.0`) as the client spoke it.
    pub proto: &'static str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    pub attempts: usize,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    pub body_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_by: Option<(&'a str, &'a str)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The cache's verdict (`hit`, `miss`, `stale`, `revalidated`, `bypass`, `expired`) on
    /// routes with a cache plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'a str>,
    /// Fields plugins added (`RequestCtx::log_fields`), written as top-level keys.
    #[serde(serialize_with = "fields_as_map", flatten)]
    pub extra: &'a [(&'static str, serde_json::Value)],
}

fn fields_as_map<S: serde::Serializer>(
    fields: &&[(&'static str, serde_json::Value)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(fields.len()))?;
    for (k, v) in fields.iter() {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// The current time as written in `ts`.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
