//! One JSON line per request. Only what operators need and nothing secret: the normalised path
//! without its query (queries carry API keys and tokens), never a header value.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;

use crate::config::AccessLogTarget;

/// Where access-log lines go (`server.access_log`).
pub enum AccessLog {
    Off,
    Stdout,
    File(Mutex<File>),
}

impl AccessLog {
    pub fn open(target: &AccessLogTarget) -> std::io::Result<AccessLog> {
        Ok(match target {
            AccessLogTarget::Off => AccessLog::Off,
            AccessLogTarget::Stdout => AccessLog::Stdout,
            AccessLogTarget::File(path) => AccessLog::File(Mutex::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
        })
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("access log record not encodable: {e}");
                return;
            }
        };
        line.push(b'\n');
        let result = match self {
            AccessLog::Off => Ok(()),
            AccessLog::Stdout => std::io::stdout().lock().write_all(&line),
            AccessLog::File(f) => f.lock().write_all(&line),
        };
        if let Err(e) = result {
            log::warn!("access log write failed: {e}");
        }
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
