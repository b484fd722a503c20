//! Signing keys of `identity_token`: a PEM private key, its public JWK (RFC 7517) and its
//! RFC 7638 thumbprint as the default `kid`. The public parts are derived with `ring` (the
//! JWT library can sign with the key but not describe an Ed25519 one as a JWK).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use ring::signature::KeyPair;
use sha2::{Digest, Sha256};

/// One signing key.
pub struct SigningKey {
    pub algorithm: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    /// The public JWK with `kid`, `alg` and `use`.
    pub jwk: serde_json::Value,
}

/// The DER of the first PEM block and its label.
fn pem(text: &str) -> Result<(String, Vec<u8>), String> {
    let start = text
        .find("-----BEGIN ")
        .ok_or("is not a PEM file (no -----BEGIN line)")?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----").ok_or("has a broken BEGIN line")?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end = rest
        .find(&format!("-----END {label}-----"))
        .ok_or("has no matching END line")?;
    let body: String = rest[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = STANDARD
        .decode(body)
        .map_err(|_| "has a PEM body that is not base64")?;
    Ok((label, der))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace.
fn thumbprint(required: &[(&str, &str)]) -> String {
    let members: Vec<String> = required
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect();
    b64(&Sha256::digest(format!("{{{}}}", members.join(","))))
}

impl SigningKey {
    /// Reads a private key for `algorithm` (EdDSA: Ed25519 PKCS#8; ES256: P-256 PKCS#8;
    /// RS256: PKCS#8 or PKCS#1, at least 2048 bits).
    pub fn from_pem(text: &str, algorithm: Algorithm, kid: Option<&str>) -> Result<Self, String> {
        let (label, der) = pem(text)?;
        let (members, encoding): (Vec<(&str, String)>, _) = match algorithm {
            Algorithm::EdDSA => {
                let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                    .map_err(|_| "is not an Ed25519 private key in PKCS#8 (openssl genpkey -algorithm ed25519)")?;
                (
                    vec![
                        ("crv", "Ed25519".to_string()),
                        ("kty", "OKP".to_string()),
                        ("x", b64(pair.public_key().as_ref())),
                    ],
                    EncodingKey::from_ed_der(&der),
                )
            }
            Algorithm::ES256 => {
                let rng = ring::rand::SystemRandom::new();
                let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &der,
                    &rng,
                )
                .map_err(|_| "is not a P-256 private key in PKCS#8 (openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:P-256)")?;
                let point = pair.public_key().as_ref();
                if point.len() != 65 {
                    return Err("has an unexpected P-256 public point".into());
                }
                (
                    vec![
                        ("crv", "P-256".to_string()),
                        ("kty", "EC".to_string()),
                        ("x", b64(&point[1..33])),
                        ("y", b64(&point[33..65])),
                    ],
                    EncodingKey::from_ec_der(&der),
                )
            }
            Algorithm::RS256 => {
                let pair = if label == "RSA PRIVATE KEY" {
                    ring::signature::RsaKeyPair::from_der(&der)
                } else {
                    ring::signature::RsaKeyPair::from_pkcs8(&der)
                }
                .map_err(|_| "is not an RSA private key of 2048 to 4096 bits")?;
                let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
                let encoding = EncodingKey::from_rsa_pem(text.as_bytes())
                    .map_err(|e| format!("cannot be used to sign: {e}"))?;
                (
                    vec![
                        ("e", b64(&public.e)),
                        ("kty", "RSA".to_string()),
                        ("n", b64(&public.n)),
                    ],
                    encoding,
                )
            }
            other => return Err(format!("{other:?} is not supported; use EdDSA, ES256 or RS256")),
        };
        let required: Vec<(&str, &str)> = members.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let kid = kid.map_or_else(|| thumbprint(&required), str::to_string);
        let mut jwk = serde_json::Map::new();
        for (k, v) in members {
            jwk.insert(k.to_string(), v.into());
        }
        jwk.insert("kid".into(), kid.clone().into());
        jwk.insert("alg".into(), format!("{algorithm:?}").into());
        jwk.insert("use".into(), "sig".into());
        Ok(SigningKey {
            algorithm,
            kid,
            encoding,
            jwk: serde_json::Value::Object(jwk),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037 A.1/A.3: the Ed25519 example key and its thumbprint.
    #[test]
    fn rfc8037_ed25519_key_and_thumbprint() {
        // PKCS#8 wrapping of the RFC 8037 A.1 private key d = nWGxne.../ 9d61b19d...
        let der = [
            &[0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20][..],
            &[
                0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
                0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
                0x1c, 0xae, 0x7f, 0x60,
            ][..],
        ]
        .concat();
        let text = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(&der)
        );
        let key = SigningKey::from_pem(&text, Algorithm::EdDSA, None).unwrap();
        assert_eq!(key.jwk["x"], "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(key.kid, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert!(SigningKey::from_pem(&text, Algorithm::ES256, None).is_err());
        assert!(SigningKey::from_pem("nonsense", Algorithm::EdDSA, None).is_err());
        let named = SigningKey::from_pem(&text, Algorithm::EdDSA, Some("k1")).unwrap();
        assert_eq!(named.jwk["kid"], "k1");
    }
}
