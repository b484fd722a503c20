//! Signature checks through `ring`: the crypto backend `jsonwebtoken` uses in this process.
//!
//! `jsonwebtoken`'s RustCrypto backend verifies an RS256 signature in ~235 us and an ES256
//! one in ~285 us on our bench machine; `ring` (already built for rustls) does the same in a
//! fraction of that, and a token verify is the whole cost of a request that misses the
//! verified-token cache. RSA (PKCS#1 v1.5 and PSS, 2048 to 8192 bits), ECDSA P-256/P-384 and
//! Ed25519 go through `ring`; HMAC, RSA keys outside `ring`'s size range or given as DER,
//! and compressed EC points stay on RustCrypto, so every key that verified before still
//! verifies.
//!
//! The backend is chosen once per process ([`install`], called when a `jwt` plugin is
//! built), before any token is checked; `jsonwebtoken` keeps it for the process's life.

use jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER as RUST_CRYPTO;
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature::{self as sig, RsaParameters, UnparsedPublicKey, VerificationAlgorithm};

/// Verification through `ring`; signing (tests and tools only) and JWK helpers as RustCrypto
/// does them.
pub static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: rsa_components,
        extract_ec_public_key_coordinates: ec_coordinates,
        compute_digest: digest,
    },
};

/// Makes [`PROVIDER`] this process's `jsonwebtoken` backend, unless another was chosen
/// already (then that one stays: RustCrypto gives the same answers, only slower).
pub fn install() {
    if let Err(chosen) = PROVIDER.install_default() {
        if !std::ptr::eq(chosen, &PROVIDER) {
            log::warn!(
                "jwt: jsonwebtoken's crypto backend was chosen before Sallyport's; \
                 token signatures will be checked without ring (slower)"
            );
        }
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    (RUST_CRYPTO.signer_factory)(alg, key)
}

fn rsa_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    (RUST_CRYPTO.jwk_utils.extract_rsa_public_key_components)(der)
}

fn ec_coordinates(
    der: &[u8],
    alg: Algorithm,
) -> Result<(jsonwebtoken::jwk::EllipticCurve, Vec<u8>, Vec<u8>)> {
    (RUST_CRYPTO.jwk_utils.extract_ec_public_key_coordinates)(der, alg)
}

fn digest(data: &[u8], hash: jsonwebtoken::jwk::ThumbprintHash) -> Vec<u8> {
    (RUST_CRYPTO.jwk_utils.compute_digest)(data, hash)
}

/// RSA moduli `ring` accepts with the parameters below: 2048 to 8192 bits.
const RSA_BYTES: std::ops::RangeInclusive<usize> = 256..=1024;

fn rsa_parameters(alg: Algorithm) -> Option<&'static RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn public_key_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        // JWS carries ECDSA signatures as fixed-width r || s (RFC 7518 section 3.4).
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        _ => return None,
    })
}

/// Big-endian integers from a JWK may carry leading zero octets; `ring` wants them minimal.
fn minimal(be: &[u8]) -> &[u8] {
    let zeros = be.iter().take_while(|b| **b == 0).count();
    &be[zeros..]
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let check = match (key.kind(), rsa_parameters(*alg), public_key_algorithm(*alg)) {
        (DecodingKeyKind::RsaModulusExponent { n, e }, Some(params), _)
            if RSA_BYTES.contains(&minimal(n).len()) =>
        {
            Check::Rsa {
                params,
                n: minimal(n).to_vec(),
                e: minimal(e).to_vec(),
            }
        }
        // ring takes EC points uncompressed (JWKs always are) and Ed25519 keys raw.
        (DecodingKeyKind::SecretOrDer(public), None, Some(algorithm))
            if *alg == Algorithm::EdDSA || public.first() == Some(&0x04) =>
        {
            Check::PublicKey {
                algorithm,
                public: public.clone(),
            }
        }
        // HMAC, RSA keys outside ring's range or given as DER, compressed EC points.
        _ => return (RUST_CRYPTO.verifier_factory)(alg, key),
    };
    Ok(Box::new(RingVerifier { alg: *alg, check }))
}

enum Check {
    Rsa {
        params: &'static RsaParameters,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    PublicKey {
        algorithm: &'static dyn VerificationAlgorithm,
        public: Vec<u8>,
    },
}

struct RingVerifier {
    alg: Algorithm,
    check: Check,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> signature::Result<()> {
        let checked = match &self.check {
            Check::Rsa { params, n, e } => {
                sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            Check::PublicKey { algorithm, public } => {
                UnparsedPublicKey::new(*algorithm, public).verify(msg, signature)
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_key(n: &[u8]) -> DecodingKey {
        DecodingKey::from_rsa_raw_components(n, &[1, 0, 1])
    }

    #[test]
    fn rsa_keys_in_ring_range_use_ring_and_others_fall_back() {
        let n2048 = [0xc5u8; 256];
        let padded: Vec<u8> = std::iter::once(0).chain(n2048).collect();
        for n in [&n2048[..], &padded[..]] {
            let Ok(v) = verifier(&Algorithm::RS256, &rsa_key(n)) else {
                panic!("a 2048-bit key gets a verifier");
            };
            assert_eq!(v.algorithm(), Algorithm::RS256);
        }
        // A 1024-bit key is outside ring's range: RustCrypto checks it, as before.
        assert!(verifier(&Algorithm::RS256, &rsa_key(&[0xc5u8; 128])).is_ok());
    }

    /// The demo keys: signed by RustCrypto from the private PEM, checked by ring against the
    /// public JWK, as the gateway does; one flipped bit in the message or signature refuses.
    #[test]
    fn ring_accepts_real_signatures_and_refuses_tampered_ones() {
        let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf");
        let read = |f: &str| {
            std::fs::read(format!("{conf}/{f}"))
                .unwrap_or_else(|e| panic!("reading {conf}/{f}: {e}"))
        };
        let jwks = String::from_utf8(read("demo-jwks.json")).unwrap_or_default();
        let Ok(set) = crate::jwt::keys::KeySet::from_jwks(&jwks) else {
            panic!("demo JWKS parses");
        };
        let cases = [
            (
                Algorithm::RS256,
                "demo-rs256",
                EncodingKey::from_rsa_pem(&read("demo-keys/demo-rs256.pem")),
            ),
            (
                Algorithm::PS256,
                "demo-rs256",
                EncodingKey::from_rsa_pem(&read("demo-keys/demo-rs256.pem")),
            ),
            (
                Algorithm::ES256,
                "demo-es256",
                EncodingKey::from_ec_pem(&read("demo-keys/demo-es256.pem")),
            ),
        ];
        let msg = b"eyJhbGciOi.eyJzdWIiOiJ1In0".to_vec();
        for (alg, kid, private) in cases {
            let Ok(private) = private else {
                panic!("{kid} private key loads");
            };
            let signed = signer(&alg, &private)
                .ok()
                .and_then(|s| signature::Signer::try_sign(&*s, &msg).ok());
            let (Some(signed), Some(key)) = (
                signed,
                set.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            ) else {
                panic!("{alg:?}: sign and find the public key");
            };
            let Ok(check) = verifier(&alg, &key.key) else {
                panic!("{alg:?}: a verifier");
            };
            assert!(check.verify(&msg, &signed).is_ok(), "{alg:?} verifies");
            let mut bad_sig = signed.clone();
            bad_sig[10] ^= 1;
            assert!(
                check.verify(&msg, &bad_sig).is_err(),
                "{alg:?} tampered signature"
            );
            let mut bad_msg = msg.clone();
            bad_msg[3] ^= 1;
            assert!(
                check.verify(&bad_msg, &signed).is_err(),
                "{alg:?} tampered message"
            );
        }
    }

    #[test]
    fn a_key_never_verifies_another_family() {
        let hmac = DecodingKey::from_secret(b"secret");
        assert!(verifier(&Algorithm::RS256, &hmac).is_err());
        assert!(verifier(&Algorithm::ES256, &rsa_key(&[0xc5u8; 256])).is_err());
    }
}
