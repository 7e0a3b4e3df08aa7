//! Bad input gives precise errors (file, line, column, object, field path) and never panics;
//! good documents beside bad ones still load.

use std::time::{Duration, Instant};

use trellis_api::load::{load_file, load_paths, parse_bytes};
use trellis_api::{Diagnostic, Level, LoadOptions, Parsed, parse_text};

fn load(text: &str) -> Vec<Parsed> {
    parse_text(text, "reviews.yaml", &LoadOptions::default())
}

fn errors(parsed: &[Parsed]) -> Vec<&Diagnostic> {
    parsed
        .iter()
        .flat_map(|p| &p.diagnostics)
        .filter(|d| d.level == Level::Error)
        .collect()
}

/// The single error of a one-document text, rendered.
fn only_error(text: &str) -> String {
    let parsed = load(text);
    let errs = errors(&parsed);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert!(
        parsed.iter().all(|p| p.document.is_none()),
        "document must be rejected"
    );
    errs[0].to_string()
}

const VS_HEAD: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
";

#[test]
fn weight_sum_90_names_file_line_column_object_and_path() {
    let text = format!(
        "{VS_HEAD}    - destination:
        host: reviews
        subset: v1
      weight: 40
    - destination:
        host: reviews
        subset: v2
      weight: 50
"
    );
    assert_eq!(
        only_error(&text),
        "reviews.yaml:9:5: VirtualService default/reviews: spec.http[0].route: \
         weights must sum to 100 when a route has more than one destination (they sum to 90)"
    );
}

#[test]
fn weight_out_of_range_points_at_the_weight() {
    let text = format!(
        "{VS_HEAD}    - destination:
        host: reviews
      weight: 120
    - destination:
        host: reviews
        subset: v2
      weight: -20
"
    );
    let parsed = load(&text);
    let errs: Vec<String> = errors(&parsed).iter().map(ToString::to_string).collect();
    assert!(
        errs.contains(
            &"reviews.yaml:12:15: VirtualService default/reviews: spec.http[0].route[0].weight: must be 0..100"
                .to_string()
        ),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.starts_with("reviews.yaml:16:15:")
            && e.contains("route[1].weight: must be 0..100")),
        "{errs:#?}"
    );
}

#[test]
fn unknown_field_is_an_error_with_a_suggestion() {
    let text = format!("{VS_HEAD}    - destination:\n        host: reviews\n        subsett: v1\n");
    assert_eq!(
        only_error(&text),
        "reviews.yaml:12:9: VirtualService default/reviews: spec.http[0].route[0].destination.subsett: \
         unknown field `subsett` (did you mean `subset`?)"
    );
}

#[test]
fn unknown_top_level_and_spec_fields() {
    let err = only_error("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspek: {}\n");
    assert!(
        err.starts_with("reviews.yaml:4:1: Service default/a: spek: unknown field `spek`"),
        "{err}"
    );
    let err = only_error(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec:\n  mtls: {mode: STRICT}\n  foo: 1\n",
    );
    assert!(err.contains("spec.foo: unknown field `foo`"), "{err}");
}

#[test]
fn wrong_types() {
    let text =
        format!("{VS_HEAD}    - destination:\n        host: reviews\n      weight: \"fifty\"\n");
    assert_eq!(
        only_error(&text),
        "reviews.yaml:12:15: VirtualService default/reviews: spec.http[0].route[0].weight: \
         expected an integer (int32), found string \"fifty\""
    );
    // A string where a list is expected.
    let err = only_error(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: reviews\n",
    );
    assert_eq!(
        err,
        "reviews.yaml:5:10: VirtualService default/r: spec.hosts: expected a list, found string \"reviews\""
    );
    // A number where Kubernetes wants a string (label values).
    let err = only_error(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  labels:\n    version: 1\n",
    );
    assert!(
        err.contains("metadata.labels.version: expected a string, found integer `1`"),
        "{err}"
    );
    assert!(err.contains("quote it"), "{err}");
    // An enum value that does not exist.
    let err = only_error(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec:\n  mtls:\n    mode: STRICTLY\n",
    );
    assert!(
        err.contains("spec.mtls.mode: unknown value \"STRICTLY\", expected one of UNSET, DISABLE, PERMISSIVE, STRICT"),
        "{err}"
    );
}

#[test]
fn bad_durations() {
    let text = format!("{VS_HEAD}    - destination:\n        host: reviews\n    timeout: 10\n");
    let err = only_error(&text);
    assert!(
        err.starts_with(
            "reviews.yaml:12:14: VirtualService default/reviews: spec.http[0].timeout: "
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "expected a duration string such as \"1.5s\" or \"100ms\", found integer `10`"
        ),
        "{err}"
    );
    let text = format!("{VS_HEAD}    - destination:\n        host: reviews\n    timeout: 10x\n");
    let err = only_error(&text);
    assert!(
        err.contains("spec.http[0].timeout: invalid duration \"10x\": unknown unit"),
        "{err}"
    );
    let text = format!("{VS_HEAD}    - destination:\n        host: reviews\n    timeout: 0s\n");
    let err = only_error(&text);
    assert!(
        err.contains("spec.http[0].timeout: duration 0s must be at least 1ms"),
        "{err}"
    );
}

#[test]
fn bad_regex() {
    let text = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri:
        regex: \"/api/(v1|v2\"
    route:
    - destination: {host: reviews}
";
    let err = only_error(text);
    assert!(
        err.starts_with("reviews.yaml:9:16: VirtualService default/reviews: spec.http[0].match[0].uri.regex: invalid regex \"/api/(v1|v2\""),
        "{err}"
    );
}

#[test]
fn mutually_exclusive_fields() {
    let err = only_error(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [r]
  http:
  - redirect: {uri: /new}
    route:
    - destination: {host: r}
",
    );
    assert!(
        err.contains("spec.http[0]: an HTTP route cannot have both route and redirect"),
        "{err}"
    );
    let err = only_error(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  jwtRules:
  - issuer: me
    jwksUri: https://example.com/jwks.json
    jwks: '{\"keys\": []}'
",
    );
    assert!(
        err.contains("spec.jwtRules[0]: only one of jwks or jwksUri can be set"),
        "{err}"
    );
}

#[test]
fn cidrs_hosts_ports_and_subsets() {
    let err = only_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [\"10.0.0.0/33\"]
",
    );
    assert!(
        err.contains(
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\": prefix length must be 0..32"
        ),
        "{err}"
    );

    let err = only_error(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec:
  host: reviews
  subsets:
  - name: v1
  - name: v1
",
    );
    assert!(
        err.contains("spec.subsets[1].name: duplicate subset name \"v1\""),
        "{err}"
    );

    let err = only_error(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s}
spec:
  egress:
  - hosts: [\"reviews.default.svc.cluster.local\"]
",
    );
    assert!(err.contains("spec.egress[0].hosts[0]: egress host \"reviews.default.svc.cluster.local\" must be of the form namespace/dnsName"), "{err}");

    let parsed = load(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [\"re*views\"]
  http:
  - route:
    - destination: {host: reviews, port: {number: 70000}}
",
    );
    let errs: Vec<String> = errors(&parsed).iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        [
            "reviews.yaml:5:11: VirtualService default/r: spec.hosts[0]: host \"re*views\" has a partial wildcard; \
             `*` may only be the whole host or its first label (`*.example.com`)",
            "reviews.yaml:8:51: VirtualService default/r: spec.http[0].route[0].destination.port.number: \
             port 70000 must be in 1..65535",
        ]
    );
}

#[test]
fn service_entry_endpoints_need_an_address() {
    let err = only_error(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.internal]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - labels: {role: primary}
",
    );
    assert!(
        err.contains("spec.endpoints[0].address: address is required (or network)"),
        "{err}"
    );
}

#[test]
fn authorization_policy_action_rules_provider() {
    let err = only_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext}
spec:
  action: CUSTOM
  rules: [{to: [{operation: {paths: [/admin]}}]}]
",
    );
    assert!(
        err.contains("spec.provider: a CUSTOM policy needs provider.name"),
        "{err}"
    );
    let err = only_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny}
spec:
  action: DENY
",
    );
    assert!(
        err.contains("a DENY policy without rules matches nothing"),
        "{err}"
    );
    let err = only_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow}
spec:
  action: ALLOW
  provider: {name: my-authz}
  rules: [{}]
",
    );
    assert!(
        err.contains("provider may only be set with action CUSTOM (action is ALLOW)"),
        "{err}"
    );
}

#[test]
fn syntax_errors_are_located_and_stay_in_their_document() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: good-one}
---
apiVersion: v1
kind: Service
metadata: {name: broken
---
apiVersion: v1
kind: Service
metadata: {name: good-two}
";
    let parsed = load(text);
    assert_eq!(parsed.len(), 3);
    assert!(parsed[0].resource().is_some());
    assert!(parsed[2].resource().is_some());
    let errs = errors(&parsed);
    assert_eq!(errs.len(), 1);
    let e = errs[0].to_string();
    assert!(e.starts_with("reviews.yaml:8:1: YAML syntax error:"), "{e}");
}

#[test]
fn bad_documents_are_rejected_one_by_one() {
    let text = format!(
        "{VS_HEAD}    - destination: {{host: reviews}}
      weight: 30
    - destination: {{host: reviews, subset: v2}}
      weight: 30
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec: {{host: reviews}}
"
    );
    let parsed = load(&text);
    assert_eq!(parsed.len(), 2);
    assert!(parsed[0].document.is_none());
    assert_eq!(
        parsed[0].object.as_ref().map(|o| o.to_string()).as_deref(),
        Some("VirtualService default/reviews")
    );
    assert!(parsed[1].resource().is_some());
}

#[test]
fn wrong_api_version_and_missing_kind() {
    let err = only_error(
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: r}\n",
    );
    assert_eq!(
        err,
        "reviews.yaml:1:13: VirtualService default/r: apiVersion: apiVersion \"networking.istio.io/v2\" is not served \
         for VirtualService; use networking.istio.io/v1 or networking.istio.io/v1beta1 or networking.istio.io/v1alpha3"
    );
    let err = only_error("apiVersion: v1\nmetadata: {name: r}\n");
    assert!(err.contains("missing or invalid `kind`"), "{err}");
    let err = only_error("apiVersion: v1\nkind: Service\nmetadata: {labels: {a: b}}\n");
    assert!(
        err.contains("metadata.name: missing required field `name`"),
        "{err}"
    );
}

#[test]
fn kubernetes_gateway_api_gateway_is_not_an_istio_gateway() {
    let parsed = load(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: istio}\n",
    );
    assert!(errors(&parsed).is_empty());
    assert_eq!(parsed[0].diagnostics[0].level, Level::Info);
}

#[test]
fn empty_and_comment_only_input() {
    for text in ["", "\n\n", "# just a comment\n---\n# another\n"] {
        let err = only_error(text);
        assert_eq!(
            err,
            "reviews.yaml:1:1: no configuration documents (the input is empty or only comments)",
            "{text:?}"
        );
    }
}

#[test]
fn non_utf8_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("latin1.yaml");
    std::fs::write(
        &path,
        b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n",
    )
    .expect("write");
    let parsed = load_file(&path, &LoadOptions::default());
    let errs = errors(&parsed);
    assert_eq!(errs.len(), 1);
    let e = errs[0].to_string();
    assert!(
        e.contains("latin1.yaml:3:21: not valid UTF-8 (byte offset 49)"),
        "{e}"
    );
}

fn garbage(len: usize, seed: u64, ascii: bool) -> Vec<u8> {
    // xorshift: deterministic, no dependency.
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = (x >> 24) as u8;
            if ascii {
                // Printable ASCII, newlines and YAML punctuation.
                let alphabet = b" \n:-[]{}#&*!|>'\"%@`,?abcXYZ019\t";
                alphabet[usize::from(b) % alphabet.len()]
            } else {
                b
            }
        })
        .collect()
}

#[test]
fn ten_megabytes_of_garbage_fail_cleanly_and_quickly() {
    for (seed, ascii) in [(1, false), (2, true), (3, true)] {
        let bytes = garbage(10 * 1024 * 1024, seed, ascii);
        let start = Instant::now();
        let parsed = parse_bytes(&bytes, "garbage.yaml", &LoadOptions::default());
        let took = start.elapsed();
        assert!(took < Duration::from_secs(60), "took {took:?}");
        assert!(!parsed.is_empty());
        assert!(
            parsed.iter().all(|p| p.document.is_none()),
            "garbage must not load"
        );
        assert!(!errors(&parsed).is_empty());
        for d in errors(&parsed).iter().take(3) {
            assert!(d.to_string().starts_with("garbage.yaml:"), "{d}");
        }
    }
    // Deep nesting must not overflow the stack.
    let deep = "[".repeat(10 * 1024 * 1024);
    let parsed = parse_text(&deep, "deep.yaml", &LoadOptions::default());
    assert!(
        errors(&parsed)
            .iter()
            .any(|d| d.message.contains("nesting") || d.message.contains("YAML"))
    );
}

#[test]
fn directories_are_read_recursively_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("nested/deeper");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\n",
    )
    .expect("w");
    std::fs::write(
        dir.path().join("a.yml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
    )
    .expect("w");
    std::fs::write(
        sub.join("c.json"),
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}}"#,
    )
    .expect("w");
    std::fs::write(dir.path().join("notes.txt"), "not config").expect("w");
    std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").expect("w");
    let parsed = load_paths(&[dir.path()], &LoadOptions::default());
    let names: Vec<_> = parsed
        .iter()
        .filter_map(|p| p.resource())
        .map(|r| r.name().to_string())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(errors(&parsed).is_empty());
    let missing = load_paths(&[dir.path().join("nope")], &LoadOptions::default());
    assert!(errors(&missing)[0].message.starts_with("cannot read:"));
}
