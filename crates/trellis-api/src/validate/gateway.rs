//! Gateway validation (servers, hosts, server TLS).

use super::*;

pub(super) fn gateway(v: &mut V, s: &Gateway, name: &str) {
    if name.contains('.') {
        v.err("metadata.name", format!("gateway name {name:?} must not contain dots (VirtualServices could not tell it from name.namespace)"));
    }
    if s.servers.is_empty() {
        v.err("spec.servers", "a gateway must have at least one server");
    }
    selector_labels(v, "spec.selector", &s.selector);
    let mut port_names = HashSet::new();
    for (i, srv) in s.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        port(v, &format!("{p}.port.number"), srv.port.number);
        if srv.port.name.is_empty() {
            v.err(format!("{p}.port.name"), "port name must be set");
        } else if !port_names.insert(srv.port.name.as_str()) {
            v.err(
                format!("{p}.port.name"),
                format!("port names must be unique: duplicate {:?}", srv.port.name),
            );
        }
        if srv.port.target_port.is_some() {
            v.warn(
                format!("{p}.port.targetPort"),
                "targetPort has no effect on gateways",
            );
        }
        if srv.hosts.is_empty() {
            v.err(format!("{p}.hosts"), "a server needs at least one host");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            gateway_host(v, &format!("{p}.hosts[{j}]"), h);
        }
        let proto = srv.port.protocol;
        match &srv.tls {
            None if proto.is_tls() => {
                v.err(
                    format!("{p}.tls"),
                    format!("a {proto} server needs TLS settings"),
                );
            }
            None => {}
            Some(tls) => server_tls(v, &format!("{p}.tls"), tls, proto),
        }
    }
}

/// A gateway host: `[namespace/]dnsName`, where the namespace may be `*` or `.` and the
/// DNS name must be a FQDN or a wildcard.
pub(super) fn gateway_host(v: &mut V, p: &str, h: &str) {
    let (ns, name) = match h.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, h),
    };
    if let Some(ns) = ns {
        if !(ns == "*" || ns == "." || is_dns1123_label(ns)) {
            v.err(p, format!("invalid namespace {ns:?} in gateway host {h:?}"));
        }
    }
    if name.is_empty() {
        v.err(p, "host must not be empty");
        return;
    }
    if name != "*" && !name.contains('.') && name.parse::<IpAddr>().is_err() {
        v.err(p, format!("short name {name:?} is not allowed in a gateway host; use a fully qualified name or a wildcard"));
        return;
    }
    host(v, p, name, true);
}

pub(super) fn server_tls(
    v: &mut V,
    p: &str,
    tls: &ServerTlsSettings,
    proto: crate::common::Protocol,
) {
    let https_redirect_only = tls.https_redirect == Some(true)
        && tls.mode.is_none()
        && tls.credential_name.is_none()
        && tls.server_certificate.is_none();
    if !proto.is_tls() && !https_redirect_only {
        v.err(
            p,
            format!("a {proto} server must not have TLS settings (only httpsRedirect)"),
        );
        return;
    }
    let sources = usize::from(tls.credential_name.is_some())
        + usize::from(!tls.credential_names.is_empty())
        + usize::from(tls.server_certificate.is_some() || tls.private_key.is_some())
        + usize::from(!tls.tls_certificates.is_empty());
    if sources > 1 {
        v.err(p, "only one of credentialName, credentialNames, serverCertificate/privateKey or tlsCertificates may be set");
    }
    let mode = tls.mode.unwrap_or(ServerTlsMode::Passthrough);
    match mode {
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            if sources == 0 {
                v.err(p, format!("{} TLS needs a certificate: set credentialName (or serverCertificate and privateKey)", mode_name(mode)));
            }
            if tls.server_certificate.is_some() != tls.private_key.is_some() {
                v.err(p, "serverCertificate and privateKey must be set together");
            }
            if mode != ServerTlsMode::Simple
                && tls.credential_name.is_none()
                && tls.credential_names.is_empty()
                && tls.ca_certificates.is_none()
                && tls.ca_cert_credential_name.is_none()
            {
                v.err(
                    p,
                    format!(
                        "{} TLS needs caCertificates to verify clients",
                        mode_name(mode)
                    ),
                );
            }
        }
        ServerTlsMode::IstioMutual => {
            if sources > 0 || tls.ca_certificates.is_some() {
                v.err(
                    p,
                    "ISTIO_MUTUAL TLS must not set certificates, keys or credentialName",
                );
            }
        }
        ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough => {
            if sources > 0 {
                v.warn(
                    p,
                    format!(
                        "{} TLS does not use certificates; they are ignored",
                        mode_name(mode)
                    ),
                );
            }
        }
    }
    if tls.ca_crl.is_some() && tls.credential_name.is_some() {
        v.err(
            format!("{p}.caCrl"),
            "caCrl is not supported with credentialName",
        );
    }
    if let (Some(min), Some(max)) = (tls.min_protocol_version, tls.max_protocol_version) {
        if tls_rank(min) > tls_rank(max) && max != TlsProtocolVersion::TlsAuto {
            v.err(p, "minProtocolVersion is above maxProtocolVersion");
        }
    }
}

pub(super) fn tls_rank(v: TlsProtocolVersion) -> u8 {
    match v {
        TlsProtocolVersion::TlsAuto => 0,
        TlsProtocolVersion::Tlsv1_0 => 1,
        TlsProtocolVersion::Tlsv1_1 => 2,
        TlsProtocolVersion::Tlsv1_2 => 3,
        TlsProtocolVersion::Tlsv1_3 => 4,
    }
}

pub(super) fn mode_name(m: ServerTlsMode) -> &'static str {
    match m {
        ServerTlsMode::Passthrough => "PASSTHROUGH",
        ServerTlsMode::Simple => "SIMPLE",
        ServerTlsMode::Mutual => "MUTUAL",
        ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
        ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
        ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
    }
}
