//! Every field of Istio's CRD schemas (tests/data/istio-crds.yaml, copied unmodified from
//! istio/api, see tests/data/README.md) is a field Trellis accepts: for each leaf of each
//! served version's `spec` schema, a document setting just that field must not be rejected
//! as an unknown field.

use serde_json::{Map, Value, json};
use trellis_api::yaml::{self, Node};
use trellis_api::{LoadOptions, parse_text};

const CRDS: &str = include_str!("data/istio-crds.yaml");

/// Kinds Trellis models (the others in the file are EnvoyFilter, WasmPlugin…).
const KINDS: [&str; 11] = [
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "ServiceEntry",
    "Sidecar",
    "WorkloadEntry",
    "WorkloadGroup",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "Telemetry",
];

/// Collects (path from spec, value) for each leaf: each path is a list of steps that say
/// how to build the JSON around the sample value.
#[derive(Debug, Clone)]
enum Step {
    Field(String),
    Item,
    MapValue,
}

fn sample(schema: &Node) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Node::as_seq)
        .and_then(|e| e.first())
    {
        return json!(first.as_scalar().unwrap_or_default());
    }
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Node::as_scalar)
        == Some("true")
    {
        return json!(1);
    }
    match schema.get("type").and_then(Node::as_str) {
        Some("integer") => json!(1),
        Some("number") => json!(1.0),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        Some("object") => json!({}),
        _ => json!("x"),
    }
}

fn walk(schema: &Node, path: &mut Vec<Step>, out: &mut Vec<(Vec<Step>, Value)>) {
    if let Some(props) = schema.get("properties") {
        if let yaml::Value::Map(entries) = &props.value {
            for (k, v) in entries {
                path.push(Step::Field(k.text.clone()));
                walk(v, path, out);
                path.pop();
            }
            return;
        }
    }
    let ty = schema.get("type").and_then(Node::as_str);
    if ty == Some("array") {
        if let Some(items) = schema.get("items") {
            path.push(Step::Item);
            walk(items, path, out);
            path.pop();
            return;
        }
    }
    if ty == Some("object") {
        if let Some(ap) = schema.get("additionalProperties") {
            if matches!(ap.value, yaml::Value::Map(_)) {
                path.push(Step::MapValue);
                walk(ap, path, out);
                path.pop();
                return;
            }
        }
    }
    out.push((path.clone(), sample(schema)));
}

fn build(steps: &[Step], leaf: Value) -> Value {
    match steps.split_first() {
        None => leaf,
        Some((Step::Field(f), rest)) => {
            let mut m = Map::new();
            m.insert(f.clone(), build(rest, leaf));
            Value::Object(m)
        }
        Some((Step::Item, rest)) => Value::Array(vec![build(rest, leaf)]),
        // "1" is a valid key for string maps and for maps keyed by port number.
        Some((Step::MapValue, rest)) => json!({ "1": build(rest, leaf) }),
    }
}

fn render(steps: &[Step]) -> String {
    let mut s = String::from("spec");
    for st in steps {
        match st {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Item => s.push_str("[]"),
            Step::MapValue => s.push_str("{}"),
        }
    }
    s
}

#[test]
fn every_crd_field_is_accepted() {
    let docs = yaml::parse_documents(CRDS);
    let mut checked = 0;
    let mut kinds_seen = Vec::new();
    let mut unknown = Vec::new();
    for doc in docs {
        let crd = doc.result.expect("the reference CRD file parses");
        let spec = crd.get("spec").expect("CRD spec");
        let kind = spec
            .get("names")
            .and_then(|n| n.get("kind"))
            .and_then(Node::as_str)
            .expect("kind");
        if !KINDS.contains(&kind) {
            continue;
        }
        let group = spec.get("group").and_then(Node::as_str).expect("group");
        for version in spec
            .get("versions")
            .and_then(Node::as_seq)
            .expect("versions")
        {
            if version.get("served").and_then(Node::as_scalar) != Some("true") {
                continue;
            }
            let v = version
                .get("name")
                .and_then(Node::as_str)
                .expect("version name");
            let schema = version
                .get("schema")
                .and_then(|s| s.get("openAPIV3Schema"))
                .and_then(|s| s.get("properties"))
                .and_then(|p| p.get("spec"))
                .expect("spec schema");
            let mut leaves = Vec::new();
            walk(schema, &mut Vec::new(), &mut leaves);
            assert!(!leaves.is_empty(), "{kind} {v}: no fields found");
            for (steps, leaf) in leaves {
                let doc = json!({
                    "apiVersion": format!("{group}/{v}"),
                    "kind": kind,
                    "metadata": {"name": "x"},
                    "spec": build(&steps, leaf),
                });
                let parsed = parse_text(&doc.to_string(), "crd.json", &LoadOptions::default());
                for d in parsed.iter().flat_map(|p| &p.diagnostics) {
                    if d.message.contains("unknown field") {
                        unknown.push(format!("{kind} {v} {}: {d}", render(&steps)));
                    }
                }
                checked += 1;
            }
            kinds_seen.push(format!("{kind}/{v}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "fields Trellis rejects:\n{}",
        unknown.join("\n")
    );
    assert_eq!(kinds_seen.len(), 29, "{kinds_seen:?}");
    assert!(checked >= 1800, "only {checked} fields checked");
}
