//! Public keys the gateway publishes as a JWKS (RFC 7517): the verification keys of every
//! token-signing plugin (`identity_token` in `sign` mode), so services can check the tokens the
//! gateway mints. One registry lives as long as the gateway process; a plugin publishes its
//! keys when it starts and withdraws them when a reload replaced it, so during a reload both
//! generations are published (what a service needs while tokens of both are in flight).
//! Served at the admin listener's `GET /.well-known/jwks.json` and by the `jwks` plugin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// The public keys of every running signing plugin.
#[derive(Debug, Default)]
pub struct KeyRegistry {
    next: AtomicU64,
    keys: Mutex<BTreeMap<u64, Vec<serde_json::Value>>>,
}

impl KeyRegistry {
    /// A handle for one plugin instance's keys.
    pub fn owner(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes (or replaces) the JWKs of `owner`.
    pub fn publish(&self, owner: u64, jwks: Vec<serde_json::Value>) {
        self.keys.lock().insert(owner, jwks);
    }

    pub fn withdraw(&self, owner: u64) {
        self.keys.lock().remove(&owner);
    }

    /// `{"keys": [...]}`: every published key, oldest plugin instance first, no `kid` twice.
    pub fn jwks(&self) -> serde_json::Value {
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<serde_json::Value> = self
            .keys
            .lock()
            .values()
            .flatten()
            .filter(|k| seen.insert(k.get("kid").cloned()))
            .cloned()
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_withdraws_and_dedups_by_kid() {
        let r = KeyRegistry::default();
        let (a, b) = (r.owner(), r.owner());
        r.publish(
            a,
            vec![
                serde_json::json!({"kid": "1"}),
                serde_json::json!({"kid": "2"}),
            ],
        );
        r.publish(b, vec![serde_json::json!({"kid": "2"})]);
        assert_eq!(r.jwks()["keys"].as_array().unwrap().len(), 2);
        r.withdraw(a);
        assert_eq!(r.jwks(), serde_json::json!({"keys": [{"kid": "2"}]}));
    }
}
