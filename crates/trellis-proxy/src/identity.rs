//! The proxy's workload certificate: a key made here (it never leaves the process), a CSR
//! for the instance's SPIFFE identity sent with the bootstrap token to the control plane's
//! CA (Istio's `CreateCertificate`), and the chain it returns, published in
//! [`Shared::credentials`] for new handshakes. Renewed at half-life; when a renewal fails
//! the current certificate stays, and the request is retried with backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_identity::Identity;
use trellis_identity::tls::Certified;
use trellis_xds::ads::{
    CREATE_CERTIFICATE_PATH, INSTANCE_NAME_KEY, IstioCertificateRequest, IstioCertificateResponse,
};

use crate::proxy::Shared;
use crate::stats::Stats;
use crate::xds::{Endpoint, Token};

/// Istio's default workload certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// What to ask the CA for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub identity: Identity,
    /// The instance's name, for the control plane's status page.
    pub instance: String,
    /// The lifetime to ask for (the CA may shorten it).
    pub ttl: Duration,
}

/// One certificate.
pub async fn request(
    ep: &Endpoint,
    token: Option<&str>,
    want: &CertRequest,
) -> Result<Certified, String> {
    let (id, ttl) = (&want.identity, want.ttl);
    let (key, csr) = trellis_identity::workload_key_and_csr(id).map_err(|e| e.to_string())?;
    let name = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(want.instance.clone())),
    };
    let metadata = prost_types::Struct {
        fields: [(INSTANCE_NAME_KEY.to_string(), name)]
            .into_iter()
            .collect(),
    };
    let resp: IstioCertificateResponse = crate::xds::unary(
        ep,
        CREATE_CERTIFICATE_PATH,
        token,
        &IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        },
    )
    .await?;
    let cert = Certified::from_pem(&resp.cert_chain, key).map_err(|e| e.to_string())?;
    let want = id.spiffe();
    if cert.spiffe.as_deref() != Some(want.as_str()) {
        return Err(format!(
            "the CA answered with a certificate for {:?}, not {want}",
            cert.spiffe
        ));
    }
    Ok(cert)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps `shared.credentials` holding a valid certificate, until the runtime stops.
pub async fn maintain(ep: Endpoint, token: Token, want: CertRequest, shared: Arc<Shared>) {
    let spiffe = want.identity.spiffe();
    let mut backoff = Duration::from_secs(1);
    loop {
        let result = match token.read() {
            Ok(t) => request(&ep.trusting_snapshot(&shared), t.as_deref(), &want).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(cert) => {
                let renew = cert.renew_at();
                tracing::info!(
                    identity = %spiffe,
                    serial = %cert.serial,
                    expires = unix(cert.not_after),
                    "workload certificate issued; renewing in {} s",
                    renew
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs()
                );
                Stats::inc(&shared.stats.certificates_issued_total);
                shared.credentials.set(cert);
                backoff = Duration::from_secs(1);
                let wait = renew
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(100));
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                Stats::inc(&shared.stats.certificate_failures_total);
                let held = shared.credentials.current();
                let now = SystemTime::now();
                let valid = held.as_ref().filter(|c| c.valid_at(now));
                match valid {
                    Some(c) => tracing::warn!(
                        identity = %spiffe,
                        "certificate renewal failed: {e}; the current one stays (expires in {:?}); retrying in about {backoff:?}",
                        c.not_after.duration_since(now).unwrap_or_default()
                    ),
                    None => tracing::error!(
                        identity = %spiffe,
                        "no valid workload certificate: {e}; retrying in about {backoff:?}"
                    ),
                }
                // Full jitter over [backoff/2, backoff], doubling up to a minute, and never
                // more than a quarter of what is left of the current certificate.
                let jitter = crate::http::random_u64() % (backoff.as_millis() as u64 / 2 + 1);
                let mut wait = backoff / 2 + Duration::from_millis(jitter);
                if let Some(c) = valid {
                    let left = c.not_after.duration_since(now).unwrap_or_default();
                    wait = wait.min(left / 4).max(Duration::from_millis(100));
                }
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// A workload certificate from files in `dir` (what `trellis cert` writes):
/// `cert-chain.pem` and `key.pem` (PKCS#8).
pub fn load_files(dir: &std::path::Path) -> Result<Certified, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let chain = read("cert-chain.pem")?;
    let key = read("key.pem")?;
    let key = match PrivateKeyDer::from_pem_slice(key.as_bytes()) {
        Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
        Ok(_) => return Err(format!("{}/key.pem: not a PKCS#8 key", dir.display())),
        Err(e) => return Err(format!("{}/key.pem: {e}", dir.display())),
    };
    Certified::from_pem(&[chain], key).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Reloads the certificate files in `dir` when they change (checked every 5 s); a pair
/// that does not load is logged and the certificate in use stays.
pub async fn watch_files(dir: std::path::PathBuf, shared: Arc<Shared>) {
    let stamp = |d: &std::path::Path| {
        ["cert-chain.pem", "key.pem"]
            .map(|f| std::fs::metadata(d.join(f)).and_then(|m| m.modified()).ok())
    };
    let mut last = stamp(&dir);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = stamp(&dir);
        if now == last {
            continue;
        }
        last = now;
        match load_files(&dir) {
            Ok(c) => {
                tracing::info!(identity = ?c.spiffe, serial = %c.serial, "workload certificate reloaded from {}", dir.display());
                Stats::inc(&shared.stats.certificates_issued_total);
                shared.credentials.set(c);
            }
            Err(e) => {
                Stats::inc(&shared.stats.certificate_failures_total);
                tracing::error!("workload certificate not reloaded, the current one stays: {e}");
            }
        }
    }
}
