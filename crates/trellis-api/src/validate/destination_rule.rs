//! DestinationRule validation (traffic policies, load balancing, pools, outlier detection, client TLS).

use super::*;

pub(super) fn destination_rule(v: &mut V, s: &DestinationRule) {
    if s.host.is_empty() {
        v.err("spec.host", "host is required");
    } else {
        host(v, "spec.host", &s.host, true);
    }
    let mut names = HashSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if sub.name.is_empty() {
            v.err(format!("{p}.name"), "subset name must not be empty");
        } else if !is_dns1123_label(&sub.name) {
            v.err(
                format!("{p}.name"),
                format!("subset name {:?} is not a valid DNS label", sub.name),
            );
        }
        if !names.insert(sub.name.as_str()) {
            v.err(
                format!("{p}.name"),
                format!("duplicate subset name {:?}", sub.name),
            );
        }
        labels(v, &format!("{p}.labels"), &sub.labels);
        if let Some(tp) = &sub.traffic_policy {
            traffic_policy(v, &format!("{p}.trafficPolicy"), tp);
        }
    }
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(v, "spec.trafficPolicy", tp);
    }
    export_to(v, "spec.exportTo", &s.export_to);
    if let Some(sel) = &s.workload_selector {
        selector_labels(v, "spec.workloadSelector.matchLabels", &sel.match_labels);
        if s.export_to.len() > 1 || s.export_to.iter().any(|e| e != ".") {
            v.err("spec.exportTo", "a DestinationRule with a workloadSelector can only be exported to its own namespace (\".\")");
        }
    }
}

pub(super) fn traffic_policy(v: &mut V, p: &str, tp: &TrafficPolicy) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        v.err(p, "a traffic policy must have at least one field");
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        v.err(p, "tunnel and proxyProtocol must not be set together");
    }
    policy_parts(
        v,
        p,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        match pl.port.and_then(|x| x.number) {
            Some(n) => {
                port(v, &format!("{pp}.port.number"), n);
                if !ports.insert(n) {
                    v.err(
                        format!("{pp}.port.number"),
                        format!("port {n} has more than one port-level setting"),
                    );
                }
            }
            None => v.err(
                format!("{pp}.port"),
                "a port-level setting needs port.number",
            ),
        }
        if pl.load_balancer.is_none()
            && pl.connection_pool.is_none()
            && pl.outlier_detection.is_none()
            && pl.tls.is_none()
        {
            v.err(
                &pp,
                "a port-level traffic policy must have at least one field",
            );
        }
        policy_parts(
            v,
            &pp,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
    if let Some(t) = &tp.tunnel {
        if let Some(proto) = &t.protocol {
            if !matches!(proto.as_str(), "CONNECT" | "POST") {
                v.err(format!("{p}.tunnel.protocol"), "must be CONNECT or POST");
            }
        }
        host(v, &format!("{p}.tunnel.targetHost"), &t.target_host, false);
        port(v, &format!("{p}.tunnel.targetPort"), t.target_port);
    }
    if let Some(rb) = &tp.retry_budget {
        if let Some(pc) = rb.percent {
            if !(0.0..=100.0).contains(&pc) {
                v.err(format!("{p}.retryBudget.percent"), "must be 0..100");
            }
        }
        duration(
            v,
            &format!("{p}.retryBudget.budgetInterval"),
            rb.budget_interval.as_ref(),
        );
    }
}

pub(super) fn policy_parts(
    v: &mut V,
    p: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    od: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        load_balancer(v, &format!("{p}.loadBalancer"), lb, od.is_some());
    }
    if let Some(pool) = pool {
        connection_pool(v, &format!("{p}.connectionPool"), pool);
    }
    if let Some(od) = od {
        outlier_detection(v, &format!("{p}.outlierDetection"), od);
    }
    if let Some(tls) = tls {
        client_tls(v, &format!("{p}.tls"), tls);
    }
}

pub(super) fn load_balancer(v: &mut V, p: &str, lb: &LoadBalancerSettings, has_outlier: bool) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        v.err(p, "only one of simple or consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = format!("{p}.consistentHash");
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys > 1 {
            v.err(&cp, "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set");
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                v.err(format!("{cp}.httpCookie.name"), "cookie name is required");
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            v.err(&cp, "only one of ringHash or maglev may be set");
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            v.err(
                &cp,
                "only one of minimumRingSize or ringHash/maglev may be set",
            );
        }
        if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size) {
            if !is_prime(size) || size >= 5_000_011 {
                v.err(
                    format!("{cp}.maglev.tableSize"),
                    "must be a prime number below 5000011",
                );
            }
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let lp = format!("{p}.localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            v.err(&lp, "only one of distribute or failover may be set");
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            for (k, w) in &d.to {
                if !(1..=100).contains(w) {
                    v.err(
                        join_key(&format!("{lp}.distribute[{i}].to"), k),
                        "locality weight must be 1..100",
                    );
                }
            }
            if sum != 100 {
                v.err(
                    format!("{lp}.distribute[{i}].to"),
                    format!("locality weights must sum to 100 (they sum to {sum})"),
                );
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from.is_some() && f.from == f.to {
                v.err(
                    format!("{lp}.failover[{i}]"),
                    "failover must go to a different region",
                );
            }
        }
        if (!l.failover.is_empty() || !l.failover_priority.is_empty()) && !has_outlier {
            v.warn(
                &lp,
                "locality failover only takes effect with an outlierDetection policy",
            );
        }
    }
    duration(
        v,
        &format!("{p}.warmupDurationSecs"),
        lb.warmup_duration_secs.as_ref(),
    );
    if let Some(w) = &lb.warmup {
        duration(v, &format!("{p}.warmup.duration"), Some(&w.duration));
        if let Some(mp) = w.minimum_percent {
            if !(0.0..=100.0).contains(&mp) {
                v.err(format!("{p}.warmup.minimumPercent"), "must be 0..100");
            }
        }
        if let Some(a) = w.aggression {
            if a < 1.0 {
                v.err(format!("{p}.warmup.aggression"), "must be at least 1");
            }
        }
    }
}

pub(super) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

pub(super) fn non_negative(v: &mut V, path: String, val: Option<i32>) {
    if let Some(x) = val {
        if x < 0 {
            v.err(path, "must not be negative");
        }
    }
}

pub(super) fn connection_pool(v: &mut V, p: &str, pool: &ConnectionPoolSettings) {
    if pool.tcp.is_none() && pool.http.is_none() {
        v.err(p, "a connection pool must have at least one field");
    }
    if let Some(t) = &pool.tcp {
        non_negative(v, format!("{p}.tcp.maxConnections"), t.max_connections);
        duration(
            v,
            &format!("{p}.tcp.connectTimeout"),
            t.connect_timeout.as_ref(),
        );
        duration(
            v,
            &format!("{p}.tcp.maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
        );
        duration(v, &format!("{p}.tcp.idleTimeout"), t.idle_timeout.as_ref());
        if let Some(k) = &t.tcp_keepalive {
            duration(v, &format!("{p}.tcp.tcpKeepalive.time"), k.time.as_ref());
            duration(
                v,
                &format!("{p}.tcp.tcpKeepalive.interval"),
                k.interval.as_ref(),
            );
        }
    }
    if let Some(h) = &pool.http {
        let hp = format!("{p}.http");
        non_negative(
            v,
            format!("{hp}.http1MaxPendingRequests"),
            h.http1_max_pending_requests,
        );
        non_negative(v, format!("{hp}.http2MaxRequests"), h.http2_max_requests);
        non_negative(
            v,
            format!("{hp}.maxRequestsPerConnection"),
            h.max_requests_per_connection,
        );
        non_negative(v, format!("{hp}.maxRetries"), h.max_retries);
        non_negative(
            v,
            format!("{hp}.maxConcurrentStreams"),
            h.max_concurrent_streams,
        );
        duration(v, &format!("{hp}.idleTimeout"), h.idle_timeout.as_ref());
        if let Some(k) = &h.http2_keep_alive {
            duration(
                v,
                &format!("{hp}.http2KeepAlive.interval"),
                k.interval.as_ref(),
            );
            duration(
                v,
                &format!("{hp}.http2KeepAlive.timeout"),
                k.timeout.as_ref(),
            );
        }
        if h.use_client_protocol == Some(true)
            && h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade)
        {
            v.err(
                &hp,
                "useClientProtocol must not be true when h2UpgradePolicy is UPGRADE",
            );
        }
    }
}

pub(super) fn outlier_detection(v: &mut V, p: &str, od: &OutlierDetection) {
    for (field, val) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(x) = val {
            if !(0..=100).contains(&x) {
                v.err(format!("{p}.{field}"), "must be 0..100");
            }
        }
    }
    non_negative(v, format!("{p}.consecutiveErrors"), od.consecutive_errors);
    if od.consecutive_errors.is_some() {
        v.warn(
            format!("{p}.consecutiveErrors"),
            "consecutiveErrors is deprecated; use consecutive5xxErrors",
        );
    }
    duration(v, &format!("{p}.interval"), od.interval.as_ref());
    duration(
        v,
        &format!("{p}.baseEjectionTime"),
        od.base_ejection_time.as_ref(),
    );
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        v.err(
            format!("{p}.consecutiveLocalOriginFailures"),
            "consecutiveLocalOriginFailures needs splitExternalLocalOriginErrors: true",
        );
    }
    for (i, c) in od.outlier_detection_http_error_codes.iter().enumerate() {
        if !(100..=599).contains(c) {
            v.err(
                format!("{p}.outlierDetectionHttpErrorCodes[{i}]"),
                "must be an HTTP status code",
            );
        }
    }
}

pub(super) fn client_tls(v: &mut V, p: &str, tls: &ClientTlsSettings) {
    let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
    let has_files = tls.client_certificate.is_some()
        || tls.private_key.is_some()
        || tls.ca_certificates.is_some();
    match mode {
        ClientTlsMode::Mutual => {
            if tls.credential_name.is_none()
                && (tls.client_certificate.is_none() || tls.private_key.is_none())
            {
                v.err(
                    p,
                    "MUTUAL TLS needs clientCertificate and privateKey (or credentialName)",
                );
            }
        }
        ClientTlsMode::IstioMutual | ClientTlsMode::Disable => {
            if has_files || tls.credential_name.is_some() {
                let name = if mode == ClientTlsMode::Disable {
                    "DISABLE"
                } else {
                    "ISTIO_MUTUAL"
                };
                v.err(
                    p,
                    format!("{name} TLS must not set certificates, keys or credentialName"),
                );
            }
        }
        ClientTlsMode::Simple => {}
    }
    if tls.credential_name.is_some() && has_files {
        v.err(p, "credentialName cannot be combined with clientCertificate, privateKey or caCertificates");
    }
    if let Some(sni) = &tls.sni {
        host(v, &format!("{p}.sni"), sni, false);
    }
}
