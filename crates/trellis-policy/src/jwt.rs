//! JSON Web Tokens for RequestAuthentication: keys from a JWKS, signature checks (RS256,
//! RS384, RS512, PS256, ES256, ES384, EdDSA, with ring), and the claims Istio checks
//! (`iss`, `aud`, `exp`, `nbf` with a small clock skew). Pure: the keys and the time are
//! given.

use ring::signature::{self, UnparsedPublicKey};

/// Leeway for `exp` and `nbf`, as Istio (Envoy) allows.
pub const CLOCK_SKEW_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt verification fails: no key for kid {0:?}")]
    UnknownKey(Option<String>),
    #[error("Jwt verification fails: algorithm {0:?} is not supported")]
    Algorithm(String),
    #[error("Jwt verification fails")]
    Signature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
}

/// base64url, padding optional.
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        }))
    };
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// base64url without padding.
pub fn b64url_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Material {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// One key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    material: Material,
}

/// A key set (`{"keys": [...]}`); keys of kinds Trellis cannot use are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS document. A document with no usable key is an error.
    pub fn parse(json: &str) -> Result<Jwks, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let keys = v["keys"].as_array().ok_or("JWKS has no \"keys\" array")?;
        let b = |k: &serde_json::Value, f: &str| -> Option<Vec<u8>> {
            k[f].as_str().and_then(b64url_decode)
        };
        let mut out = Vec::new();
        for k in keys {
            let material = match (k["kty"].as_str(), k["crv"].as_str()) {
                (Some("RSA"), _) => match (b(k, "n"), b(k, "e")) {
                    (Some(n), Some(e)) => Material::Rsa { n, e },
                    _ => continue,
                },
                (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => match (b(k, "x"), b(k, "y")) {
                    (Some(x), Some(y)) => {
                        let mut point = vec![4u8];
                        point.extend_from_slice(&x);
                        point.extend_from_slice(&y);
                        if crv == "P-256" {
                            Material::P256(point)
                        } else {
                            Material::P384(point)
                        }
                    }
                    _ => continue,
                },
                (Some("OKP"), Some("Ed25519")) => match b(k, "x") {
                    Some(x) => Material::Ed25519(x),
                    None => continue,
                },
                _ => continue,
            };
            out.push(Jwk {
                kid: k["kid"].as_str().map(str::to_string),
                material,
            });
        }
        if out.is_empty() {
            return Err("JWKS has no usable key (RSA, EC P-256/P-384 or Ed25519)".into());
        }
        Ok(Jwks { keys: out })
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload.
    pub payload: serde_json::Value,
    /// The payload as it came (base64url), for `outputPayloadToHeader`.
    pub payload_b64: String,
    /// Claims (`a.b` for nested ones) whose string value is a space-delimited list, besides
    /// `scope` and `permission` (the rule's `spaceDelimitedClaims`).
    pub space_delimited: std::sync::Arc<[String]>,
}

impl Claims {
    fn is_space_delimited(&self, path: &[&str]) -> bool {
        match path {
            ["scope"] | ["permission"] => true,
            _ => {
                let dotted = path.join(".");
                self.space_delimited.contains(&dotted)
            }
        }
    }

    /// `iss/sub`: what `requestPrincipals` match.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// A claim by path (`["groups"]`, `["nested", "key"]`), as the strings it holds: a
    /// string (each word of it for a space-delimited claim: `scope`, `permission` and
    /// those of [`Claims::space_delimited`]), each string of an array, or a number or
    /// boolean as text.
    pub fn claim(&self, path: &[&str]) -> Vec<String> {
        let mut v = &self.payload;
        for p in path {
            v = &v[*p];
        }
        match v {
            serde_json::Value::String(s) if self.is_space_delimited(path) => {
                s.split_whitespace().map(str::to_string).collect()
            }
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect(),
            serde_json::Value::Number(n) => vec![n.to_string()],
            serde_json::Value::Bool(b) => vec![b.to_string()],
            _ => Vec::new(),
        }
    }
}

/// The issuer a token claims, read without checking anything (to pick the rule).
pub fn issuer(token: &str) -> Result<String, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let v: serde_json::Value =
        serde_json::from_slice(&b64url_decode(payload).ok_or(JwtError::Malformed)?)
            .map_err(|_| JwtError::Malformed)?;
    v["iss"]
        .as_str()
        .map(str::to_string)
        .ok_or(JwtError::UnknownIssuer)
}

/// Verifies `token` with `jwks`, for `issuer` and (when not empty) one of `audiences`, at
/// `now` (seconds since the epoch).
pub fn verify(
    token: &str,
    jwks: &Jwks,
    issuer: &str,
    audiences: &[String],
    now: u64,
) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: serde_json::Value =
        serde_json::from_slice(&b64url_decode(h).ok_or(JwtError::Malformed)?)
            .map_err(|_| JwtError::Malformed)?;
    let payload: serde_json::Value =
        serde_json::from_slice(&b64url_decode(p).ok_or(JwtError::Malformed)?)
            .map_err(|_| JwtError::Malformed)?;
    let sig = b64url_decode(sig).ok_or(JwtError::Malformed)?;
    let alg = header["alg"].as_str().unwrap_or("").to_string();
    let kid = header["kid"].as_str().map(str::to_string);
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid.is_none() || k.kid == kid)
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey(kid));
    }
    let mut verified = false;
    for k in candidates {
        let ok = match (alg.as_str(), &k.material) {
            ("RS256", Material::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA256, n, e),
            ("RS384", Material::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA384, n, e),
            ("RS512", Material::Rsa { n, e }) => rsa(&signature::RSA_PKCS1_2048_8192_SHA512, n, e),
            ("PS256", Material::Rsa { n, e }) => rsa(&signature::RSA_PSS_2048_8192_SHA256, n, e),
            ("ES256", Material::P256(pt)) => Verify::Done(
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                    .verify(signed, &sig)
                    .is_ok(),
            ),
            ("ES384", Material::P384(pt)) => Verify::Done(
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                    .verify(signed, &sig)
                    .is_ok(),
            ),
            ("EdDSA", Material::Ed25519(x)) => Verify::Done(
                UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(signed, &sig)
                    .is_ok(),
            ),
            ("RS256" | "RS384" | "RS512" | "PS256" | "ES256" | "ES384" | "EdDSA", _) => {
                Verify::Done(false)
            }
            _ => return Err(JwtError::Algorithm(alg)),
        };
        let ok = match ok {
            Verify::Done(ok) => ok,
            Verify::Rsa(params, n, e) => signature::RsaPublicKeyComponents { n, e }
                .verify(params, signed, &sig)
                .is_ok(),
        };
        if ok {
            verified = true;
            break;
        }
    }
    if !verified {
        return Err(JwtError::Signature);
    }
    if payload["iss"].as_str() != Some(issuer) {
        return Err(JwtError::UnknownIssuer);
    }
    if let Some(exp) = payload["exp"].as_u64() {
        if now > exp + CLOCK_SKEW_SECS {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = payload["nbf"].as_u64() {
        if now + CLOCK_SKEW_SECS < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    let token_aud: Vec<String> = match &payload["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if !audiences.is_empty() && !token_aud.iter().any(|a| audiences.contains(a)) {
        return Err(JwtError::Audience);
    }
    Ok(Claims {
        issuer: issuer.to_string(),
        subject: payload["sub"].as_str().unwrap_or("").to_string(),
        audiences: token_aud,
        presenter: payload["azp"].as_str().map(str::to_string),
        payload,
        payload_b64: p.to_string(),
        space_delimited: std::sync::Arc::from(Vec::new()),
    })
}

enum Verify<'a> {
    Done(bool),
    Rsa(&'static signature::RsaParameters, &'a [u8], &'a [u8]),
}

fn rsa<'a>(params: &'static signature::RsaParameters, n: &'a [u8], e: &'a [u8]) -> Verify<'a> {
    Verify::Rsa(params, n, e)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

    pub(crate) enum Key {
        Es256(EcdsaKeyPair),
        Ed(Ed25519KeyPair),
        Rs256(RsaKeyPair),
    }

    impl Key {
        pub(crate) fn es256() -> Key {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
            Key::Es256(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key"))
        }

        fn ed25519() -> Key {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
            Key::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"))
        }

        /// An RSA key made by openssl (ring cannot generate RSA keys).
        fn rs256() -> Key {
            let dir = std::env::temp_dir().join(format!("trellis-jwt-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join("rsa.der");
            let ok = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .args(["-outform", "DER", "-out"])
                .arg(&path)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl runs")
                .success();
            assert!(ok, "openssl genpkey");
            let der = std::fs::read(&path).expect("key");
            let _ = std::fs::remove_dir_all(&dir);
            let key = RsaKeyPair::from_pkcs8(&der).or_else(|_| RsaKeyPair::from_der(&der));
            Key::Rs256(key.expect("rsa key"))
        }

        fn alg(&self) -> &'static str {
            match self {
                Key::Es256(_) => "ES256",
                Key::Ed(_) => "EdDSA",
                Key::Rs256(_) => "RS256",
            }
        }

        /// This key as a JWK with `kid`.
        pub(crate) fn jwk(&self, kid: &str) -> serde_json::Value {
            match self {
                Key::Es256(k) => {
                    let p = k.public_key().as_ref();
                    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": b64url_encode(&p[1..33]), "y": b64url_encode(&p[33..65])})
                }
                Key::Ed(k) => serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                    "x": b64url_encode(k.public_key().as_ref())}),
                Key::Rs256(k) => {
                    let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                    serde_json::json!({"kty": "RSA", "kid": kid,
                        "n": b64url_encode(&c.n), "e": b64url_encode(&c.e)})
                }
            }
        }

        /// A token with these claims, signed with this key.
        pub(crate) fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
            let header = serde_json::json!({"alg": self.alg(), "typ": "JWT", "kid": kid});
            let signing = format!(
                "{}.{}",
                b64url_encode(header.to_string().as_bytes()),
                b64url_encode(claims.to_string().as_bytes())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                Key::Es256(k) => k
                    .sign(&rng, signing.as_bytes())
                    .expect("sign")
                    .as_ref()
                    .to_vec(),
                Key::Ed(k) => k.sign(signing.as_bytes()).as_ref().to_vec(),
                Key::Rs256(k) => {
                    let mut sig = vec![0; k.public().modulus_len()];
                    k.sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        signing.as_bytes(),
                        &mut sig,
                    )
                    .expect("sign");
                    sig
                }
            };
            format!("{signing}.{}", b64url_encode(&sig))
        }
    }

    pub(crate) fn jwks(keys: &[serde_json::Value]) -> Jwks {
        Jwks::parse(&serde_json::json!({ "keys": keys }).to_string()).expect("jwks")
    }

    const NOW: u64 = 1_800_000_000;

    fn claims() -> serde_json::Value {
        serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "aud": ["shop", "web"],
            "exp": NOW + 600, "nbf": NOW - 10, "azp": "web-app",
            "groups": ["admins", "dev"], "nested": {"level": 3}})
    }

    #[test]
    fn each_algorithm_verifies_with_its_key_and_only_its_key() {
        for key in [Key::es256(), Key::ed25519(), Key::rs256()] {
            let set = jwks(&[key.jwk("k1")]);
            let token = key.sign("k1", &claims());
            let c = verify(&token, &set, "https://issuer.example", &[], NOW)
                .unwrap_or_else(|e| panic!("{}: {e}", key.alg()));
            assert_eq!(c.principal(), "https://issuer.example/alice");
            assert_eq!(c.audiences, ["shop", "web"]);
            assert_eq!(c.presenter.as_deref(), Some("web-app"));
            assert_eq!(c.claim(&["groups"]), ["admins", "dev"]);
            assert_eq!(c.claim(&["nested", "level"]), ["3"]);
            // Another key of the same kind, under the same kid: the signature fails.
            let other = match key {
                Key::Es256(_) => Key::es256(),
                Key::Ed(_) => Key::ed25519(),
                Key::Rs256(_) => Key::rs256(),
            };
            let e = verify(
                &other.sign("k1", &claims()),
                &set,
                "https://issuer.example",
                &[],
                NOW,
            );
            assert_eq!(e, Err(JwtError::Signature), "{}", key.alg());
            // A tampered payload fails too.
            let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
            let mut evil = claims();
            evil["sub"] = "admin".into();
            parts[1] = b64url_encode(evil.to_string().as_bytes());
            let e = verify(&parts.join("."), &set, "https://issuer.example", &[], NOW);
            assert_eq!(e, Err(JwtError::Signature), "{}", key.alg());
        }
    }

    #[test]
    fn scope_permission_and_listed_claims_are_space_delimited() {
        let key = Key::es256();
        let set = jwks(&[key.jwk("k1")]);
        let mut payload = claims();
        payload["scope"] = "read:shop write:shop".into();
        payload["permission"] = "pay refund".into();
        payload["roles"] = "editor  admin".into();
        payload["provider"] = serde_json::json!({"login": {"scope": "a b"}});
        payload["title"] = "chief editor".into();
        let mut c = verify(
            &key.sign("k1", &payload),
            &set,
            "https://issuer.example",
            &[],
            NOW,
        )
        .expect("valid");
        assert_eq!(c.claim(&["scope"]), ["read:shop", "write:shop"]);
        assert_eq!(c.claim(&["permission"]), ["pay", "refund"]);
        // Others are whole strings unless the rule lists them (nested ones dotted).
        assert_eq!(c.claim(&["roles"]), ["editor  admin"]);
        assert_eq!(c.claim(&["provider", "login", "scope"]), ["a b"]);
        c.space_delimited = std::sync::Arc::from(vec![
            "roles".to_string(),
            "provider.login.scope".to_string(),
        ]);
        assert_eq!(c.claim(&["roles"]), ["editor", "admin"]);
        assert_eq!(c.claim(&["provider", "login", "scope"]), ["a", "b"]);
        assert_eq!(c.claim(&["title"]), ["chief editor"]);
    }

    #[test]
    fn claims_are_checked_with_a_small_clock_skew() {
        let key = Key::es256();
        let set = jwks(&[key.jwk("k1")]);
        let iss = "https://issuer.example";
        let token = key.sign("k1", &claims());
        assert!(verify(&token, &set, iss, &["web".into()], NOW).is_ok());
        assert_eq!(
            verify(&token, &set, iss, &["billing".into()], NOW),
            Err(JwtError::Audience)
        );
        assert_eq!(
            verify(&token, &set, "https://other.example", &[], NOW),
            Err(JwtError::UnknownIssuer)
        );
        assert!(verify(&token, &set, iss, &[], NOW + 600 + CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            verify(&token, &set, iss, &[], NOW + 601 + CLOCK_SKEW_SECS),
            Err(JwtError::Expired)
        );
        let mut early = claims();
        early["nbf"] = (NOW + 3600).into();
        assert_eq!(
            verify(&key.sign("k1", &early), &set, iss, &[], NOW),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            verify(&key.sign("k2", &claims()), &set, iss, &[], NOW),
            Err(JwtError::UnknownKey(Some("k2".into())))
        );
        assert_eq!(verify("a.b", &set, iss, &[], NOW), Err(JwtError::Malformed));
        assert_eq!(
            verify("!.!.!", &set, iss, &[], NOW),
            Err(JwtError::Malformed)
        );
        assert_eq!(issuer(&token).as_deref(), Ok(iss));
        assert!(Jwks::parse("{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}").is_err());
        assert!(Jwks::parse("nope").is_err());
    }
}
