//! PeerAuthentication, AuthorizationPolicy and RequestAuthentication validation.

use super::*;

pub(super) fn peer_authentication(v: &mut V, s: &PeerAuthentication) {
    match_labels(v, "spec.selector", s.selector.as_ref());
    let has_labels = s
        .selector
        .as_ref()
        .is_some_and(|sel| !sel.match_labels.is_empty());
    if !s.port_level_mtls.is_empty() && !has_labels {
        v.err("spec.portLevelMtls", "portLevelMtls requires a selector with labels (it cannot apply mesh- or namespace-wide)");
    }
    for n in s.port_level_mtls.keys() {
        port(v, &join_key("spec.portLevelMtls", &n.to_string()), *n);
    }
}

pub(super) const CUSTOM_UNSUPPORTED_SOURCES: [&str; 4] = [
    "principals",
    "namespaces",
    "serviceAccounts",
    "requestPrincipals",
];

pub(super) fn authorization_policy(v: &mut V, s: &AuthorizationPolicy) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    match (s.action, &s.provider) {
        (AuthorizationAction::Custom, None) => {
            v.err(
                "spec.provider",
                "a CUSTOM policy needs provider.name (the ext-authz provider)",
            );
        }
        (AuthorizationAction::Custom, Some(p))
            if p.name.as_deref().unwrap_or_default().is_empty() =>
        {
            v.err("spec.provider.name", "provider.name must not be empty");
        }
        (AuthorizationAction::Custom, Some(_)) => {}
        (action, Some(_)) => v.err(
            "spec.provider",
            format!(
                "provider may only be set with action CUSTOM (action is {})",
                action.as_str()
            ),
        ),
        _ => {}
    }
    if s.rules.is_empty() {
        match s.action {
            AuthorizationAction::Deny
            | AuthorizationAction::Custom
            | AuthorizationAction::Audit => v.err(
                "spec.rules",
                format!(
                    "a {} policy without rules matches nothing and is meaningless",
                    s.action.as_str()
                ),
            ),
            AuthorizationAction::Allow => {}
        }
    }
    for (i, rule) in s.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let fp = format!("{rp}.from[{j}].source");
            let Some(src) = &from.source else {
                v.err(fp, "source must not be empty");
                continue;
            };
            authz_source(v, &fp, src, s.action);
        }
        for (j, to) in rule.to.iter().enumerate() {
            let tp = format!("{rp}.to[{j}].operation");
            let Some(op) = &to.operation else {
                v.err(tp, "operation must not be empty");
                continue;
            };
            authz_operation(v, &tp, op);
        }
        for (j, c) in rule.when.iter().enumerate() {
            authz_condition(v, &format!("{rp}.when[{j}]"), c, s.action);
        }
    }
}

pub(super) fn nonempty_values(v: &mut V, p: &str, field: &str, vals: &[String]) {
    for (k, val) in vals.iter().enumerate() {
        if val.is_empty() {
            v.err(format!("{p}.{field}[{k}]"), "must not be empty");
        }
    }
}

pub(super) fn authz_source(v: &mut V, p: &str, s: &Source, action: AuthorizationAction) {
    let fields: [(&str, &[String]); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    if fields.iter().all(|(_, vals)| vals.is_empty()) {
        v.err(p, "source must not be empty");
    }
    for (field, vals) in fields {
        nonempty_values(v, p, field, vals);
        if field.to_ascii_lowercase().contains("ipblocks") {
            cidrs(v, &format!("{p}.{field}"), vals);
        }
        if action == AuthorizationAction::Custom && !vals.is_empty() {
            let base = field.strip_prefix("not").map(|b| {
                let mut c = b.chars();
                c.next()
                    .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
                    .unwrap_or_default()
            });
            let base = base.as_deref().unwrap_or(field);
            if CUSTOM_UNSUPPORTED_SOURCES.contains(&base) {
                v.err(
                    format!("{p}.{field}"),
                    format!("{field} is not supported with action CUSTOM"),
                );
            }
        }
    }
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_other = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_other {
        v.err(
            p,
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
}

pub(super) fn authz_operation(v: &mut V, p: &str, op: &Operation) {
    let fields: [(&str, &[String]); 8] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("ports", &op.ports),
        ("notPorts", &op.not_ports),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if fields.iter().all(|(_, vals)| vals.is_empty()) {
        v.err(p, "operation must not be empty");
    }
    for (field, vals) in fields {
        nonempty_values(v, p, field, vals);
    }
    for (field, vals) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
        for (k, val) in vals.iter().enumerate() {
            match val.parse::<u32>() {
                Ok(n) => port(v, &format!("{p}.{field}[{k}]"), n),
                Err(_) => v.err(
                    format!("{p}.{field}[{k}]"),
                    format!("{val:?} is not a port number"),
                ),
            }
        }
    }
    for (field, vals) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
        for (k, val) in vals.iter().enumerate() {
            if let Some(e) = authz_path_error(val) {
                v.err(format!("{p}.{field}[{k}]"), e);
            }
        }
    }
}

/// Paths: exact, `prefix*`, `*suffix`, `*`, or Istio's `{*}`/`{**}` templates.
pub(super) fn authz_path_error(path: &str) -> Option<String> {
    if path.contains('{') || path.contains('}') {
        for seg in path.split('/') {
            if (seg.contains('{') || seg.contains('}')) && !matches!(seg, "{*}" | "{**}") {
                return Some(format!(
                    "path template {path:?}: only whole segments {{*}} and {{**}} are supported"
                ));
            }
        }
        return None;
    }
    let stars = path.matches('*').count();
    if stars > 1 || (stars == 1 && !(path.starts_with('*') || path.ends_with('*'))) {
        return Some(format!(
            "path {path:?}: `*` may only be at the start or the end"
        ));
    }
    None
}

pub(super) const WHEN_KEYS: [&str; 10] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
];

pub(super) fn authz_condition(v: &mut V, p: &str, c: &Condition, action: AuthorizationAction) {
    let key = c.key.as_str();
    if key.is_empty() {
        v.err(format!("{p}.key"), "key must not be empty");
        return;
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        v.err(
            p,
            format!("at least one of values or notValues must be set for key {key:?}"),
        );
    }
    let known = WHEN_KEYS.contains(&key)
        || key == "connection.sni"
        || key.starts_with("experimental.envoy.filters.")
        || bracketed(key, "request.headers").is_some()
        || bracketed(key, "request.auth.claims").is_some();
    if !known {
        v.err(format!("{p}.key"), format!("unknown condition key {key:?}"));
        return;
    }
    if let Some(inner) =
        bracketed(key, "request.headers").or_else(|| bracketed(key, "request.auth.claims"))
    {
        if inner.is_empty() {
            v.err(
                format!("{p}.key"),
                format!("{key:?} needs a name inside the brackets"),
            );
        }
    }
    let all = c.values.iter().chain(c.not_values.iter());
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => {
            for (k, val) in all.enumerate() {
                if let Some(e) = cidr_error(val) {
                    v.err(format!("{p}.values[{k}]"), e);
                }
            }
        }
        "destination.port" => {
            for (k, val) in all.enumerate() {
                if val.parse::<u16>().map_or(true, |n| n == 0) {
                    v.err(
                        format!("{p}.values[{k}]"),
                        format!("{val:?} is not a port number"),
                    );
                }
            }
        }
        _ => {}
    }
    if action == AuthorizationAction::Custom
        && (key.starts_with("source.namespace")
            || key.starts_with("source.principal")
            || key.starts_with("source.serviceAccount")
            || key.starts_with("request.auth."))
    {
        v.err(
            format!("{p}.key"),
            format!("{key} is not supported with action CUSTOM"),
        );
    }
}

/// `prefix[inner]` → inner.
pub(super) fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
}

pub(super) fn request_authentication(v: &mut V, s: &RequestAuthentication) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    for (i, r) in s.jwt_rules.iter().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        let uri_fields = [("jwksUri", &r.jwks_uri), ("jwks_uri", &r.jwks_uri_snake)];
        let set =
            uri_fields.iter().filter(|(_, u)| u.is_some()).count() + usize::from(r.jwks.is_some());
        if set > 1 {
            v.err(&p, "only one of jwks or jwksUri can be set");
        }
        if r.issuer.as_deref().unwrap_or_default().is_empty()
            && r.jwks_uri().unwrap_or_default().is_empty()
        {
            v.err(format!("{p}.issuer"), "issuer or jwksUri must be set");
        }
        for (field, uri) in uri_fields {
            if let Some(u) = uri {
                if !(u.starts_with("https://") || u.starts_with("http://"))
                    || u.len() <= "https://".len()
                {
                    v.err(
                        format!("{p}.{field}"),
                        format!("{u:?} must be an http:// or https:// URL"),
                    );
                }
            }
        }
        if let Some(j) = &r.jwks {
            match serde_json::from_str::<serde_json::Value>(j) {
                Ok(val) if val.get("keys").is_some_and(serde_json::Value::is_array) => {}
                Ok(_) => v.err(
                    format!("{p}.jwks"),
                    "jwks must be a JSON Web Key Set (an object with a `keys` array)",
                ),
                Err(e) => v.err(format!("{p}.jwks"), format!("jwks is not valid JSON: {e}")),
            }
        }
        nonempty_values(v, &p, "audiences", &r.audiences);
        nonempty_values(v, &p, "fromParams", &r.from_params);
        nonempty_values(v, &p, "fromCookies", &r.from_cookies);
        for (j, h) in r.from_headers.iter().enumerate() {
            if !is_header_name(&h.name) {
                v.err(
                    format!("{p}.fromHeaders[{j}].name"),
                    format!("invalid header name {:?}", h.name),
                );
            }
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            let cp = format!("{p}.outputClaimToHeaders[{j}]");
            if !is_header_name(&c.header) {
                v.err(
                    format!("{cp}.header"),
                    format!("invalid header name {:?}", c.header),
                );
            }
            if c.claim.is_empty() {
                v.err(format!("{cp}.claim"), "claim must not be empty");
            }
        }
        if let Some(h) = &r.output_payload_to_header {
            if !is_header_name(h) {
                v.err(
                    format!("{p}.outputPayloadToHeader"),
                    format!("invalid header name {h:?}"),
                );
            }
        }
        duration(v, &format!("{p}.timeout"), r.timeout.as_ref());
    }
}
