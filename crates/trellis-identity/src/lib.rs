//! The mesh's identities: a certificate authority that signs SPIFFE certificates
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) for workloads' proxies, and the bootstrap
//! tokens that prove which identity a proxy may ask for.
//!
//! - [`Ca`]: a root generated on first start (ECDSA P-256, key file mode 0600) in the data
//!   directory, or a user's own ("plug-in CA", Istio's file names: `ca-cert.pem`,
//!   `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`).
//! - [`Tokens`]: short-lived JWTs (ES256, audience `trellis-ca`) signed by the control
//!   plane and handed to a proxy by whoever starts it.
//! - [`Ca::create_certificate`]: Istio's `CreateCertificate`: a CSR and a token in, a
//!   certificate chain out, never for an identity the token does not prove.

#![forbid(unsafe_code)]

pub mod tls;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};

/// Roots trusted besides the CA's own, in the CA's directory (see [`Ca::trust_roots`]).
pub const EXTRA_ROOTS_FILE: &str = "extra-roots.pem";

/// The audience of bootstrap tokens.
pub const TOKEN_AUDIENCE: &str = "trellis-ca";
/// Default and largest certificate lifetimes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bootstrap tokens live at most this long (they only have to last until the proxy has
/// connected and its certificate).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn spiffe(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("token refused: {0}")]
    Token(#[from] TokenError),
    #[error("the CSR asks for {asked}, the token proves {proven}")]
    IdentityMismatch { asked: String, proven: String },
    #[error("the CSR: {0}")]
    Csr(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("signature does not verify (signed by another key?)")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("audience is not {TOKEN_AUDIENCE}")]
    Audience,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn cert_err(e: impl std::fmt::Display) -> CaError {
    CaError::Cert(e.to_string())
}

/// Writes a secret: created with mode 0600 (never readable by others, even for a moment)
/// under a temporary name, then linked into place, so another process never reads it
/// half-written; if `path` appeared meanwhile, that one stays.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(file_err(path, e)),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_err(path, e))
}

/// The certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// When the signing certificate expires: no workload certificate outlives it.
    not_after: time::OffsetDateTime,
    /// The signing certificate, then any intermediates, then the root.
    chain: Vec<String>,
    root: String,
    /// The file the root was read from (what proxies are given to verify the control plane).
    root_file: PathBuf,
    /// `extra-roots.pem` beside it: roots trusted besides this CA's (a root rotation).
    extra_roots_file: PathBuf,
    trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// The CA in `dir`: loaded when `ca-cert.pem` and `ca-key.pem` are there, else a new
    /// self-signed root (ECDSA P-256, ten years) written there, the key with mode 0600.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        // A user's CA in Istio's plug-in layout.
        if dir.join("root-cert.pem").exists() {
            return Ca::plugin(dir, trust_domain);
        }
        // A key without its certificate: a first start that stopped half-way; start over.
        if !cert_path.exists() && key_path.exists() {
            std::fs::remove_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        }
        if !cert_path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            let key = KeyPair::generate().map_err(cert_err)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, trust_domain);
            dn.push(DnType::CommonName, "Trellis root CA");
            params.distinguished_name = dn;
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key).map_err(cert_err)?;
            write_secret(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, cert.pem()).map_err(|e| file_err(&cert_path, e))?;
        }
        let cert = read(&cert_path)?;
        Ca::from_pems(
            &read(&key_path)?,
            &cert,
            vec![cert.clone()],
            (&cert, &cert_path),
            trust_domain,
        )
    }

    /// A user's CA ("plug-in CA") from Istio's files in `dir`: `ca-cert.pem` and
    /// `ca-key.pem` (the signing certificate and key), `root-cert.pem`, and
    /// `cert-chain.pem` (from the signing certificate up to the root).
    pub fn plugin(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        let cert = read(&dir.join("ca-cert.pem"))?;
        let root_file = dir.join("root-cert.pem");
        let root = read(&root_file)?;
        let chain_path = dir.join("cert-chain.pem");
        let chain = if chain_path.exists() {
            vec![read(&chain_path)?]
        } else {
            vec![cert.clone(), root.clone()]
        };
        Ca::from_pems(
            &read(&dir.join("ca-key.pem"))?,
            &cert,
            chain,
            (&root, &root_file),
            trust_domain,
        )
    }

    fn from_pems(
        key: &str,
        cert: &str,
        chain: Vec<String>,
        (root, root_file): (&str, &Path),
        trust_domain: &str,
    ) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key).map_err(cert_err)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).map_err(cert_err)?;
        let x509 = pem.parse_x509().map_err(cert_err)?;
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_pem(cert, key).map_err(cert_err)?;
        Ok(Ca {
            issuer,
            not_after,
            chain,
            root: root.to_string(),
            root_file: root_file.to_path_buf(),
            extra_roots_file: root_file.with_file_name(EXTRA_ROOTS_FILE),
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The root certificate (the trust bundle proxies verify peers with).
    pub fn root_pem(&self) -> &str {
        &self.root
    }

    /// The mesh's trust bundle: this CA's root, then the roots of `extra-roots.pem` in the
    /// CA's directory if there is one (read again at each call). A root rotation adds the
    /// new root there before it signs anything, and leaves the old one there until every
    /// certificate it signed has expired. A file that holds no certificate is an error.
    pub fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        let mut out = vec![self.root.clone()];
        match std::fs::read_to_string(&self.extra_roots_file) {
            Ok(extra) => {
                tls::roots(&extra).map_err(|e| file_err(&self.extra_roots_file, e))?;
                if extra.trim() != self.root.trim() {
                    out.push(extra);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&self.extra_roots_file, e)),
        }
        Ok(out)
    }

    /// The file holding [`Ca::root_pem`].
    pub fn root_file(&self) -> &Path {
        &self.root_file
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Istio's `CreateCertificate`: checks `token`, then signs the CSR's key for the
    /// identity the token proves, for `ttl` (capped at [`MAX_TTL`]). The certificate has
    /// exactly one SAN, the SPIFFE URI. A CSR that names another identity is refused.
    /// Returns the chain: the workload certificate, then the CA's chain.
    pub fn create_certificate(
        &self,
        tokens: &Tokens,
        token: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let (namespace, service_account) = tokens.verify(token, SystemTime::now())?;
        let id = Identity {
            trust_domain: self.trust_domain.clone(),
            namespace,
            service_account,
        };
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let proven = id.spiffe();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            };
            if asked != proven {
                return Err(CaError::IdentityMismatch { asked, proven });
            }
        }
        let uri = SanType::URI(
            proven
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| cert_err(e))?,
        );
        csr.params = self.leaf_params(
            vec![uri],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            ttl,
        )?;
        let cert = csr.signed_by(&self.issuer).map_err(cert_err)?;
        let mut out = vec![cert.pem()];
        out.extend(self.chain.iter().cloned());
        Ok(out)
    }

    /// The parameters of a certificate this CA signs: the given SANs and uses, a random
    /// serial, valid from now for `ttl` (capped at [`MAX_TTL`] and at the CA's own expiry).
    fn leaf_params(
        &self,
        sans: Vec<SanType>,
        uses: Vec<ExtendedKeyUsagePurpose>,
        ttl: Duration,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.subject_alt_names = sans;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = uses;
        params.use_authority_key_identifier_extension = true;
        // A random serial (RFC 5280: unique per issuer, also for renewals of the same key).
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut serial).map_err(cert_err)?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from(serial.to_vec()));
        let ttl = ttl.min(MAX_TTL);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after =
            (now + time::Duration::try_from(ttl).map_err(cert_err)?).min(self.not_after);
        Ok(params)
    }

    /// A server certificate for the control plane itself, for these DNS names and
    /// addresses, with a key made here (it never leaves this process). Proxies verify it
    /// against the CA's root, by name.
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<tls::Certified, CaError> {
        let mut sans = Vec::new();
        for d in dns_names {
            sans.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| cert_err(e))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let params = self.leaf_params(sans, vec![ExtendedKeyUsagePurpose::ServerAuth], ttl)?;
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        tls::Certified::from_pem(&chain, key.serialize_der())
    }
}

/// Writes a workload's files to `dir` (created if needed): `cert-chain.pem` (the
/// certificate, then the CA's chain), `key.pem` (PKCS#8, mode 0600, replaced atomically)
/// and `root-cert.pem` (the trust bundle). For proxies and hosts that take their identity
/// from files (`trellis-proxy --workload-cert DIR`).
pub fn write_workload_files(
    dir: &Path,
    chain: &[String],
    key_pkcs8: &[u8],
    roots: &[String],
) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let key = KeyPair::try_from(key_pkcs8).map_err(cert_err)?;
    let key_path = dir.join("key.pem");
    let tmp = dir.join(format!(".key.pem.tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, &key_path).map_err(|e| file_err(&key_path, e))?;
    let chain_path = dir.join("cert-chain.pem");
    std::fs::write(&chain_path, chain.concat()).map_err(|e| file_err(&chain_path, e))?;
    let root_path = dir.join("root-cert.pem");
    std::fs::write(&root_path, roots.concat()).map_err(|e| file_err(&root_path, e))?;
    Ok(())
}

/// The subject of the first certificate of a PEM string, and when it expires (None if it
/// does not parse).
pub fn describe(pem: &str) -> Option<(String, SystemTime)> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let x509 = parsed.parse_x509().ok()?;
    Some((x509.subject().to_string(), not_after(pem)?))
}

/// When the first certificate of a PEM string expires (None if it does not parse).
pub fn not_after(pem: &str) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let x509 = pem.parse_x509().ok()?;
    let secs = u64::try_from(x509.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A new private key (ECDSA P-256, PKCS#8 DER, to be kept in memory) and a certificate
/// signing request for `id` made with it (PEM, its one SAN the SPIFFE id): what a proxy
/// sends to `CreateCertificate`.
pub fn workload_key_and_csr(id: &Identity) -> Result<(Vec<u8>, String), CaError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.spiffe()
            .try_into()
            .map_err(|e: rcgen::Error| cert_err(e))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(cert_err)?
        .pem()
        .map_err(cert_err)?;
    Ok((key.serialize_der(), csr))
}

/// base64url without padding (JWT's encoding).
fn b64url(bytes: &[u8]) -> String {
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

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = s.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
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

/// Bootstrap tokens: ES256 JWTs the control plane signs and checks.
pub struct Tokens {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    /// The signing key in `dir/token-key.pk8` (created with mode 0600 when absent).
    pub fn load_or_create(dir: &Path) -> Result<Tokens, CaError> {
        let path = dir.join("token-key.pk8");
        let rng = SystemRandom::new();
        if !path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|e| file_err(&path, e))?;
            // Another process may have created it meanwhile: then that key is the one.
            match write_secret(&path, pk8.as_ref()) {
                Ok(()) => {}
                Err(_) if path.exists() => {}
                Err(e) => return Err(e),
            }
        }
        let bytes = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &bytes, &rng)
            .map_err(|e| file_err(&path, e))?;
        Ok(Tokens { key, rng })
    }

    /// A token for `namespace`/`service_account`, valid for `ttl` (at most
    /// [`MAX_TOKEN_TTL`]).
    pub fn issue(&self, namespace: &str, service_account: &str, ttl: Duration) -> String {
        self.issue_at(
            namespace,
            service_account,
            SystemTime::now() + ttl.min(MAX_TOKEN_TTL),
        )
    }

    fn issue_at(&self, namespace: &str, service_account: &str, exp: SystemTime) -> String {
        let exp = exp.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = b64url(br#"{"alg":"ES256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": "trellis",
            "aud": TOKEN_AUDIENCE,
            "ns": namespace,
            "sa": service_account,
            "exp": exp,
        });
        let payload = b64url(claims.to_string().as_bytes());
        let signing_input = format!("{header}.{payload}");
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map(|s| b64url(s.as_ref()))
            .unwrap_or_default();
        format!("{signing_input}.{sig}")
    }

    /// The namespace and service account a token proves at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<(String, String), TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let sig = b64url_decode(s).ok_or(TokenError::Malformed)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref())
            .verify(format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| TokenError::Signature)?;
        let claims: serde_json::Value = b64url_decode(p)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if claims["aud"] != TOKEN_AUDIENCE {
            return Err(TokenError::Audience);
        }
        let exp = claims["exp"].as_u64().ok_or(TokenError::Malformed)?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now >= exp {
            return Err(TokenError::Expired);
        }
        match (claims["ns"].as_str(), claims["sa"].as_str()) {
            (Some(ns), Some(sa)) if !ns.is_empty() && !sa.is_empty() => {
                Ok((ns.to_string(), sa.to_string()))
            }
            _ => Err(TokenError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for n in 0..40 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64url_decode(&b64url(&bytes)), Some(bytes));
        }
        assert_eq!(b64url(b"hi?"), "aGk_");
    }

    #[test]
    fn tokens_prove_an_identity_until_they_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Tokens::load_or_create(dir.path()).expect("tokens");
        let tok = t.issue("shop", "reviews", Duration::from_secs(60));
        assert_eq!(
            t.verify(&tok, SystemTime::now()),
            Ok(("shop".into(), "reviews".into()))
        );
        let old = t.issue_at(
            "shop",
            "reviews",
            SystemTime::now() - Duration::from_secs(1),
        );
        assert_eq!(t.verify(&old, SystemTime::now()), Err(TokenError::Expired));
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = Tokens::load_or_create(other_dir.path()).expect("tokens");
        let forged = other.issue("shop", "reviews", Duration::from_secs(60));
        assert_eq!(
            t.verify(&forged, SystemTime::now()),
            Err(TokenError::Signature)
        );
        // Tampering with the claims breaks the signature.
        let mut parts: Vec<&str> = tok.split('.').collect();
        let evil =
            b64url(br#"{"aud":"trellis-ca","ns":"kube-system","sa":"admin","exp":99999999999}"#);
        parts[1] = &evil;
        assert_eq!(
            t.verify(&parts.join("."), SystemTime::now()),
            Err(TokenError::Signature)
        );
        assert_eq!(
            t.verify("nope", SystemTime::now()),
            Err(TokenError::Malformed)
        );
        // The key survives a restart.
        let again = Tokens::load_or_create(dir.path()).expect("tokens");
        assert!(again.verify(&tok, SystemTime::now()).is_ok());
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::sync::Arc;

    /// Runs a handshake in memory: Ok(server's view of the negotiated ALPN) or the error.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let name = ServerName::try_from(name.to_string()).expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("read");
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("read");
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s.alpn_protocol().map(<[u8]>::to_vec));
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn workload_csrs_are_signed_for_the_tokens_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path(), "example.org").expect("ca");
        let tokens = Tokens::load_or_create(dir.path()).expect("tokens");
        let id = Identity {
            trust_domain: "example.org".into(),
            namespace: "shop".into(),
            service_account: "reviews".into(),
        };
        let (key, csr) = workload_key_and_csr(&id).expect("csr");
        let token = tokens.issue("shop", "reviews", Duration::from_secs(60));
        let chain = ca
            .create_certificate(&tokens, &token, &csr, Duration::from_secs(3600))
            .expect("signed");
        let c = tls::Certified::from_pem(&chain, key.clone()).expect("certified");
        assert_eq!(
            c.spiffe.as_deref(),
            Some("spiffe://example.org/ns/shop/sa/reviews")
        );
        assert!(c.valid_at(SystemTime::now()));
        let life = c.not_after.duration_since(c.not_before).expect("order");
        assert_eq!(life, Duration::from_secs(3600));
        assert_eq!(c.renew_at(), c.not_before + Duration::from_secs(1800));
        // Another key than the one the CSR was made with does not match the certificate.
        let (other_key, _) = workload_key_and_csr(&id).expect("csr");
        let e = tls::Certified::from_pem(&chain, other_key).expect_err("mismatch");
        assert!(e.to_string().contains("does not match"), "{e}");
        // Renewals of the same identity get distinct serials.
        let again = ca
            .create_certificate(&tokens, &token, &csr, Duration::from_secs(3600))
            .expect("signed");
        let c2 = tls::Certified::from_pem(&again, key).expect("certified");
        assert_ne!(c.serial, c2.serial);
    }

    #[test]
    fn the_control_planes_certificate_verifies_by_name_against_the_root_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
        let serving = ca
            .serving_certificate(
                &["trellis-control".to_string()],
                &["127.0.0.1".parse().expect("ip")],
                Duration::from_secs(3600),
            )
            .expect("serving");
        assert_eq!(serving.names, ["trellis-control", "127.0.0.1"]);
        let creds = Arc::new(tls::Credentials::new(serving));
        let server = || tls::server_config(Arc::clone(&creds), &[b"h2"]).expect("server");
        let client = |root: &str| tls::client_config(root, &[b"h2"]).expect("client");
        assert_eq!(
            handshake(client(ca.root_pem()), server(), "trellis-control").expect("handshake"),
            Some(b"h2".to_vec())
        );
        assert!(handshake(client(ca.root_pem()), server(), "127.0.0.1").is_ok());
        let e = handshake(client(ca.root_pem()), server(), "evil.example").expect_err("name");
        assert!(e.to_string().contains("certificate"), "{e}");
        // A root of another mesh does not vouch for it.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = Ca::load_or_create(other_dir.path(), "cluster.local").expect("ca");
        let e = handshake(client(other.root_pem()), server(), "trellis-control")
            .expect_err("other root");
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        // A bundle of both roots (a rotation) trusts it.
        let bundle = format!("{}{}", other.root_pem(), ca.root_pem());
        assert!(handshake(client(&bundle), server(), "trellis-control").is_ok());
        assert!(tls::client_config("not a pem", &[]).is_err());
    }

    fn workload(ca: &Ca, tokens: &Tokens, ns: &str, sa: &str) -> Arc<tls::Credentials> {
        let id = Identity {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        };
        let (key, csr) = workload_key_and_csr(&id).expect("csr");
        let token = tokens.issue(ns, sa, Duration::from_secs(60));
        let chain = ca
            .create_certificate(tokens, &token, &csr, Duration::from_secs(3600))
            .expect("signed");
        Arc::new(tls::Credentials::new(
            tls::Certified::from_pem(&chain, key).expect("certified"),
        ))
    }

    #[test]
    fn mesh_mtls_checks_both_sides_spiffe_identities() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
        let tokens = Tokens::load_or_create(dir.path()).expect("tokens");
        let roots = Arc::new(tls::roots(ca.root_pem()).expect("roots"));
        let web = workload(&ca, &tokens, "web", "web");
        let reviews = workload(&ca, &tokens, "shop", "reviews");
        let server =
            || tls::mesh_server_config(Arc::clone(&reviews), Arc::clone(&roots)).expect("server");
        let client = |creds: &Arc<tls::Credentials>, expected: &[&str]| {
            tls::mesh_client_config(
                Arc::clone(creds),
                Arc::clone(&roots),
                expected.iter().map(|s| s.to_string()).collect(),
                tls::ALPN_MESH_H2,
            )
            .expect("client")
        };
        // The expected identity (or any, when none is expected): agreed on trellis-h2.
        let alpn = handshake(
            client(&web, &["spiffe://cluster.local/ns/shop/sa/reviews"]),
            server(),
            "10.0.0.1",
        )
        .expect("handshake");
        assert_eq!(alpn.as_deref(), Some(tls::ALPN_MESH_H2));
        assert!(handshake(client(&web, &[]), server(), "10.0.0.1").is_ok());
        // Another identity than expected: refused, and the error says who it was.
        let e = handshake(
            client(&web, &["spiffe://cluster.local/ns/shop/sa/ratings"]),
            server(),
            "10.0.0.1",
        )
        .expect_err("wrong identity");
        assert!(
            e.to_string()
                .contains("the peer is spiffe://cluster.local/ns/shop/sa/reviews"),
            "{e}"
        );
        // A client without a certificate, or with one from another mesh: refused.
        let anonymous = Arc::new(tls::Credentials::default());
        let e = handshake(client(&anonymous, &[]), server(), "10.0.0.1").expect_err("no cert");
        assert!(e.to_string().contains("certificate"), "{e}");
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = Ca::load_or_create(other_dir.path(), "cluster.local").expect("ca");
        let other_tokens = Tokens::load_or_create(other_dir.path()).expect("tokens");
        let stranger = workload(&other, &other_tokens, "web", "web");
        assert!(handshake(client(&stranger, &[]), server(), "10.0.0.1").is_err());
        // The server's view of the client.
        let name = ServerName::try_from("10.0.0.1").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client(&web, &[])), name).expect("c");
        let mut s = rustls::ServerConnection::new(Arc::new(server())).expect("s");
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("read");
            }
            s.process_new_packets().expect("server");
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("read");
            }
            c.process_new_packets().expect("client");
        }
        let peer = s
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::spiffe_id);
        assert_eq!(
            peer.as_deref(),
            Some("spiffe://cluster.local/ns/web/sa/web")
        );
    }
}
