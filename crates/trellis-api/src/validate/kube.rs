//! Kubernetes Service and Trellis Workload validation.

use super::*;

pub(super) fn service(v: &mut V, s: &ServiceSpec) {
    labels(v, "spec.selector", &s.selector);
    let mut names = HashSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        port(v, &format!("{pp}.port"), p.port);
        if let Some(crate::common::IntOrString::Int(t)) = &p.target_port {
            if !(1..=65535).contains(t) {
                v.err(
                    format!("{pp}.targetPort"),
                    format!("port {t} must be in 1..65535"),
                );
            }
        }
        if let Some(proto) = &p.protocol {
            if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                v.err(
                    format!("{pp}.protocol"),
                    format!("{proto:?} must be TCP, UDP or SCTP"),
                );
            }
        }
        match &p.name {
            Some(n) if !names.insert(n.as_str()) => {
                v.err(format!("{pp}.name"), format!("duplicate port name {n:?}"));
            }
            Some(_) => {}
            None if s.ports.len() > 1 => {
                v.err(
                    format!("{pp}.name"),
                    "ports must be named when a Service has more than one",
                );
            }
            None => {}
        }
    }
}

pub(super) fn workload(v: &mut V, s: &WorkloadSpec) {
    if s.gateway {
        if !s.command.is_empty() {
            v.err(
                "spec.command",
                "a gateway runs Trellis's gateway proxy: it has no command",
            );
        }
        if s.ports.is_empty() {
            v.err("spec.ports", "a gateway needs the ports it serves");
        }
    } else if s.command.is_empty() || s.command[0].is_empty() {
        v.err("spec.command", "command must name the program to run");
    }
    if let Some(sa) = &s.service_account {
        if !is_dns1123_subdomain(sa) {
            v.err(
                "spec.serviceAccount",
                format!("invalid service account name {sa:?}"),
            );
        }
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        port(v, &format!("{pp}.port"), p.port);
        if let Some(h) = p.host_port {
            port(v, &format!("{pp}.hostPort"), h);
        }
        if let Some(prev) = ports.insert(p.port, i) {
            v.err(
                format!("{pp}.port"),
                format!("port {} is already declared by ports[{prev}]", p.port),
            );
        }
        if let Some(n) = &p.name {
            if !is_port_name(n) {
                v.err(format!("{pp}.name"), format!("invalid port name {n:?}"));
            }
        }
    }
    for (i, e) in s.env.iter().enumerate() {
        if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
            v.err(
                format!("spec.env[{i}].name"),
                format!("invalid environment variable name {:?}", e.name),
            );
        }
    }
    if let Some(pr) = &s.readiness_probe {
        probe(v, "spec.readinessProbe", pr);
    }
}
