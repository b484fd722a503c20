//! Where the running config comes from: the main file and the files its `include` patterns
//! match (relative to the main file's folder), merged into one config. Included files hold
//! only `[upstreams.*]`, `[plugins.*]` and `[[routes]]`; a name defined twice is an error
//! naming both files; routes keep file order (the main file's first, then each pattern's
//! matches sorted by path). Errors in an included table say which file it came from.
//!
//! A loaded config also has a hash (of its effective, merged form: two nodes with the same
//! hash run the same config, however it was split into files), the list of its files, and a
//! copy with secrets redacted for the admin `GET /config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{self, Config, ConfigError, ConfigErrors};

/// The tables an included file may hold.
const INCLUDABLE: [&str; 3] = ["upstreams", "plugins", "routes"];

/// What `GET /config` shows about the running config.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The main file, then every included file, in merge order.
    pub files: Vec<PathBuf>,
    /// 16 hex digits of the SHA-256 of the effective config.
    pub hash: String,
    pub loaded_at: SystemTime,
    /// The merged config as JSON, secrets replaced by `"[redacted]"`.
    pub effective: Value,
}

fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::from(ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        ))
    })
}

/// The files an include pattern matches, sorted (a pattern without `*` names one file, which
/// must exist).
fn matches(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let text = full
        .to_str()
        .ok_or_else(|| format!("{pattern:?} is not valid UTF-8"))?;
    let mut found: Vec<PathBuf> = glob::glob(text)
        .map_err(|e| format!("{pattern:?} is not a valid pattern: {e}"))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    if found.is_empty() && !pattern.contains(['*', '?', '[']) {
        return Err(format!("{} does not exist", full.display()));
    }
    Ok(found)
}

/// Reads the main file and its includes: the merged config (validated), and its source.
pub fn load(path: &Path) -> Result<(Config, ConfigSource), ConfigErrors> {
    let main_text = read_text(path)?;
    // Typed first: good messages with line numbers for the main file.
    let main = config::parse(&main_text)?;
    let mut table: toml::Table = toml::from_str(&main_text)
        .map_err(|e| ConfigErrors::from(ConfigError::new("", e.message().to_string())))?;
    let mut files = vec![path.to_path_buf()];
    // Which included file defined each upstream, plugin and route index (for messages), and
    // which file defined each name at all (for duplicates).
    let mut origins: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut defined: BTreeMap<String, PathBuf> = BTreeMap::new();
    let config = if main.include.is_empty() {
        main
    } else {
        let base = path.parent().unwrap_or(Path::new("."));
        let mut errors = Vec::new();
        let mut routes_seen = table
            .get("routes")
            .and_then(toml::Value::as_array)
            .map_or(0, Vec::len);
        for (kind, t) in [("upstreams", &table), ("plugins", &table)] {
            if let Some(names) = t.get(kind).and_then(toml::Value::as_table) {
                for name in names.keys() {
                    defined.insert(format!("{kind}.{name}"), path.to_path_buf());
                }
            }
        }
        for (i, pattern) in main.include.iter().enumerate() {
            let found = match matches(base, pattern) {
                Ok(f) => f,
                Err(m) => {
                    errors.push(ConfigError::new(format!("include[{i}]"), m));
                    continue;
                }
            };
            for file in found {
                if files.contains(&file) {
                    continue;
                }
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        errors.push(ConfigError::new(
                            format!("include[{i}]"),
                            format!("cannot read {}: {e}", file.display()),
                        ));
                        continue;
                    }
                };
                let part: toml::Table = match toml::from_str(&text) {
                    Ok(t) => t,
                    Err(e) => {
                        let line = e
                            .span()
                            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                        errors.push(ConfigError::new(
                            file.display().to_string(),
                            match line {
                                Some(l) => format!("{} (line {l})", e.message().trim()),
                                None => e.message().trim().to_string(),
                            },
                        ));
                        continue;
                    }
                };
                for (key, value) in part {
                    if !INCLUDABLE.contains(&key.as_str()) {
                        errors.push(ConfigError::new(
                            format!("{}: {key}", file.display()),
                            "an included file may hold only [upstreams.*], [plugins.*] and [[routes]]",
                        ));
                        continue;
                    }
                    if key == "routes" {
                        let Some(list) = value.as_array() else {
                            errors.push(ConfigError::new(
                                format!("{}: routes", file.display()),
                                "must be an array of tables ([[routes]])",
                            ));
                            continue;
                        };
                        for route in list {
                            origins.insert(format!("routes[{routes_seen}]"), file.clone());
                            routes_seen += 1;
                            if let toml::Value::Array(all) = table
                                .entry("routes")
                                .or_insert_with(|| toml::Value::Array(Vec::new()))
                            {
                                all.push(route.clone());
                            }
                        }
                        continue;
                    }
                    let Some(named) = value.as_table() else {
                        errors.push(ConfigError::new(
                            format!("{}: {key}", file.display()),
                            "must be a table of named entries",
                        ));
                        continue;
                    };
                    let target = table
                        .entry(key.clone())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    let Some(target) = target.as_table_mut() else {
                        continue;
                    };
                    for (name, entry) in named {
                        let id = format!("{key}.{name}");
                        if let Some(first) = defined.get(&id) {
                            errors.push(ConfigError::new(
                                id.clone(),
                                format!(
                                    "defined in both {} and {}",
                                    first.display(),
                                    file.display()
                                ),
                            ));
                            continue;
                        }
                        defined.insert(id.clone(), file.clone());
                        origins.insert(id, file.clone());
                        target.insert(name.clone(), entry.clone());
                    }
                }
                files.push(file);
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let merged = toml::Value::Table(table.clone());
        serde_path_to_error::deserialize::<_, Config>(merged).map_err(|e| {
            let path = e.path().to_string();
            ConfigErrors::from(ConfigError::new(
                from_file(&path, &origins),
                e.into_inner().message().trim().to_string(),
            ))
        })?
    };
    let mut errors = config::validate(&config);
    errors.extend(crate::certs::check(&config));
    if !errors.is_empty() {
        return Err(ConfigErrors(
            errors
                .into_iter()
                .map(|e| ConfigError::new(from_file(&e.path, &origins), e.message))
                .collect(),
        ));
    }
    let mut effective = serde_json::to_value(&table).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut effective {
        m.remove("include");
    }
    let shown = redact_config(effective.clone());
    // Canonical: keys sorted at every level, so key order and file layout do not matter.
    let hash = Sha256::digest(canonical(&effective).as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let source = ConfigSource {
        files,
        hash,
        loaded_at: SystemTime::now(),
        effective: shown,
    };
    Ok((config, source))
}

/// JSON with every object's keys sorted.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(canonical).collect::<Vec<_>>().join(",")
            )
        }
        other => other.to_string(),
    }
}

/// An error path with the included file it points into: `upstreams.orders.endpoints[0]
/// (conf.d/orders.toml)`.
fn from_file(path: &str, origins: &BTreeMap<String, PathBuf>) -> String {
    let mut parts = path.split('.');
    let head = match (parts.next(), parts.next()) {
        (Some(kind @ ("upstreams" | "plugins")), Some(name)) => {
            format!("{kind}.{}", name.split('[').next().unwrap_or(name))
        }
        (Some(first), _) => first.to_string(),
        _ => String::new(),
    };
    match origins.get(&head) {
        Some(file) => format!("{path} ({})", file.display()),
        None => path.to_string(),
    }
}

/// [`redact`] for a whole config: the names of upstreams and plugins are not keys (a plugin
/// named `token` is shown, its `secret` is not).
pub fn redact_config(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("upstreams" | "plugins", Value::Object(named)) => {
                            Value::Object(named.into_iter().map(|(n, e)| (n, redact(e))).collect())
                        }
                        (_, other) => {
                            redact(Value::Object([(k.clone(), other)].into_iter().collect()))
                                .get(&k)
                                .cloned()
                                .unwrap_or(Value::Null)
                        }
                    };
                    (k, v)
                })
                .collect(),
        ),
        other => redact(other),
    }
}

/// Whether a key names a secret (its value is never shown).
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('-', "_");
    [
        "secret",
        "password",
        "passwd",
        "token",
        "api_key",
        "private_key",
        "authorization",
        "cookie",
        "auth",
    ]
    .iter()
    .any(|s| k == *s || k.ends_with(&format!("_{s}")))
        || ["keys", "equals", "value"].contains(&k.as_str())
}

/// The config with secrets replaced: values of secret-named keys, header values (they may
/// carry credentials), and the user-info part of URLs (`redis://user:pass@host`).
pub fn redact(value: Value) -> Value {
    const HIDDEN: &str = "[redacted]";
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if secret_key(&k) {
                        Value::String(HIDDEN.into())
                    } else if k == "headers" || k == "set" {
                        match v {
                            Value::Object(h) => Value::Object(
                                h.into_iter()
                                    .map(|(n, _)| (n, Value::String(HIDDEN.into())))
                                    .collect(),
                            ),
                            other => redact(other),
                        }
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        Value::String(s) => Value::String(without_userinfo(&s)),
        other => other,
    }
}

fn without_userinfo(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
        None => s.to_string(),
    }
}

/// A fingerprint of the bytes of the main file and of every file its include patterns match
/// now (unparsable files included): the watcher reloads when it changes.
pub fn fingerprint(path: &Path, tls: &[PathBuf]) -> String {
    let mut hasher = Sha256::new();
    let main = std::fs::read(path).unwrap_or_default();
    hasher.update(&main);
    // Certificate and key files: a renewal (cert-manager, certbot) reloads as an edit does.
    for file in tls {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(file).unwrap_or_default());
    }
    #[derive(Deserialize)]
    struct Includes {
        #[serde(default)]
        include: Vec<String>,
    }
    let includes = std::str::from_utf8(&main)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(t).ok())
        .and_then(|t| {
            Includes::deserialize(toml::Value::Table(t))
                .ok()
                .map(|i| i.include)
        })
        .unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("."));
    for pattern in includes {
        for file in matches(base, &pattern).unwrap_or_default() {
            hasher.update(file.to_string_lossy().as_bytes());
            hasher.update(std::fs::read(&file).unwrap_or_default());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The folders to watch for a config: the main file's, each include pattern's, and those of
/// its certificate and key files.
pub fn watched_dirs(path: &Path, config: &Config) -> Vec<PathBuf> {
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut dirs = vec![base.clone()];
    let patterns = config.include.iter().map(|p| base.join(p));
    for file in patterns.chain(tls_files(config)) {
        if let Some(dir) = file.parent() {
            let dir = dir.to_path_buf();
            if !dirs.contains(&dir) && !dir.to_string_lossy().contains(['*', '?', '[']) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// The certificate, key and CA files a config names: its TLS listeners' and its upstreams'.
pub fn tls_files(config: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for t in &config.server.tls {
        files.push(PathBuf::from(&t.cert));
        files.push(PathBuf::from(&t.key));
        files.extend(t.client_ca.iter().map(PathBuf::from));
        for c in &t.certs {
            files.push(PathBuf::from(&c.cert));
            files.push(PathBuf::from(&c.key));
        }
    }
    for up in config.upstreams.values() {
        for f in [&up.ca_file, &up.client_cert, &up.client_key]
            .into_iter()
            .flatten()
        {
            files.push(PathBuf::from(f));
        }
    }
    files.sort();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_but_the_shape_stays() {
        let v = serde_json::json!({
            "plugins": {
                "auth": {"type": "jwt", "secret": "s3cret", "secret_env": "JWT_SECRET"},
                "q": {"type": "quota", "redis_url": "redis://user:pw@10.0.0.5:6379/0"},
                "apikeys": {"type": "key_auth", "keys": {"alice": "x"}},
                "token": {"type": "trace"},
                "inject": {"type": "headers", "request": {"set": {"x-api-key": "k-123", "x-env": "prod"}}},
                "canary": {"type": "traffic_split", "when": {"header": "x-beta", "equals": "s3cr3t"}},
            },
            "telemetry": {"headers": {"authorization": "Bearer abc"}},
            "upstreams": {"a": {"endpoints": ["127.0.0.1:1"]}},
        });
        let r = redact_config(v);
        assert_eq!(r["plugins"]["auth"]["secret"], "[redacted]");
        assert_eq!(
            r["plugins"]["auth"]["secret_env"], "JWT_SECRET",
            "the variable's name is no secret"
        );
        assert_eq!(
            r["plugins"]["q"]["redis_url"],
            "redis://[redacted]@10.0.0.5:6379/0"
        );
        assert_eq!(r["plugins"]["apikeys"]["keys"], "[redacted]");
        assert_eq!(
            r["plugins"]["token"]["type"], "trace",
            "names are not secrets"
        );
        assert_eq!(
            r["plugins"]["inject"]["request"]["set"]["x-api-key"],
            "[redacted]"
        );
        assert_eq!(
            r["plugins"]["inject"]["request"]["set"]["x-env"],
            "[redacted]"
        );
        assert_eq!(r["plugins"]["canary"]["when"]["equals"], "[redacted]");
        assert_eq!(r["plugins"]["canary"]["when"]["header"], "x-beta");
        assert_eq!(r["telemetry"]["headers"]["authorization"], "[redacted]");
        assert_eq!(r["upstreams"]["a"]["endpoints"][0], "127.0.0.1:1");
    }
}
