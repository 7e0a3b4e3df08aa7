//! Telemetry selection: which Telemetry resources apply to a workload, merged as Istio
//! does, into the snapshot's `Workload.telemetry`.
//!
//! Three levels, from the least to the most specific:
//!
//! 1. the root namespace's Telemetry without a selector (mesh-wide);
//! 2. the workload's namespace's Telemetry without a selector;
//! 3. a Telemetry of the workload's namespace whose selector matches its labels.
//!
//! Resources attached with `targetRef(s)` are for gateways and waypoints, not sidecars.
//! When a level has more than one candidate, Istio leaves the choice undefined; Trellis
//! takes the first by name and reports the others.
//!
//! Merging, level by level (a more specific level wins):
//!
//! - **tracing**, for the client side and the server side apart (`match.mode`): each field
//!   a level sets replaces the one before; `customTags` merge by tag name;
//! - **metrics**: the providers of the most specific level that names any; `overrides`
//!   accumulate in order, mesh-wide first (a later override of the same metric and tag
//!   wins when applied); the most specific `reportingInterval`;
//! - **access logging**, per side: the entries of the most specific level that has any for
//!   that side replace the others (so a workload can turn off a namespace's logging with
//!   `disabled: true`).

use trellis_api::Resource;
use trellis_api::mesh::MeshConfigFile;
use trellis_api::telemetry::{self as api, WorkloadMode};
use trellis_xds::snapshot as wire;

use crate::registry::Instance;

fn mode_name(m: WorkloadMode) -> &'static str {
    match m {
        WorkloadMode::ClientAndServer => "CLIENT_AND_SERVER",
        WorkloadMode::Client => "CLIENT",
        WorkloadMode::Server => "SERVER",
    }
}

/// Whether an entry matching `m` applies to `side` (CLIENT or SERVER).
fn covers(m: WorkloadMode, side: WorkloadMode) -> bool {
    m == WorkloadMode::ClientAndServer || m == side
}

const SIDES: [WorkloadMode; 2] = [WorkloadMode::Client, WorkloadMode::Server];

fn metric_name(m: api::IstioMetric) -> &'static str {
    use api::IstioMetric as M;
    match m {
        M::AllMetrics => "ALL_METRICS",
        M::RequestCount => "REQUEST_COUNT",
        M::RequestDuration => "REQUEST_DURATION",
        M::RequestSize => "REQUEST_SIZE",
        M::ResponseSize => "RESPONSE_SIZE",
        M::TcpOpenedConnections => "TCP_OPENED_CONNECTIONS",
        M::TcpClosedConnections => "TCP_CLOSED_CONNECTIONS",
        M::TcpSentBytes => "TCP_SENT_BYTES",
        M::TcpReceivedBytes => "TCP_RECEIVED_BYTES",
        M::GrpcRequestMessages => "GRPC_REQUEST_MESSAGES",
        M::GrpcResponseMessages => "GRPC_RESPONSE_MESSAGES",
    }
}

fn duration(d: &trellis_api::common::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.0.subsec_nanos()).unwrap_or(0),
    }
}

/// The Telemetry resources that apply to `me`, least specific first, and a note for each
/// level that had more than one candidate.
pub fn applicable<'a>(
    resources: &[&'a Resource],
    root_namespace: &str,
    me: &Instance,
) -> (Vec<(&'a Resource, &'a api::Telemetry)>, Vec<String>) {
    let mut all: Vec<(&Resource, &api::Telemetry)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            trellis_api::Spec::Telemetry(t)
                if t.target_ref.is_none() && t.target_refs.is_empty() =>
            {
                Some((*r, t))
            }
            _ => None,
        })
        .collect();
    all.sort_by(|a, b| (a.0.namespace(), a.0.name()).cmp(&(b.0.namespace(), b.0.name())));
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut level = |candidates: Vec<(&'a Resource, &'a api::Telemetry)>, what: &str| {
        if let Some(first) = candidates.first() {
            if candidates.len() > 1 {
                let others: Vec<String> = candidates[1..]
                    .iter()
                    .map(|(r, _)| format!("{}/{}", r.namespace(), r.name()))
                    .collect();
                problems.push(format!(
                    "{what}: more than one Telemetry applies to {}/{}; {}/{} is used, not {}",
                    me.namespace,
                    me.name,
                    first.0.namespace(),
                    first.0.name(),
                    others.join(", ")
                ));
            }
            out.push(*first);
        }
    };
    level(
        all.iter()
            .filter(|(r, t)| r.namespace() == root_namespace && t.selector.is_none())
            .copied()
            .collect(),
        "mesh-wide",
    );
    if me.namespace != root_namespace {
        level(
            all.iter()
                .filter(|(r, t)| r.namespace() == me.namespace && t.selector.is_none())
                .copied()
                .collect(),
            "namespace",
        );
    }
    level(
        all.iter()
            .filter(|(r, t)| {
                r.namespace() == me.namespace
                    && t.selector.as_ref().is_some_and(|s| {
                        s.match_labels
                            .iter()
                            .all(|(k, v)| me.labels.get(k) == Some(v))
                    })
            })
            .copied()
            .collect(),
        "workload",
    );
    (out, problems)
}

/// The merged Telemetry of `levels` (least specific first), without a mesh config.
pub fn merge(levels: &[(&Resource, &api::Telemetry)]) -> Option<wire::Telemetry> {
    merge_with(levels, &MeshConfigFile::default())
}

/// The merged Telemetry of `levels` (least specific first) over the mesh config's
/// defaults: `defaultProviders` for entries that name none, `defaultConfig.tracing.sampling`
/// and `accessLogFile` (Envoy's built-in log for every proxy) as the least specific level,
/// and each provider named resolved from `extensionProviders`. `None` when nothing applies.
pub fn merge_with(
    levels: &[(&Resource, &api::Telemetry)],
    mesh: &MeshConfigFile,
) -> Option<wire::Telemetry> {
    let defaults = mesh.default_providers.clone().unwrap_or_default();
    let tracing_on = mesh.enable_tracing != Some(false);
    let sampling = mesh
        .default_config
        .as_ref()
        .and_then(|d| d.tracing.as_ref())
        .and_then(|t| t.sampling);
    // The mesh config as a level of its own, the least specific.
    let mut base = api::Telemetry::default();
    if tracing_on && (!defaults.tracing.is_empty() || sampling.is_some()) {
        base.tracing.push(api::Tracing {
            random_sampling_percentage: Some(sampling.unwrap_or(1.0)),
            ..Default::default()
        });
    }
    // (An empty `accessLogFile` is Istio's "off".)
    if mesh
        .access_log_file
        .as_deref()
        .is_some_and(|f| !f.is_empty())
    {
        base.access_logging.push(api::AccessLogging {
            providers: vec![api::ProviderRef {
                name: "envoy".into(),
            }],
            ..Default::default()
        });
    }
    let mut all: Vec<(String, &api::Telemetry)> = Vec::new();
    if !base.tracing.is_empty() || !base.access_logging.is_empty() {
        all.push(("meshConfig".to_string(), &base));
    }
    all.extend(
        levels
            .iter()
            .map(|(r, t)| (format!("{}/{}", r.namespace(), r.name()), *t)),
    );
    let mut out = merge_levels(&all)?;
    // Entries without providers take the defaults.
    for t in &mut out.tracing {
        if t.providers.is_empty() {
            t.providers = defaults.tracing.clone();
        }
    }
    if let Some(m) = &mut out.metrics {
        if m.providers.is_empty() {
            m.providers = defaults.metrics.clone();
        }
    }
    for a in &mut out.access_logging {
        if a.providers.is_empty() {
            a.providers = if defaults.access_logging.is_empty() {
                vec!["envoy".to_string()]
            } else {
                defaults.access_logging.clone()
            };
        }
    }
    let mut named: Vec<&str> = out
        .tracing
        .iter()
        .flat_map(|t| &t.providers)
        .chain(out.metrics.iter().flat_map(|m| &m.providers))
        .chain(out.access_logging.iter().flat_map(|a| &a.providers))
        .map(String::as_str)
        .collect();
    named.sort_unstable();
    named.dedup();
    out.providers = named
        .into_iter()
        .filter_map(|n| provider(n, mesh))
        .collect();
    Some(out)
}

/// A provider's definition: from `extensionProviders`, or Istio's built-in `envoy` (the
/// access log of `accessLogFile`) and `prometheus`. `None` for a name nothing defines.
fn provider(name: &str, mesh: &MeshConfigFile) -> Option<wire::TelemetryProvider> {
    let mut p = wire::TelemetryProvider {
        name: name.to_string(),
        ..Default::default()
    };
    let Some(e) = mesh.extension_providers.iter().find(|e| e.name == name) else {
        match name {
            "envoy" => {
                p.kind = "envoy".into();
                p.path = Some(
                    mesh.access_log_file
                        .clone()
                        .unwrap_or_else(|| "/dev/stdout".into()),
                );
                p.log_format = mesh.access_log_format.clone();
                if mesh.access_log_encoding.as_deref() == Some("JSON") {
                    p.kind = "envoyJson".into();
                }
                return Some(p);
            }
            "prometheus" => {
                p.kind = "prometheus".into();
                return Some(p);
            }
            _ => return None,
        }
    };
    p.kind = e.kind().ok()?.to_string();
    if let Some(t) = e.zipkin.as_ref().or(e.opentelemetry.as_ref()) {
        p.service = t.service.clone();
        p.port = t.port;
        p.max_tag_length = t.max_tag_length;
        p.path = t
            .http
            .as_ref()
            .and_then(|h| h.path.clone())
            .or_else(|| t.path.clone());
        p.timeout = t
            .http
            .as_ref()
            .and_then(|h| h.timeout.as_ref())
            .or_else(|| t.grpc.as_ref()?.timeout.as_ref())
            .map(duration);
        // Istio sends OTLP over gRPC unless the provider says `http`.
        p.grpc = e.opentelemetry.is_some() && t.http.is_none();
    }
    if let Some(f) = &e.envoy_file_access_log {
        p.path = f.path.clone();
        if let Some(fmt) = &f.log_format {
            p.log_format = fmt.text.clone();
            p.log_labels = fmt.labels.clone().unwrap_or_default();
        }
    }
    Some(p)
}

/// The levels merged (each named by its source), before the mesh config's defaults.
fn merge_levels(levels: &[(String, &api::Telemetry)]) -> Option<wire::Telemetry> {
    if levels.is_empty() {
        return None;
    }
    let mut out = wire::Telemetry {
        sources: levels.iter().map(|(name, _)| name.clone()).collect(),
        ..Default::default()
    };

    // Tracing, per side.
    let mut tracing: Vec<wire::TracingConfig> = Vec::new();
    for side in SIDES {
        let mut t = wire::TracingConfig {
            mode: mode_name(side).to_string(),
            ..Default::default()
        };
        let mut any = false;
        for (_, level) in levels {
            for entry in &level.tracing {
                let m = entry.selector.map(|s| s.mode).unwrap_or_default();
                if !covers(m, side) {
                    continue;
                }
                any = true;
                if !entry.providers.is_empty() {
                    t.providers = entry.providers.iter().map(|p| p.name.clone()).collect();
                }
                if entry.random_sampling_percentage.is_some() {
                    t.random_sampling_percentage = entry.random_sampling_percentage;
                }
                if entry.disable_span_reporting.is_some() {
                    t.disable_span_reporting = entry.disable_span_reporting;
                }
                if entry.use_request_id_for_trace_sampling.is_some() {
                    t.use_request_id_for_trace_sampling = entry.use_request_id_for_trace_sampling;
                }
                if entry.enable_istio_tags.is_some() {
                    t.enable_istio_tags = entry.enable_istio_tags;
                }
                if entry.disable_context_propagation.is_some() {
                    t.disable_context_propagation = entry.disable_context_propagation;
                }
                for (name, tag) in &entry.custom_tags {
                    t.custom_tags.insert(name.clone(), custom_tag(tag));
                }
            }
        }
        if any {
            tracing.push(t);
        }
    }
    // Both sides the same: one entry for both.
    let modeless = |t: &wire::TracingConfig| wire::TracingConfig {
        mode: String::new(),
        ..t.clone()
    };
    if let [client, server] = tracing.as_slice() {
        if modeless(client) == modeless(server) {
            let mut both = client.clone();
            both.mode = mode_name(WorkloadMode::ClientAndServer).to_string();
            tracing = vec![both];
        }
    }
    out.tracing = tracing;

    // Metrics.
    let mut metrics = wire::MetricsConfig::default();
    let mut any_metrics = false;
    for (_, level) in levels {
        for m in &level.metrics {
            any_metrics = true;
            if !m.providers.is_empty() {
                metrics.providers = m.providers.iter().map(|p| p.name.clone()).collect();
            }
            if let Some(d) = &m.reporting_interval {
                metrics.reporting_interval = Some(duration(d));
            }
            for o in &m.overrides {
                let sel = o.selector.as_ref();
                let metric = match (
                    sel.and_then(|s| s.metric),
                    sel.and_then(|s| s.custom_metric.as_ref()),
                ) {
                    (Some(m), _) => metric_name(m).to_string(),
                    (None, Some(custom)) => custom.clone(),
                    (None, None) => metric_name(api::IstioMetric::AllMetrics).to_string(),
                };
                metrics.overrides.push(wire::MetricOverride {
                    metric,
                    mode: mode_name(sel.map(|s| s.mode).unwrap_or_default()).to_string(),
                    disabled: o.disabled,
                    tag_overrides: o
                        .tag_overrides
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                wire::TagOverride {
                                    remove: v.operation == api::TagOperation::Remove,
                                    value: v.value.clone(),
                                },
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    if any_metrics {
        out.metrics = Some(metrics);
    }

    // Access logging, per side: the most specific level with entries for it.
    let mut logs: Vec<(WorkloadMode, Vec<wire::AccessLogConfig>)> = Vec::new();
    for side in SIDES {
        // The most specific level with entries for this side wins; an entry of it that
        // names no provider takes those a less specific level named (Istio's inheritance).
        let mut chosen: Option<Vec<&api::AccessLogging>> = None;
        let mut inherited: Vec<String> = Vec::new();
        for (_, level) in levels {
            let entries: Vec<&api::AccessLogging> = level
                .access_logging
                .iter()
                .filter(|a| covers(a.selector.map(|s| s.mode).unwrap_or_default(), side))
                .collect();
            if entries.is_empty() {
                continue;
            }
            if let Some(previous) = &chosen {
                if let Some(named) = previous.iter().find(|a| !a.providers.is_empty()) {
                    inherited = named.providers.iter().map(|p| p.name.clone()).collect();
                }
            }
            chosen = Some(entries);
        }
        if let Some(entries) = chosen {
            logs.push((
                side,
                entries
                    .into_iter()
                    .map(|a| wire::AccessLogConfig {
                        mode: mode_name(side).to_string(),
                        providers: if a.providers.is_empty() {
                            inherited.clone()
                        } else {
                            a.providers.iter().map(|p| p.name.clone()).collect()
                        },
                        disabled: a.disabled,
                        filter: a.filter.as_ref().and_then(|f| f.expression.clone()),
                    })
                    .collect(),
            ));
        }
    }
    let strip = |v: &[wire::AccessLogConfig]| -> Vec<wire::AccessLogConfig> {
        v.iter()
            .map(|a| wire::AccessLogConfig {
                mode: String::new(),
                ..a.clone()
            })
            .collect()
    };
    out.access_logging = match logs.as_slice() {
        [(_, client), (_, server)] if strip(client) == strip(server) => client
            .iter()
            .map(|a| wire::AccessLogConfig {
                mode: mode_name(WorkloadMode::ClientAndServer).to_string(),
                ..a.clone()
            })
            .collect(),
        _ => logs.into_iter().flat_map(|(_, v)| v).collect(),
    };
    Some(out)
}

fn custom_tag(t: &api::CustomTag) -> wire::TracingTag {
    wire::TracingTag {
        literal: t.literal.as_ref().map(|l| l.value.clone()),
        environment: t.environment.as_ref().map(|e| e.name.clone()),
        header: t.header.as_ref().map(|h| h.name.clone()),
        default_value: t
            .environment
            .as_ref()
            .and_then(|e| e.default_value.clone())
            .or_else(|| t.header.as_ref().and_then(|h| h.default_value.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse(yaml: &str) -> Vec<Resource> {
        trellis_api::parse_text(yaml, "t.yaml", &trellis_api::LoadOptions::default())
            .into_iter()
            .map(|p| {
                p.resource()
                    .cloned()
                    .unwrap_or_else(|| panic!("{:?}", p.diagnostics))
            })
            .collect()
    }

    fn me(ns: &str, app: &str) -> Instance {
        Instance {
            name: format!("{app}-0"),
            workload: app.into(),
            namespace: ns.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            service_account: app.into(),
            addresses: vec![],
            ports: vec![],
            locality: None,
            entry: false,
        }
    }

    const CONFIG: &str = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: zipkin}]
    randomSamplingPercentage: 1
    customTags:
      cluster: {literal: {value: east}}
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: ALL_METRICS}
      tagOverrides:
        request_protocol: {operation: REMOVE}
  accessLogging:
  - providers: [{name: envoy}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop, namespace: shop}
spec:
  tracing:
  - match: {mode: SERVER}
    randomSamplingPercentage: 50
    customTags:
      team: {header: {name: x-team, defaultValue: none}}
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      disabled: true
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 400"}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet-reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  accessLogging:
  - match: {mode: CLIENT}
    disabled: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: for-gateways, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: edge}]
  accessLogging:
  - disabled: true
"#;

    fn effective(resources: &[Resource], who: &Instance) -> (Option<wire::Telemetry>, Vec<String>) {
        let refs: Vec<&Resource> = resources.iter().collect();
        let (levels, problems) = applicable(&refs, "istio-system", who);
        (merge(&levels), problems)
    }

    #[test]
    fn levels_merge_from_mesh_to_namespace_to_workload() {
        let rs = parse(CONFIG);
        let (t, problems) = effective(&rs, &me("shop", "reviews"));
        assert!(problems.is_empty(), "{problems:?}");
        let t = t.expect("telemetry");
        assert_eq!(
            t.sources,
            [
                "istio-system/mesh-default",
                "shop/shop",
                "shop/quiet-reviews"
            ]
        );
        // Tracing: the namespace raises sampling on the server side only; the custom tags
        // of both levels are there; the mesh's provider stays.
        let side = |m: &str| t.tracing.iter().find(|c| c.mode == m).expect(m).clone();
        let (client, server) = (side("CLIENT"), side("SERVER"));
        assert_eq!(client.random_sampling_percentage, Some(1.0));
        assert_eq!(server.random_sampling_percentage, Some(50.0));
        assert_eq!(server.providers, ["zipkin"]);
        assert_eq!(client.custom_tags.len(), 1);
        assert_eq!(server.custom_tags.len(), 2);
        assert_eq!(server.custom_tags["team"].header.as_deref(), Some("x-team"));
        assert_eq!(
            server.custom_tags["team"].default_value.as_deref(),
            Some("none")
        );
        // Metrics: providers from the mesh, overrides accumulated in order.
        let m = t.metrics.expect("metrics");
        assert_eq!(m.providers, ["prometheus"]);
        let o: Vec<(&str, &str, Option<bool>)> = m
            .overrides
            .iter()
            .map(|o| (o.metric.as_str(), o.mode.as_str(), o.disabled))
            .collect();
        assert_eq!(
            o,
            [
                ("ALL_METRICS", "CLIENT_AND_SERVER", None),
                ("REQUEST_COUNT", "CLIENT", Some(true))
            ]
        );
        assert!(m.overrides[0].tag_overrides["request_protocol"].remove);
        // Access logging: the workload turns off its client side; the server side keeps
        // the namespace's filtered log (the gateway-only resource never applies).
        let logs: Vec<(&str, Option<bool>, Option<&str>)> = t
            .access_logging
            .iter()
            .map(|a| (a.mode.as_str(), a.disabled, a.filter.as_deref()))
            .collect();
        assert_eq!(
            logs,
            [
                ("CLIENT", Some(true), None),
                ("SERVER", None, Some("response.code >= 400"))
            ]
        );
    }

    #[test]
    fn other_workloads_and_namespaces_see_only_their_levels() {
        let rs = parse(CONFIG);
        // Another workload of the namespace: no workload level; both sides log alike.
        let (t, _) = effective(&rs, &me("shop", "ratings"));
        let t = t.expect("telemetry");
        assert_eq!(t.sources, ["istio-system/mesh-default", "shop/shop"]);
        assert_eq!(t.access_logging.len(), 1);
        assert_eq!(t.access_logging[0].mode, "CLIENT_AND_SERVER");
        // Another namespace: the mesh-wide resource alone, the same on both sides.
        let (t, _) = effective(&rs, &me("web", "web"));
        let t = t.expect("telemetry");
        assert_eq!(t.sources, ["istio-system/mesh-default"]);
        assert_eq!(t.tracing.len(), 1);
        assert_eq!(t.tracing[0].mode, "CLIENT_AND_SERVER");
        assert_eq!(t.tracing[0].random_sampling_percentage, Some(1.0));
        // No Telemetry at all: nothing.
        assert_eq!(effective(&[], &me("web", "web")).0, None);
    }

    #[test]
    fn the_mesh_config_gives_defaults_and_provider_definitions() {
        let (mesh, _) = trellis_api::mesh::parse_mesh_config(
            r#"
defaultConfig: {tracing: {sampling: 5}}
defaultProviders: {tracing: [otel]}
extensionProviders:
- name: otel
  opentelemetry: {service: collector.obs.svc.cluster.local, port: 4318, http: {path: /v1/traces}}
- name: zipkin
  zipkin: {service: zipkin.obs.svc.cluster.local, port: 9411}
- name: otel-grpc
  opentelemetry: {service: collector.obs.svc.cluster.local, port: 4317, grpc: {timeout: 2s}}
accessLogFile: /dev/stdout
accessLogEncoding: JSON
"#,
            "mesh.yaml",
        )
        .expect("mesh config");
        // No Telemetry at all: the mesh config alone traces at 5 % to otel, and logs.
        let t = merge_with(&[], &mesh).expect("telemetry");
        assert_eq!(t.sources, ["meshConfig"]);
        assert_eq!(t.tracing[0].mode, "CLIENT_AND_SERVER");
        assert_eq!(t.tracing[0].random_sampling_percentage, Some(5.0));
        assert_eq!(t.tracing[0].providers, ["otel"]);
        assert_eq!(t.access_logging[0].providers, ["envoy"]);
        let kinds: Vec<(&str, &str)> = t
            .providers
            .iter()
            .map(|p| (p.name.as_str(), p.kind.as_str()))
            .collect();
        assert_eq!(kinds, [("envoy", "envoyJson"), ("otel", "opentelemetry")]);
        let otel = &t.providers[1];
        assert_eq!(
            (otel.service.as_str(), otel.port, otel.path.as_deref()),
            ("collector.obs.svc.cluster.local", 4318, Some("/v1/traces"))
        );
        assert!(!otel.grpc, "`http` set: OTLP/HTTP");
        // Without `http`, OTLP goes over gRPC (Istio's default), with its timeout.
        let grpc = provider("otel-grpc", &mesh).expect("defined");
        assert!(grpc.grpc);
        assert_eq!(grpc.timeout.map(|d| d.seconds), Some(2));
        assert!(!provider("zipkin", &mesh).expect("defined").grpc);
        // A Telemetry that names zipkin and samples more: its provider, its rate.
        let rs = parse(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec:\n  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 50}]\n",
        );
        let refs: Vec<&Resource> = rs.iter().collect();
        let (levels, _) = applicable(&refs, "istio-system", &me("shop", "web"));
        let t = merge_with(&levels, &mesh).expect("telemetry");
        assert_eq!(t.sources, ["meshConfig", "shop/t"]);
        assert_eq!(t.tracing[0].providers, ["zipkin"]);
        assert_eq!(t.tracing[0].random_sampling_percentage, Some(50.0));
        assert!(
            t.providers
                .iter()
                .any(|p| p.name == "zipkin" && p.port == 9411)
        );
        // `enableTracing: false` turns off the mesh config's own tracing, not what a
        // Telemetry resource configures (Istio: it is the fallback).
        let off = trellis_api::mesh::MeshConfigFile {
            enable_tracing: Some(false),
            ..mesh.clone()
        };
        let t = merge_with(&levels, &off).expect("telemetry");
        assert_eq!(t.tracing[0].providers, ["zipkin"]);
        assert!(
            merge_with(&[], &off)
                .expect("telemetry (the access log)")
                .tracing
                .is_empty()
        );
        // An empty accessLogFile is off.
        let quiet = trellis_api::mesh::MeshConfigFile {
            access_log_file: Some(String::new()),
            ..off
        };
        assert_eq!(merge_with(&[], &quiet), None);
    }

    #[test]
    fn an_access_log_entry_without_providers_inherits_the_less_specific_ones() {
        let rs = parse(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh, namespace: istio-system}\nspec:\n  accessLogging: [{providers: [{name: json-log}]}]\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: errors, namespace: shop}\nspec:\n  accessLogging: [{filter: {expression: \"response.code >= 500\"}}]\n",
        );
        let (t, _) = effective(&rs, &me("shop", "web"));
        let t = t.expect("telemetry");
        assert_eq!(t.access_logging.len(), 1);
        assert_eq!(t.access_logging[0].providers, ["json-log"]);
        assert_eq!(
            t.access_logging[0].filter.as_deref(),
            Some("response.code >= 500")
        );
    }

    #[test]
    fn two_candidates_at_one_level_are_reported_and_the_first_by_name_wins() {
        let rs = parse(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: b, namespace: shop}\nspec:\n  tracing: [{randomSamplingPercentage: 20}]\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: a, namespace: shop}\nspec:\n  tracing: [{randomSamplingPercentage: 10}]\n",
        );
        let (t, problems) = effective(&rs, &me("shop", "reviews"));
        assert_eq!(
            t.expect("telemetry").tracing[0].random_sampling_percentage,
            Some(10.0)
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("shop/a is used, not shop/b"),
            "{problems:?}"
        );
    }
}
