//! What a plugin answers: continue, or respond to the client now.

use bytes::Bytes;
use http::HeaderName;
use pingora::http::ResponseHeader;

/// The outcome of a plugin's `request_filter`.
#[derive(Debug)]
pub enum Flow {
    /// Pass the request on to the next plugin (and then upstream).
    Continue,
    /// Answer the client with this and end the chain.
    Respond(Reply),
}

/// A response a plugin asks the gateway to send.
#[derive(Debug)]
pub enum Reply {
    /// A JSON error in the gateway's error shape; the gateway adds the request id.
    Error(ApiError),
    /// A complete response; the gateway sets `Content-Length` from the body.
    Full {
        header: Box<ResponseHeader>,
        body: Bytes,
    },
}

impl Reply {
    /// A `200`-style JSON response with the given status.
    pub fn json(status: u16, value: &serde_json::Value) -> pingora::Result<Reply> {
        let body = serde_json::to_vec(value).map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "encoding JSON", e)
        })?;
        let mut header = ResponseHeader::build(status, Some(2))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        Ok(Reply::Full {
            header: Box::new(header),
            body: Bytes::from(body),
        })
    }
}

/// A client-facing error: `{"error":{"status":..,"code":..,"message":..,"request_id":..}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Machine-readable code, e.g. `invalid_token`, `not_found`.
    pub code: &'static str,
    /// Human-readable explanation. Never put a token, key or secret here.
    pub message: String,
    /// The bounded `reason` label of `sallyport_plugin_rejections_total` (defaults to `code`).
    pub reason: &'static str,
    /// Extra response headers, e.g. `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(HeaderName, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            reason: code,
            headers: Vec::new(),
        }
    }

    pub fn with_reason(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The JSON body of this error.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            status: u16,
            code: &'a str,
            message: &'a str,
            request_id: &'a str,
        }
        let body = Body {
            error: Inner {
                status: self.status,
                code: self.code,
                message: &self.message,
                request_id,
            },
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The response header of this error (status, JSON type, extra headers); the caller sets
    /// `Content-Length`.
    pub fn header(&self) -> pingora::Result<ResponseHeader> {
        let mut header = ResponseHeader::build(self.status, Some(4 + self.headers.len()))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        for (name, value) in &self.headers {
            header.append_header(name.clone(), value.as_str())?;
        }
        Ok(header)
    }
}
