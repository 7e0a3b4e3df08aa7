//! The CA as a proxy meets it: a CSR and a bootstrap token in, a certificate chain out; and
//! what it refuses.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use trellis_identity::{Ca, CaError, MAX_TTL, TokenError, Tokens};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

fn csr(san: Option<&str>) -> String {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    if let Some(s) = san {
        params.subject_alt_names = vec![SanType::URI(s.to_string().try_into().expect("ia5"))];
    }
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    p.contents
}

#[test]
fn a_token_gets_its_own_identity_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
    let key_mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the CA key is private");
    let tokens = Tokens::load_or_create(dir.path()).expect("tokens");
    let token = tokens.issue("shop", "reviews", Duration::from_secs(300));

    let chain = ca
        .create_certificate(
            &tokens,
            &token,
            &csr(Some("spiffe://cluster.local/ns/shop/sa/reviews")),
            Duration::from_secs(3600),
        )
        .expect("signed");
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.root_pem());
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("x509");
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .expect("ext")
        .expect("SAN")
        .value
        .general_names
        .iter()
        .map(|g| match g {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["URI:spiffe://cluster.local/ns/shop/sa/reviews"]);
    let v = leaf.validity();
    assert_eq!(v.not_after.timestamp() - v.not_before.timestamp(), 3600);
    // Signed by the root.
    let root_der = der(ca.root_pem());
    let (_, root) = X509Certificate::from_der(&root_der).expect("root");
    assert!(leaf.verify_signature(Some(root.public_key())).is_ok());

    // A CSR without SAN gets the token's identity.
    let chain = ca
        .create_certificate(&tokens, &token, &csr(None), Duration::from_secs(60))
        .expect("signed");
    assert!(chain[0].starts_with("-----BEGIN CERTIFICATE-----"));

    // Refused: another identity, an expired token, a token signed by another key.
    let e = ca
        .create_certificate(
            &tokens,
            &token,
            &csr(Some("spiffe://cluster.local/ns/kube-system/sa/admin")),
            Duration::from_secs(60),
        )
        .expect_err("mismatch");
    assert!(matches!(e, CaError::IdentityMismatch { .. }), "{e}");
    let expired = tokens.issue("shop", "reviews", Duration::ZERO);
    let e = ca
        .create_certificate(&tokens, &expired, &csr(None), Duration::from_secs(60))
        .expect_err("expired");
    assert!(matches!(e, CaError::Token(TokenError::Expired)), "{e}");
    let other = tempfile::tempdir().expect("tempdir");
    let forged = Tokens::load_or_create(other.path()).expect("tokens").issue(
        "shop",
        "reviews",
        Duration::from_secs(60),
    );
    let e = ca
        .create_certificate(&tokens, &forged, &csr(None), Duration::from_secs(60))
        .expect_err("forged");
    assert!(matches!(e, CaError::Token(TokenError::Signature)), "{e}");

    // The TTL is capped.
    let chain = ca
        .create_certificate(
            &tokens,
            &token,
            &csr(None),
            Duration::from_secs(365 * 86400),
        )
        .expect("signed");
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("x509");
    let v = leaf.validity();
    assert_eq!(
        (v.not_after.timestamp() - v.not_before.timestamp()) as u64,
        MAX_TTL.as_secs()
    );

    // The root survives a restart.
    let again = Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
    assert_eq!(again.root_pem(), ca.root_pem());
}

#[test]
fn a_plugin_ca_signs_with_its_intermediate() {
    // A user's root and an intermediate it signed, in Istio's plug-in file names.
    let root_dir = tempfile::tempdir().expect("tempdir");
    let root = Ca::load_or_create(root_dir.path(), "example.org").expect("root");
    let inter_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    // An intermediate that expires in an hour: no certificate it signs may outlive it.
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::minutes(1);
    p.not_after = now + ::time::Duration::hours(1);
    let root_key = KeyPair::from_pem(
        &std::fs::read_to_string(root_dir.path().join("ca-key.pem")).expect("root key"),
    )
    .expect("key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(root.root_pem(), root_key).expect("issuer");
    let inter = p.signed_by(&inter_key, &issuer).expect("intermediate");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca-cert.pem"), inter.pem()).expect("write");
    std::fs::write(dir.path().join("ca-key.pem"), inter_key.serialize_pem()).expect("write");
    std::fs::write(dir.path().join("root-cert.pem"), root.root_pem()).expect("write");
    std::fs::write(
        dir.path().join("cert-chain.pem"),
        format!("{}{}", inter.pem(), root.root_pem()),
    )
    .expect("write");
    let ca = Ca::plugin(dir.path(), "example.org").expect("plug-in CA");
    let tokens = Tokens::load_or_create(dir.path()).expect("tokens");
    let chain = ca
        .create_certificate(
            &tokens,
            &tokens.issue("web", "frontend", Duration::from_secs(60)),
            &csr(Some("spiffe://example.org/ns/web/sa/frontend")),
            Duration::from_secs(24 * 3600),
        )
        .expect("signed");
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("x509");
    let inter_der = der(&inter.pem());
    let (_, inter_x) = X509Certificate::from_der(&inter_der).expect("x509");
    assert!(
        leaf.verify_signature(Some(inter_x.public_key())).is_ok(),
        "signed by the intermediate"
    );
    assert!(
        leaf.validity().not_after.timestamp() <= inter_x.validity().not_after.timestamp(),
        "capped at the intermediate's expiry"
    );
    assert_eq!(ca.root_pem(), root.root_pem());
    assert!(
        chain[1].contains(&inter.pem()),
        "the chain carries the intermediate"
    );
}
