//! Verification keys: a JWKS (file or URL) or an HS secret, each key pinned to the algorithm
//! family (and curve) it can verify, so an RSA public key can never verify an HS256 token.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::Mutex;

/// What kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

pub fn kind_of(alg: Algorithm) -> Kind {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Kind::Hmac,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Kind::Rsa,
        Algorithm::ES256 => Kind::EcP256,
        Algorithm::ES384 => Kind::EcP384,
        Algorithm::EdDSA => Kind::Ed25519,
    }
}

pub struct Key {
    pub kid: Option<String>,
    /// The JWK's own `alg`, when it names one: the key then verifies only that algorithm.
    pub alg: Option<Algorithm>,
    pub kind: Kind,
    pub key: DecodingKey,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.kind == kind_of(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// The key for a token: by `kid` when the token names one, else the first key that can
    /// verify `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Key> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid) && k.accepts(alg)),
            None => self.keys.iter().find(|k| k.accepts(alg)),
        }
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    pub fn secret(secret: &[u8]) -> KeySet {
        KeySet {
            keys: vec![Key {
                kid: None,
                alg: None,
                kind: Kind::Hmac,
                key: DecodingKey::from_secret(secret),
            }],
        }
    }

    /// Parses a JWKS document. Keys that cannot be used (unknown type, bad parameters) are
    /// skipped with a warning; a document with no usable key is an error.
    pub fn from_jwks(text: &str) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let kind = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Kind::Rsa,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => Kind::EcP256,
                    EllipticCurve::P384 => Kind::EcP384,
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Kind::Ed25519
                }
                AlgorithmParameters::OctetKey(_) => Kind::Hmac,
                _ => continue,
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::from_str(&a.to_string()).ok());
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    kind,
                    key,
                }),
                Err(e) => log::warn!("skipping unusable JWK {:?}: {e}", jwk.common.key_id),
            }
        }
        if keys.is_empty() {
            return Err("the JWKS has no usable key".into());
        }
        Ok(KeySet { keys })
    }
}

/// Keys from a URL, kept fresh: periodic refresh and rate-limited refetch on unknown `kid`.
pub struct RemoteKeys {
    url: String,
    client: reqwest::Client,
    pub set: ArcSwap<KeySet>,
    refresh: Duration,
    min_refetch: Duration,
    last_success: Mutex<Option<Instant>>,
    last_attempt: Mutex<Option<Instant>>,
    /// When an unknown `kid` last caused a fetch: such fetches are rate limited on their own.
    last_kid_refetch: Mutex<Option<Instant>>,
    refreshing: AtomicBool,
    fetch_lock: tokio::sync::Mutex<()>,
}

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl RemoteKeys {
    pub fn new(
        url: &str,
        refresh: Duration,
        min_refetch: Duration,
    ) -> Result<Arc<RemoteKeys>, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let remote = Arc::new(RemoteKeys {
            url: url.to_string(),
            client,
            set: ArcSwap::from_pointee(KeySet::default()),
            refresh,
            min_refetch,
            last_success: Mutex::new(None),
            last_attempt: Mutex::new(None),
            last_kid_refetch: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            fetch_lock: tokio::sync::Mutex::new(()),
        });
        Ok(remote)
    }

    /// The first fetch, when the plugin starts (on the gateway's runtime). An unreachable IdP
    /// does not stop the gateway: keys come with a refresh or an unknown-`kid` refetch.
    pub async fn first_fetch(&self) {
        if let Err(e) = self.fetch_now().await {
            log::warn!(
                "JWKS {}: first fetch failed ({e}); will retry on demand",
                self.url
            );
        }
    }

    /// Fetches and, when the document is good, replaces the key set.
    async fn fetch_now(&self) -> Result<(), String> {
        *self.last_attempt.lock() = Some(Instant::now());
        let resp = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let set = KeySet::from_jwks(&text)?;
        self.set.store(Arc::new(set));
        *self.last_success.lock() = Some(Instant::now());
        Ok(())
    }

    /// Starts a background refresh when the set is older than `refresh` (one at a time).
    pub fn refresh_if_stale(self: &Arc<Self>) {
        let stale = self
            .last_success
            .lock()
            .is_none_or(|t| t.elapsed() >= self.refresh)
            && self
                .last_attempt
                .lock()
                .is_none_or(|t| t.elapsed() >= self.min_refetch);
        if stale && !self.refreshing.swap(true, Ordering::AcqRel) {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = me.fetch_now().await {
                    log::warn!(
                        "JWKS {}: refresh failed ({e}); keeping the last good keys",
                        me.url
                    );
                }
                me.refreshing.store(false, Ordering::Release);
            });
        }
    }

    /// After an unknown `kid`: re-fetches unless the last attempt was under `min_refetch` ago
    /// (attackers sending random kids cannot cause a fetch storm). Concurrent callers share
    /// one fetch.
    pub async fn refetch_for_unknown_kid(&self, kid: &str) {
        let _one_at_a_time = self.fetch_lock.lock().await;
        if self.set.load().has_kid(kid) {
            return;
        }
        {
            let mut last = self.last_kid_refetch.lock();
            if last.is_some_and(|t| t.elapsed() < self.min_refetch) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.fetch_now().await {
            log::warn!("JWKS {}: refetch for an unknown kid failed ({e})", self.url);
        }
    }
}
