//! The certificates of TLS listeners: a default one and more chosen by the client's SNI
//! (an exact name beats a `*.suffix` wildcard, which covers one label), held by a rustls
//! resolver whose table a reload swaps, so new certificates take effect without a restart
//! (connections already open keep theirs). Files are checked when a config is loaded
//! (`--check` too): readable PEM, a key that matches its certificate, no name claimed twice;
//! an expired certificate is a warning. Client certificates (mTLS) are verified against
//! `client_ca` when `client_auth` asks for them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::{ClientAuthMode, Config, ConfigError, TlsListener};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, checked to belong together.
pub fn load_pair(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {cert}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert}: not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert}: no certificate in it"));
    }
    for der in &chain {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("{cert}: a certificate cannot be parsed: {e}"))?;
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{key}: no private key read: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{key}: unusable private key: {e}"))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match()
        .map_err(|_| format!("{key} is not the key of {cert}"))?;
    Ok(Arc::new(pair))
}

/// Whether the leaf certificate has expired (a warning, not an error: it may be renewed
/// before it matters, and refusing to start would be worse).
fn expired(pair: &CertifiedKey) -> bool {
    let Some(leaf) = pair.cert.first() else {
        return false;
    };
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| !c.validity().is_valid())
        .unwrap_or(false)
}

/// Certificates by name.
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `(".example.org", cert)` for `*.example.org`.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl CertTable {
    /// Loads a listener's certificates; `path` is its config path (`server.tls[0]`).
    pub fn load(path: &str, tls: &TlsListener) -> Result<CertTable, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let default = load_pair(&tls.cert, &tls.key)
            .map_err(|m| errors.push(ConfigError::new(format!("{path}.cert"), m)))
            .ok();
        let mut exact = HashMap::new();
        let mut wildcard: Vec<(String, Arc<CertifiedKey>)> = Vec::new();
        for (i, entry) in tls.certs.iter().enumerate() {
            let at = format!("{path}.certs[{i}]");
            let pair = match load_pair(&entry.cert, &entry.key) {
                Ok(p) => p,
                Err(m) => {
                    errors.push(ConfigError::new(format!("{at}.cert"), m));
                    continue;
                }
            };
            if expired(&pair) {
                log::warn!("{at}: the certificate {} has expired", entry.cert);
            }
            if entry.names.is_empty() {
                errors.push(ConfigError::new(
                    format!("{at}.names"),
                    "list at least one name",
                ));
            }
            for (j, raw) in entry.names.iter().enumerate() {
                let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
                let taken = if let Some(suffix) = name.strip_prefix('*') {
                    if !suffix.starts_with('.') || suffix[1..].is_empty() || suffix.contains('*') {
                        errors.push(ConfigError::new(
                            format!("{at}.names[{j}]"),
                            "a wildcard is \"*.\" and a domain, e.g. \"*.example.org\"",
                        ));
                        continue;
                    }
                    let dup = wildcard.iter().any(|(s, _)| s == suffix);
                    if !dup {
                        wildcard.push((suffix.to_string(), Arc::clone(&pair)));
                    }
                    dup
                } else if name.is_empty() || name.contains(['*', ' ', '/']) {
                    errors.push(ConfigError::new(
                        format!("{at}.names[{j}]"),
                        format!("{raw:?} is not a host name"),
                    ));
                    continue;
                } else {
                    exact.insert(name, Arc::clone(&pair)).is_some()
                };
                if taken {
                    errors.push(ConfigError::new(
                        format!("{at}.names[{j}]"),
                        format!("{raw} is claimed by another certificate of this listener"),
                    ));
                }
            }
        }
        match (default, errors.is_empty()) {
            (Some(default), true) => {
                if expired(&default) {
                    log::warn!("{path}.cert: the certificate {} has expired", tls.cert);
                }
                Ok(CertTable {
                    exact,
                    wildcard,
                    default,
                })
            }
            _ => Err(errors),
        }
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return Arc::clone(&self.default);
        };
        if let Some(c) = self.exact.get(&name) {
            return Arc::clone(c);
        }
        // One label: `a.example.org` matches `*.example.org`, `a.b.example.org` does not.
        if let Some((_, rest)) = name.split_once('.') {
            let suffix = format!(".{rest}");
            if let Some((_, c)) = self.wildcard.iter().find(|(s, _)| *s == suffix) {
                return Arc::clone(c);
            }
        }
        Arc::clone(&self.default)
    }
}

/// The resolver of one TLS listener.
pub struct SniResolver {
    table: ArcSwap<CertTable>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl SniResolver {
    pub fn new(table: CertTable) -> Arc<SniResolver> {
        Arc::new(SniResolver {
            table: ArcSwap::from_pointee(table),
        })
    }

    /// New connections get these certificates.
    pub fn replace(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.table.load().pick(hello.server_name()))
    }
}

/// The client-certificate verifier of a listener with `client_auth`.
pub fn client_verifier(
    path: &str,
    tls: &TlsListener,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, ConfigError> {
    if tls.client_auth == ClientAuthMode::None {
        return Ok(None);
    }
    let Some(ca) = &tls.client_ca else {
        return Err(ConfigError::new(
            format!("{path}.client_ca"),
            "client_auth needs the CAs that sign client certificates",
        ));
    };
    let certs = crate::config::read_certs(ca)
        .map_err(|m| ConfigError::new(format!("{path}.client_ca"), m))?;
    let mut roots = rustls::RootCertStore::empty();
    for der in certs {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| ConfigError::new(format!("{path}.client_ca"), e.to_string()))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if tls.client_auth == ClientAuthMode::Optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map(Some)
        .map_err(|e| ConfigError::new(format!("{path}.client_ca"), e.to_string()))
}

/// Every certificate problem of a config (for `--check` and reloads).
pub fn check(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (name, up) in &config.upstreams {
        if let (Some(cert), Some(key)) = (&up.client_cert, &up.client_key) {
            if let Err(m) = load_pair(cert, key) {
                errors.push(ConfigError::new(format!("upstreams.{name}.client_key"), m));
            }
        }
    }
    for (i, tls) in config.server.tls.iter().enumerate() {
        let path = format!("server.tls[{i}]");
        if let Err(e) = CertTable::load(&path, tls) {
            errors.extend(e);
        }
        if let Err(e) = client_verifier(&path, tls) {
            errors.push(e);
        }
        if tls.client_auth == ClientAuthMode::None && tls.client_ca.is_some() {
            errors.push(ConfigError::new(
                format!("{path}.client_ca"),
                "only used with client_auth = \"optional\" or \"require\"",
            ));
        }
        if let Some(h) = &tls.forward_client_cert {
            if let Err(m) = h.value() {
                errors.push(ConfigError::new(format!("{path}.forward_client_cert"), m));
            } else if tls.client_auth == ClientAuthMode::None {
                errors.push(ConfigError::new(
                    format!("{path}.forward_client_cert"),
                    "needs client_auth = \"optional\" or \"require\"",
                ));
            }
        }
    }
    errors
}

/// The verified client certificate of a TLS connection (`forward_client_cert`), kept in the
/// connection's TLS digest.
pub struct ClientCert {
    /// The header that carries it upstream.
    pub header: http::HeaderName,
    /// The certificate's subject as an RFC 4514 string (`CN=alice,O=Acme`), ready to send.
    pub subject: http::HeaderValue,
}

/// After each handshake of a listener with `forward_client_cert`: the subject of the client's
/// certificate, which rustls verified against `client_ca` during the handshake (a certificate
/// that fails verification fails the handshake, so one that is here was verified).
pub struct ForwardClientCert {
    pub header: http::HeaderName,
}

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for ForwardClientCert {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = rfc4514(cert.subject())?;
        let Ok(subject) = http::HeaderValue::from_str(&subject) else {
            return None;
        };
        Some(Arc::new(ClientCert {
            header: self.header.clone(),
            subject,
        }))
    }
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, `TYPE=value` joined by
/// `,` (`+` within a multi-valued RDN), the special characters escaped with `\`, and every
/// byte outside printable ASCII as `\XX` (so the string is a valid header value and a `,`
/// inside a value cannot pass for a separator). `None` when a value is not a string type or a
/// type has no short name and no OID form.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in name.iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let kind = x509_parser::objects::oid2abbrev(oid, registry)
                .map(str::to_string)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = atv.as_str().ok()?;
            parts.push(format!("{kind}={}", escape_dn_value(value)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// RFC 4514 2.4 escaping of one attribute value.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.len().saturating_sub(1);
    for (i, b) in value.bytes().enumerate() {
        match b {
            b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            b'#' if i == 0 => out.push_str("\\#"),
            b' ' if i == 0 || i == last => out.push_str("\\ "),
            0x21..=0x7e | b' ' => out.push(b as char),
            _ => out.push_str(&format!("\\{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod rfc4514_tests {
    #[test]
    fn values_are_escaped_and_non_ascii_is_hex() {
        assert_eq!(
            super::escape_dn_value("alice, O=Admins"),
            "alice\\, O=Admins"
        );
        assert_eq!(super::escape_dn_value("Müller"), "M\\C3\\BCller");
        assert_eq!(super::escape_dn_value(" #x "), "\\ #x\\ ");
        assert_eq!(super::escape_dn_value("#x"), "\\#x");
    }

    #[test]
    fn the_last_rdn_comes_first() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert_eq!(
            super::rfc4514(parsed.subject()).as_deref(),
            Some("CN=alice,O=Acme\\, Inc.")
        );
    }
}
