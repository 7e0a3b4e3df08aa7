//! VirtualService validation.

use super::*;

pub(super) fn virtual_service(v: &mut V, s: &VirtualService) {
    let mesh_bound = s.gateways.is_empty() || s.gateways.iter().any(|g| g == "mesh");
    if s.hosts.is_empty() && !s.gateways.is_empty() {
        v.err(
            "spec.gateways",
            "a delegate VirtualService (one without hosts) must not name gateways",
        );
    }
    let mut seen = HashSet::new();
    for (i, h) in s.hosts.iter().enumerate() {
        let p = format!("spec.hosts[{i}]");
        if h == "*" && mesh_bound {
            v.err(
                &p,
                "wildcard host `*` is not allowed for VirtualServices bound to the mesh gateway",
            );
        } else {
            host(v, &p, h, true);
        }
        if !seen.insert(h.to_ascii_lowercase()) {
            v.err(&p, format!("duplicate host {h:?}"));
        }
    }
    for (i, g) in s.gateways.iter().enumerate() {
        gateway_ref(v, &format!("spec.gateways[{i}]"), g);
    }
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
        v.err(
            "spec",
            "at least one of http, tcp or tls routes must be given",
        );
    }
    export_to(v, "spec.exportTo", &s.export_to);
    for (i, r) in s.http.iter().enumerate() {
        http_route(v, &format!("spec.http[{i}]"), r);
    }
    for (i, r) in s.tls.iter().enumerate() {
        let p = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            v.err(format!("{p}.match"), "a TLS route needs at least one match");
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            if m.sni_hosts.is_empty() {
                v.err(
                    format!("{mp}.sniHosts"),
                    "a TLS match needs at least one SNI host",
                );
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                host(v, &format!("{mp}.sniHosts[{k}]"), h, true);
            }
            cidrs(
                v,
                &format!("{mp}.destinationSubnets"),
                &m.destination_subnets,
            );
            if let Some(n) = m.port {
                port(v, &format!("{mp}.port"), n);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                gateway_ref(v, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_routes(v, &p, &r.route);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            cidrs(
                v,
                &format!("{mp}.destinationSubnets"),
                &m.destination_subnets,
            );
            if let Some(src) = &m.source_subnet {
                if let Some(e) = cidr_error(src) {
                    v.err(format!("{mp}.sourceSubnet"), e);
                }
            }
            if let Some(n) = m.port {
                port(v, &format!("{mp}.port"), n);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                gateway_ref(v, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_routes(v, &p, &r.route);
    }
}

pub(super) fn gateway_ref(v: &mut V, path: &str, g: &str) {
    if g == "mesh" {
        return;
    }
    match g.split_once('/') {
        Some((ns, name)) => {
            if !is_dns1123_label(ns) {
                v.err(
                    path,
                    format!("invalid namespace {ns:?} in gateway reference {g:?}"),
                );
            }
            if !is_dns1123_subdomain(name) {
                v.err(path, format!("invalid gateway name {name:?} in {g:?}"));
            }
        }
        None => {
            if !is_dns1123_subdomain(g) {
                v.err(
                    path,
                    format!(
                        "invalid gateway reference {g:?} (use `name`, `namespace/name` or `mesh`)"
                    ),
                );
            } else if g.contains('.') {
                v.warn(path, format!("gateway reference {g:?} uses the legacy name.namespace form; prefer namespace/name"));
            }
        }
    }
}

pub(super) fn destination(v: &mut V, path: &str, d: &Destination) {
    if d.host == "*" {
        v.err(format!("{path}.host"), "destination host must not be `*`");
    } else {
        host(v, &format!("{path}.host"), &d.host, false);
    }
    if let Some(subset) = &d.subset {
        if !is_dns1123_label(subset) {
            v.err(
                format!("{path}.subset"),
                format!("subset name {subset:?} is not a valid DNS label"),
            );
        }
    }
    if let Some(n) = d.port.and_then(|p| p.number) {
        port(v, &format!("{path}.port.number"), n);
    }
}

/// Route weights: each 0..100, and when there is more than one destination they must sum
/// to 100.
pub(super) fn weights(v: &mut V, path: &str, ws: impl Iterator<Item = Option<i32>> + Clone) {
    let n = ws.clone().count();
    let mut sum: i64 = 0;
    for (j, w) in ws.enumerate() {
        let w = w.unwrap_or(0);
        if !(0..=100).contains(&w) {
            v.err(format!("{path}.route[{j}].weight"), "must be 0..100");
        }
        sum += i64::from(w);
    }
    if n > 1 && sum != 100 {
        v.err(
            format!("{path}.route"),
            format!("weights must sum to 100 when a route has more than one destination (they sum to {sum})"),
        );
    }
}

pub(super) fn l4_routes(v: &mut V, path: &str, routes: &[RouteDestination]) {
    if routes.is_empty() {
        v.err(
            format!("{path}.route"),
            "at least one route destination is required",
        );
    }
    for (j, r) in routes.iter().enumerate() {
        destination(v, &format!("{path}.route[{j}].destination"), &r.destination);
    }
    weights(v, path, routes.iter().map(|r| r.weight));
}

pub(super) fn header_ops(v: &mut V, path: &str, h: Option<&Headers>) {
    let Some(h) = h else { return };
    for (which, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let p = format!("{path}.{which}");
        for name in ops
            .set
            .keys()
            .chain(ops.add.keys())
            .chain(ops.remove.iter())
        {
            if !is_header_name(name) {
                v.err(&p, format!("invalid header name {name:?}"));
            }
        }
    }
}

pub(super) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&c))
}

pub(super) fn http_route(v: &mut V, p: &str, r: &HttpRoute) {
    let has_route = !r.route.is_empty();
    let pairs = [
        (has_route && r.redirect.is_some(), "route and redirect"),
        (
            has_route && r.direct_response.is_some(),
            "route and directResponse",
        ),
        (
            r.redirect.is_some() && r.direct_response.is_some(),
            "redirect and directResponse",
        ),
        (
            r.delegate.is_some()
                && (has_route || r.redirect.is_some() || r.direct_response.is_some()),
            "delegate and route/redirect/directResponse",
        ),
        (
            r.rewrite.is_some() && r.redirect.is_some(),
            "rewrite and redirect",
        ),
        (
            r.fault.is_some() && r.redirect.is_some(),
            "fault and redirect",
        ),
        (
            r.mirror.is_some() && !r.mirrors.is_empty(),
            "mirror and mirrors",
        ),
    ];
    for (bad, what) in pairs {
        if bad {
            v.err(p, format!("an HTTP route cannot have both {what}"));
        }
    }
    if !has_route && r.redirect.is_none() && r.direct_response.is_none() && r.delegate.is_none() {
        v.err(
            p,
            "an HTTP route needs one of route, redirect, directResponse or delegate",
        );
    }
    for (j, m) in r.matches.iter().enumerate() {
        http_match(v, &format!("{p}.match[{j}]"), m);
    }
    for (j, d) in r.route.iter().enumerate() {
        destination(v, &format!("{p}.route[{j}].destination"), &d.destination);
        header_ops(v, &format!("{p}.route[{j}].headers"), d.headers.as_ref());
    }
    weights(v, p, r.route.iter().map(|d| d.weight));
    header_ops(v, &format!("{p}.headers"), r.headers.as_ref());
    duration(v, &format!("{p}.timeout"), r.timeout.as_ref());
    if let Some(rd) = &r.redirect {
        let rp = format!("{p}.redirect");
        if rd.uri.is_none()
            && rd.authority.is_none()
            && rd.scheme.is_none()
            && rd.port.is_none()
            && rd.derive_port.is_none()
            && rd.prefix_rewrite.is_none()
        {
            v.err(&rp, "a redirect must set at least one of uri, prefixRewrite, authority, scheme, port or derivePort");
        }
        if rd.port.is_some() && rd.derive_port.is_some() {
            v.err(&rp, "only one of port or derivePort may be set");
        }
        if rd.uri.is_some() && rd.prefix_rewrite.is_some() {
            v.err(&rp, "only one of uri or prefixRewrite may be set");
        }
        if let Some(n) = rd.port {
            port(v, &format!("{rp}.port"), n);
        }
        if let Some(code) = rd.redirect_code {
            if !(300..=399).contains(&code) {
                v.err(
                    format!("{rp}.redirectCode"),
                    format!("{code} is not a redirect code (3xx)"),
                );
            }
        }
    }
    if let Some(dr) = &r.direct_response {
        let dp = format!("{p}.directResponse");
        if !(200..=599).contains(&dr.status) {
            v.err(
                format!("{dp}.status"),
                format!("status {} must be in 200..599", dr.status),
            );
        }
        if let Some(body) = &dr.body {
            if body.string.is_some() && body.bytes.is_some() {
                v.err(
                    format!("{dp}.body"),
                    "only one of string or bytes may be set",
                );
            }
            if let Some(b) = &body.bytes {
                if !is_base64(b) {
                    v.err(format!("{dp}.body.bytes"), "must be base64-encoded");
                }
            }
        }
    }
    if let Some(d) = &r.delegate {
        let dp = format!("{p}.delegate");
        match &d.name {
            Some(n) if is_dns1123_subdomain(n) => {}
            Some(n) => v.err(
                format!("{dp}.name"),
                format!("invalid VirtualService name {n:?}"),
            ),
            None => v.err(format!("{dp}.name"), "delegate needs a name"),
        }
        if let Some(ns) = &d.namespace {
            if !is_dns1123_label(ns) {
                v.err(
                    format!("{dp}.namespace"),
                    format!("invalid namespace {ns:?}"),
                );
            }
        }
    }
    if let Some(rw) = &r.rewrite {
        let rp = format!("{p}.rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            v.err(&rp, "only one of uri or uriRegexRewrite may be set");
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            match &rr.pattern {
                Some(re) => regex(v, &format!("{rp}.uriRegexRewrite.match"), re),
                None => v.err(
                    format!("{rp}.uriRegexRewrite.match"),
                    "match regex is required",
                ),
            }
            if rr.rewrite.is_none() {
                v.err(
                    format!("{rp}.uriRegexRewrite.rewrite"),
                    "rewrite is required",
                );
            }
        }
    }
    if let Some(rt) = &r.retries {
        let rp = format!("{p}.retries");
        if let Some(a) = rt.attempts {
            if a < 0 {
                v.err(format!("{rp}.attempts"), "attempts cannot be negative");
            }
            if a == 0 && (rt.per_try_timeout.is_some() || rt.retry_on.is_some()) {
                v.warn(
                    &rp,
                    "retry settings are ignored when attempts is 0 (retries disabled)",
                );
            }
        }
        duration(
            v,
            &format!("{rp}.perTryTimeout"),
            rt.per_try_timeout.as_ref(),
        );
        duration(v, &format!("{rp}.backoff"), rt.backoff.as_ref());
        if let Some(on) = &rt.retry_on {
            for cond in on.split(',').map(str::trim) {
                if !is_retry_on(cond) {
                    v.err(
                        format!("{rp}.retryOn"),
                        format!("{cond:?} is not a valid retryOn condition"),
                    );
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        let fp = format!("{p}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(&fp, "fault injection needs an abort, a delay or both");
        }
        if let Some(d) = &f.delay {
            let dp = format!("{fp}.delay");
            if d.fixed_delay.is_some() && d.exponential_delay.is_some() {
                v.err(&dp, "only one of fixedDelay or exponentialDelay may be set");
            }
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                v.err(&dp, "a delay needs fixedDelay");
            }
            duration(v, &format!("{dp}.fixedDelay"), d.fixed_delay.as_ref());
            duration(
                v,
                &format!("{dp}.exponentialDelay"),
                d.exponential_delay.as_ref(),
            );
            percent(v, &format!("{dp}.percentage"), d.percentage.as_ref());
            if let Some(pc) = d.percent {
                if !(0..=100).contains(&pc) {
                    v.err(format!("{dp}.percent"), "must be 0..100");
                }
            }
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            let kinds = usize::from(a.http_status.is_some())
                + usize::from(a.grpc_status.is_some())
                + usize::from(a.http2_error.is_some());
            if kinds > 1 {
                v.err(
                    &ap,
                    "only one of httpStatus, grpcStatus or http2Error may be set",
                );
            }
            if kinds == 0 {
                v.err(&ap, "an abort needs httpStatus or grpcStatus");
            }
            if let Some(st) = a.http_status {
                if !(200..=599).contains(&st) {
                    v.err(
                        format!("{ap}.httpStatus"),
                        format!("HTTP status {st} must be in 200..599"),
                    );
                }
            }
            if let Some(g) = &a.grpc_status {
                if !is_grpc_status(g) {
                    v.err(
                        format!("{ap}.grpcStatus"),
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    );
                }
            }
            percent(v, &format!("{ap}.percentage"), a.percentage.as_ref());
        }
    }
    if let Some(m) = &r.mirror {
        destination(v, &format!("{p}.mirror"), m);
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        destination(v, &format!("{p}.mirrors[{j}].destination"), &m.destination);
        percent(
            v,
            &format!("{p}.mirrors[{j}].percentage"),
            m.percentage.as_ref(),
        );
    }
    percent(
        v,
        &format!("{p}.mirrorPercentage"),
        r.mirror_percentage.as_ref(),
    );
    for (field, val) in [
        ("mirrorPercent", r.mirror_percent),
        ("mirror_percent", r.mirror_percent_snake),
    ] {
        if let Some(pc) = val {
            if pc > 100 {
                v.err(format!("{p}.{field}"), "must be 0..100");
            } else {
                v.warn(
                    format!("{p}.{field}"),
                    format!("{field} is deprecated; use mirrorPercentage"),
                );
            }
        }
    }
    if let Some(c) = &r.cors_policy {
        let cp = format!("{p}.corsPolicy");
        for (j, o) in c.allow_origins.iter().enumerate() {
            string_match(v, &format!("{cp}.allowOrigins[{j}]"), o, false);
        }
        duration(v, &format!("{cp}.maxAge"), c.max_age.as_ref());
        for (j, m) in c.allow_methods.iter().enumerate() {
            if !is_header_name(m) {
                v.err(
                    format!("{cp}.allowMethods[{j}]"),
                    format!("invalid method {m:?}"),
                );
            }
        }
    }
}

pub(super) fn http_match(v: &mut V, p: &str, m: &HttpMatchRequest) {
    for (field, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match(v, &format!("{p}.{field}"), sm, field == "uri");
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("queryParams", &m.query_params),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (k, sm) in map {
            let kp = join_key(&format!("{p}.{field}"), k);
            if field != "queryParams"
                && !is_header_name(k)
                && !k.starts_with("@request.auth.claims")
            {
                v.err(&kp, format!("invalid header name {k:?}"));
            }
            string_match(v, &kp, sm, false);
        }
    }
    if let Some(n) = m.port {
        port(v, &format!("{p}.port"), n);
    }
    if let Some(ns) = &m.source_namespace {
        if !is_dns1123_label(ns) {
            v.err(
                format!("{p}.sourceNamespace"),
                format!("invalid namespace {ns:?}"),
            );
        }
    }
    selector_labels(v, &format!("{p}.sourceLabels"), &m.source_labels);
    for (k, g) in m.gateways.iter().enumerate() {
        gateway_ref(v, &format!("{p}.gateways[{k}]"), g);
    }
}

pub(super) fn is_retry_on(cond: &str) -> bool {
    const ENVOY: [&str; 12] = [
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "retriable-status-code",
    ];
    const GRPC: [&str; 5] = [
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ];
    ENVOY.contains(&cond)
        || GRPC.contains(&cond)
        || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
}

pub(super) const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub(super) fn is_grpc_status(s: &str) -> bool {
    GRPC_STATUSES.contains(&s) || s.parse::<u8>().is_ok_and(|n| n <= 16)
}

pub(super) fn is_base64(s: &str) -> bool {
    let t = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - t.len() <= 2
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}
