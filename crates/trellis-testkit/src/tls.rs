//! Certificates for tests: a throwaway CA that issues server and client certificates,
//! written where a gateway's `credentialName` or a curl command line expects them.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// A PEM certificate (chain) and its private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(common_name: &str) -> io::Result<TestCa> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> io::Result<Issued> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(rc)?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> io::Result<Issued> {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (for mutual TLS).
    pub fn client(&self, name: &str) -> io::Result<Issued> {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Writes `dir/ca.crt` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let p = dir.join("ca.crt");
        std::fs::write(&p, &self.cert_pem)?;
        Ok(p)
    }

    /// Writes a Kubernetes-TLS-secret-shaped credential for a gateway:
    /// `dir/name/tls.crt`, `tls.key` and `ca.crt`.
    pub fn write_credential(&self, dir: &Path, name: &str, hosts: &[&str]) -> io::Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        let issued = self.server(hosts)?;
        std::fs::write(d.join("tls.crt"), &issued.cert_pem)?;
        std::fs::write(d.join("tls.key"), &issued.key_pem)?;
        std::fs::write(d.join("ca.crt"), &self.cert_pem)?;
        Ok(d)
    }
}
