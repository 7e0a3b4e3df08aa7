//! TLS for the mesh's own connections, on rustls (ring): the credentials a process holds
//! (a certificate chain and its key, replaced whole on rotation, so a new handshake takes
//! the new one while connections already made go on), and the client and server
//! configurations built on them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::{CaError, cert_err};

/// A certificate chain with its private key, and what an operator wants to know of it
/// (never the key).
pub struct Certified {
    pub key: Arc<CertifiedKey>,
    /// The leaf's URI SAN (a SPIFFE id), if it has one.
    pub spiffe: Option<String>,
    /// The leaf's DNS and IP SANs.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("spiffe", &self.spiffe)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    match u64::try_from(t.timestamp()) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

impl Certified {
    /// From a PEM chain (leaf first; a PEM string may hold several certificates) and the
    /// leaf's key (PKCS#8 DER). The key must be one rustls can sign with (ECDSA, Ed25519,
    /// RSA).
    pub fn from_pem(chain: &[String], key_pkcs8: Vec<u8>) -> Result<Certified, CaError> {
        let mut certs = Vec::new();
        for pem in chain {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                certs.push(c.map_err(|e| cert_err(format!("chain: {e}")))?);
            }
        }
        let Some(leaf) = certs.first() else {
            return Err(cert_err("an empty certificate chain"));
        };
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| cert_err(format!("the leaf certificate: {e}")))?;
        let mut spiffe = None;
        let mut names = Vec::new();
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::URI(u) => {
                        spiffe.get_or_insert_with(|| u.to_string());
                    }
                    x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let not_before = system_time(x509.validity().not_before);
        let not_after = system_time(x509.validity().not_after);
        let serial = x509.raw_serial_as_string().replace(':', "");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| cert_err(format!("the private key: {e}")))?;
        let key = CertifiedKey::new(certs, signer);
        key.keys_match()
            .map_err(|e| cert_err(format!("the key does not match the certificate: {e}")))?;
        Ok(Certified {
            key: Arc::new(key),
            spiffe,
            names,
            not_before,
            not_after,
            serial,
        })
    }

    /// When to renew: at half of the lifetime, as Istio's agents do.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    /// Whether it is still valid at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// The credentials a process presents: none at first, then each certificate it is given.
/// Servers and clients built on it take the current one at each handshake.
#[derive(Default)]
pub struct Credentials(ArcSwapOption<Certified>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Credentials").field(&self.0.load()).finish()
    }
}

impl Credentials {
    pub fn new(c: Certified) -> Credentials {
        Credentials(ArcSwapOption::from_pointee(c))
    }

    /// Whether a certificate is there (cheaper than [`Credentials::current`]).
    pub fn is_set(&self) -> bool {
        self.0.load().is_some()
    }

    pub fn current(&self) -> Option<Arc<Certified>> {
        self.0.load_full()
    }

    /// Replaces the certificate for every later handshake.
    pub fn set(&self, c: Certified) {
        self.0.store(Some(Arc::new(c)));
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| Arc::clone(&c.key))
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| Arc::clone(&c.key))
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// The roots in a PEM bundle (one certificate or several: a bundle during a root rotation
/// holds the old root and the new one). A bundle with no certificate is an error.
pub fn roots(pem: &str) -> Result<RootCertStore, CaError> {
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| cert_err(format!("trust bundle: {e}")))?;
        store
            .add(c)
            .map_err(|e| cert_err(format!("trust bundle: {e}")))?;
    }
    if store.is_empty() {
        return Err(cert_err("trust bundle: no certificate in it"));
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 server presenting `creds`, offering the protocols in `alpn` (most preferred
/// first). No client certificate is asked for.
pub fn server_config(creds: Arc<Credentials>, alpn: &[&[u8]]) -> Result<ServerConfig, CaError> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .with_no_client_auth()
        .with_cert_resolver(creds);
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// A TLS 1.3 client that verifies servers against the roots in `roots_pem` (and the name
/// it connects to), presenting no certificate.
pub fn client_config(roots_pem: &str, alpn: &[&[u8]]) -> Result<ClientConfig, CaError> {
    client_config_with(roots(roots_pem)?, alpn)
}

/// As [`client_config`], with roots already parsed.
pub fn client_config_with(roots: RootCertStore, alpn: &[&[u8]]) -> Result<ClientConfig, CaError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// ALPN between two proxies: which protocol follows the handshake. The names are the
/// mesh's own, so that an inbound proxy tells mesh mTLS from an app's own TLS by the
/// ClientHello alone (as Istio does with `istio-*`).
pub const ALPN_MESH_H2: &[u8] = b"trellis-h2";
pub const ALPN_MESH_HTTP1: &[u8] = b"trellis-http/1.1";
pub const ALPN_MESH_TCP: &[u8] = b"trellis-tcp";
pub const MESH_ALPNS: [&[u8]; 3] = [ALPN_MESH_H2, ALPN_MESH_HTTP1, ALPN_MESH_TCP];

/// The SPIFFE id (URI SAN starting `spiffe://`) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some(u.to_string())
        }
        _ => None,
    })
}

/// A server-certificate check for the mesh's own connections and for TLS origination: the
/// chain must lead to `roots` (except with `Check::Nothing`), and then `check` decides on the
/// certificate's names. Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    roots: Arc<RootCertStore>,
    check: Check,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

#[derive(Debug)]
enum Check {
    /// A peer proxy: its SPIFFE id is one of these (any, when empty). Host names play no
    /// part.
    Spiffe(Vec<String>),
    /// DestinationRule `subjectAltNames`: one of these names, instead of the SNI.
    AltNames(Vec<rustls::pki_types::ServerName<'static>>),
    /// DestinationRule `insecureSkipVerify`: no check of the certificate itself.
    Nothing,
}

fn refused(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerIdentityError(why)),
    )))
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = rustls::client::danger::ServerCertVerified::assertion();
        if matches!(self.check, Check::Nothing) {
            return Ok(ok);
        }
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match &self.check {
            Check::Nothing => Ok(ok),
            Check::Spiffe(expected) => {
                let id = spiffe_id(end_entity).ok_or_else(|| refused("no SPIFFE id".into()))?;
                if !expected.is_empty() && !expected.contains(&id) {
                    return Err(refused(format!(
                        "the peer is {id}, expected {}",
                        expected.join(" or ")
                    )));
                }
                Ok(ok)
            }
            Check::AltNames(names) => {
                let mut last = rustls::Error::General("no subjectAltNames".into());
                for n in names {
                    match rustls::client::verify_server_name(&cert, n) {
                        Ok(()) => return Ok(ok),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a peer's certificate was refused beyond what webpki says.
#[derive(Debug)]
struct PeerIdentityError(String);

impl std::fmt::Display for PeerIdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerIdentityError {}

/// The client side of mutual TLS to a peer proxy (TLS 1.3): presents `creds`, verifies the
/// peer against `roots` and the `expected` SPIFFE ids, and offers the one ALPN protocol
/// that follows.
pub fn mesh_client_config(
    creds: Arc<Credentials>,
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
    alpn: &[u8],
) -> Result<ClientConfig, CaError> {
    let provider = provider();
    let verifier = Verifier {
        roots,
        check: Check::Spiffe(expected),
        provider: Arc::clone(&provider),
    };
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(creds);
    c.alpn_protocols = vec![alpn.to_vec()];
    Ok(c)
}

/// The server side of mutual TLS from peer proxies (TLS 1.3): presents `creds`, requires a
/// client certificate chaining to `roots`, and accepts the mesh's ALPN protocols.
pub fn mesh_server_config(
    creds: Arc<Credentials>,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, CaError> {
    let provider = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(cert_err)?;
    let mut c = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(creds);
    c.alpn_protocols = MESH_ALPNS.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// A client for TLS origination to a service outside the mesh (DestinationRule SIMPLE or
/// MUTUAL): TLS 1.2 or 1.3, the server checked against `roots_pem` by the SNI name, or by
/// one of `alt_names` when given (or not at all with `insecure`), presenting `client`
/// (chain PEM, PKCS#8 key PEM) for MUTUAL.
pub fn origination_config(
    roots_pem: &str,
    client: Option<(&str, &str)>,
    alt_names: &[String],
    insecure: bool,
    alpn: &[&[u8]],
) -> Result<ClientConfig, CaError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(cert_err)?;
    let builder = if alt_names.is_empty() && !insecure {
        builder.with_root_certificates(roots(roots_pem)?)
    } else {
        let check = if insecure {
            Check::Nothing
        } else {
            Check::AltNames(
                alt_names
                    .iter()
                    .map(|n| {
                        rustls::pki_types::ServerName::try_from(n.clone())
                            .map_err(|_| cert_err(format!("subjectAltNames: {n:?} is not a name")))
                    })
                    .collect::<Result<_, _>>()?,
            )
        };
        let roots = if insecure {
            RootCertStore::empty()
        } else {
            roots(roots_pem)?
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                roots: Arc::new(roots),
                check,
                provider: Arc::clone(&provider),
            }))
    };
    let mut c = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| cert_err(format!("client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| cert_err(format!("private key: {e}")))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| cert_err(format!("client certificate: {e}")))?
        }
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}
