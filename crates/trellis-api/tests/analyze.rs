//! `trellis analyze`: every message code has an input that triggers it and a near-miss
//! that must not, in the style of Istio's Bookinfo sample.

use std::sync::Arc;

use trellis_api::analyze::{AnalyzeOptions, Message, analyze, output};
use trellis_api::resource::{Diagnostic, Location};
use trellis_api::yaml::Mark;
use trellis_api::{Level, LoadOptions, ObjectRef, Parsed, parse_text};

const FILE: &str = "mesh.yaml";

/// Services, Deployments (and one Trellis Workload), the ingress gateway pods, a Gateway,
/// VirtualServices and DestinationRules: a clean Bookinfo.
const BOOKINFO: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: productpage
spec:
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata:
  name: ratings
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: productpage-v1
spec:
  template:
    metadata:
      labels: {app: productpage, version: v1}
    spec:
      containers: [{name: productpage, image: productpage, ports: [{containerPort: 9080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v1
spec:
  template:
    metadata:
      labels: {app: reviews, version: v1}
    spec:
      containers: [{name: reviews, image: reviews}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v2
spec:
  template:
    metadata:
      labels: {app: reviews, version: v2}
    spec:
      containers: [{name: reviews, image: reviews}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: ratings-v1
  labels: {app: ratings, version: v1}
spec:
  command: ["python3", "-m", "http.server", "9080"]
  ports: [{name: http, port: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: istio-ingressgateway
  namespace: istio-system
spec:
  template:
    metadata:
      labels: {istio: ingressgateway}
    spec:
      containers: [{name: istio-proxy, image: proxyv2}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["bookinfo.example.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts: ["bookinfo.example.com"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /static}
    route:
    - destination: {host: productpage, port: {number: 9080}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings.default.svc.cluster.local, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: productpage
spec:
  host: productpage.default.svc.cluster.local
  subsets:
  - name: v1
    labels: {version: v1}
"#;

fn parse(yaml: &str) -> Vec<Parsed> {
    parse_text(yaml, FILE, &LoadOptions::default())
}

fn run(yaml: &str) -> Vec<Message> {
    analyze(&parse(yaml), &AnalyzeOptions::default())
}

/// Bookinfo plus `extra` documents.
fn with_bookinfo(extra: &str) -> String {
    format!("{BOOKINFO}---\n{extra}")
}

fn with_code<'m>(msgs: &'m [Message], code: &str) -> Vec<&'m Message> {
    msgs.iter().filter(|m| m.code == code).collect()
}

/// The 1-based line of the only line of `text` that contains `needle` (after line
/// `after`, to tell apart documents that repeat a line).
fn line_after(text: &str, needle: &str, after: usize) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(i, l)| *i + 1 > after && l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} after line {after}: {hits:?}");
    hits[0]
}

/// The 1-based line of the first line after line `after` that is exactly `line`.
fn first_exact_after(text: &str, line: &str, after: usize) -> usize {
    text.lines()
        .enumerate()
        .find(|(i, l)| *i + 1 > after && *l == line)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("{line:?} after line {after}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    line_after(text, needle, 0)
}

fn obj(kind: &str, ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: kind.to_string(),
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// Asserts exactly one message with `code`, and its level, text, object and line.
#[track_caller]
fn assert_one(
    msgs: &[Message],
    code: &str,
    level: Level,
    text: &str,
    object: ObjectRef,
    line: usize,
) {
    let hits = with_code(msgs, code);
    assert_eq!(hits.len(), 1, "{code}: {msgs:#?}");
    let m = hits[0];
    assert_eq!(m.level, level);
    assert_eq!(m.text, text);
    assert_eq!(m.object.as_ref(), Some(&object));
    let loc = m.location.as_ref().expect("location");
    assert_eq!(&*loc.file, FILE);
    assert_eq!(loc.mark.line, line, "{m}");
}

fn problems(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.level != Level::Info)
        .map(|m| m.to_string())
        .collect()
}

#[test]
fn clean_bookinfo_has_no_errors_or_warnings() {
    let msgs = run(BOOKINFO);
    assert_eq!(problems(&msgs), Vec::<String>::new());
    assert!(msgs.is_empty(), "{msgs:#?}");
}

// ---------------------------------------------------------------------------------------
// IST0101 ReferencedResourceNotFound
// ---------------------------------------------------------------------------------------

const VS_GATEWAY_TYPO: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo-typo
spec:
  hosts: ["bookinfo.example.com"]
  gateways:
  - bookinfo-gatway
  http:
  - route:
    - destination: {host: productpage}
"#;

#[test]
fn ist0101_gateway_not_found() {
    let input = with_bookinfo(VS_GATEWAY_TYPO);
    let msgs = run(&input);
    let line = line_of(&input, "- bookinfo-gatway");
    assert_one(
        &msgs,
        "IST0101",
        Level::Error,
        r#"Referenced gateway not found: "bookinfo-gatway""#,
        obj("VirtualService", "default", "bookinfo-typo"),
        line,
    );
    assert_eq!(
        msgs[0].to_string(),
        format!(
            r#"Error [IST0101] (VirtualService default/bookinfo-typo {FILE}:{line}) Referenced gateway not found: "bookinfo-gatway""#
        )
    );
    // A missing gateway has no hosts either (as in istioctl).
    assert_eq!(with_code(&msgs, "IST0132").len(), 1);
}

#[test]
fn ist0101_gateway_near_miss_namespace_qualified_ref_and_mesh() {
    let input = with_bookinfo(
        &VS_GATEWAY_TYPO.replace("- bookinfo-gatway", "- default/bookinfo-gateway\n  - mesh"),
    );
    let msgs = run(&input);
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

const VS_BAD_HOSTS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-extra
spec:
  hosts: [reviews.example.com]
  http:
  - route:
    - destination:
        host: reviewz
    mirror:
      host: reviews-shadow
  - route:
    - destination:
        host: reviews
    mirrors:
    - destination:
        host: reviews-mirror2
  tcp:
  - route:
    - destination:
        host: mongodb
  tls:
  - match:
    - sniHosts: [reviews.example.com]
    route:
    - destination:
        host: tls-backend
"#;

#[test]
fn ist0101_destination_hosts_not_found() {
    let input = with_bookinfo(VS_BAD_HOSTS);
    let msgs = run(&input);
    let got: Vec<(String, usize)> = with_code(&msgs, "IST0101")
        .iter()
        .map(|m| {
            assert_eq!(m.level, Level::Error);
            assert_eq!(
                m.object,
                Some(obj("VirtualService", "default", "reviews-extra"))
            );
            (
                m.text.clone(),
                m.location.as_ref().map(|l| l.mark.line).unwrap_or(0),
            )
        })
        .collect();
    let want = vec![
        (
            r#"Referenced host not found: "reviewz""#.to_string(),
            line_of(&input, "host: reviewz"),
        ),
        (
            r#"Referenced mirror host not found: "reviews-shadow""#.to_string(),
            line_of(&input, "host: reviews-shadow"),
        ),
        (
            r#"Referenced mirror host not found: "reviews-mirror2""#.to_string(),
            line_of(&input, "host: reviews-mirror2"),
        ),
        (
            r#"Referenced host not found: "mongodb""#.to_string(),
            line_of(&input, "host: mongodb"),
        ),
        (
            r#"Referenced host not found: "tls-backend""#.to_string(),
            line_of(&input, "host: tls-backend"),
        ),
    ];
    assert_eq!(got, want);
}

#[test]
fn ist0101_destination_host_near_miss_kube_dns_forms_and_service_entries() {
    // `reviews.default` and `reviews.default.svc` resolve as Kubernetes DNS does (Trellis
    // deliberately differs from istioctl here); FQDNs resolve verbatim; wildcard
    // ServiceEntry hosts match by suffix.
    let extra = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external
spec:
  hosts: ["*.googleapis.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-forms
spec:
  hosts: [reviews.example.com]
  http:
  - route:
    - destination: {host: reviews.default}
      weight: 50
    - destination: {host: reviews.default.svc}
      weight: 50
    mirror: {host: reviews.default.svc.cluster.local}
  tls:
  - match:
    - sniHosts: [reviews.example.com]
    route:
    - destination: {host: storage.googleapis.com}
"#;
    let msgs = run(&with_bookinfo(extra));
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

#[test]
fn ist0101_service_entry_export_to_limits_visibility() {
    let extra = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: private-api
  namespace: payments
spec:
  hosts: [api.payments.example.com]
  exportTo: ["."]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: uses-private-api
spec:
  hosts: [shop.example.com]
  http:
  - route:
    - destination: {host: api.payments.example.com}
"#;
    let input = with_bookinfo(extra);
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0101",
        Level::Error,
        r#"Referenced host not found: "api.payments.example.com""#,
        obj("VirtualService", "default", "uses-private-api"),
        line_of(&input, "- destination: {host: api.payments.example.com}"),
    );
}

const VS_SUBSET_V4: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-canary
spec:
  hosts: [reviews-canary.example.com]
  http:
  - route:
    - destination:
        host: reviews
        subset: v4
    mirror:
      host: reviews
      subset: v9
"#;

#[test]
fn ist0101_host_and_mirror_subset_not_in_destination_rule() {
    let input = with_bookinfo(VS_SUBSET_V4);
    let msgs = run(&input);
    let hits = with_code(&msgs, "IST0101");
    assert_eq!(hits.len(), 2, "{msgs:#?}");
    let host_line = first_exact_after(
        &input,
        "        host: reviews",
        line_of(&input, "name: reviews-canary"),
    );
    assert_eq!(
        hits[0].text,
        r#"Referenced host+subset in destinationrule not found: "reviews+v4""#
    );
    assert_eq!(
        hits[0].location.as_ref().map(|l| l.mark.line),
        Some(host_line)
    );
    assert_eq!(
        hits[0].object,
        Some(obj("VirtualService", "default", "reviews-canary"))
    );
    assert_eq!(
        hits[0].to_string(),
        format!(
            r#"Error [IST0101] (VirtualService default/reviews-canary {FILE}:{host_line}) Referenced host+subset in destinationrule not found: "reviews+v4""#
        )
    );
    assert_eq!(
        hits[1].text,
        r#"Referenced mirror+subset in destinationrule not found: "reviews+v9""#
    );
    assert_eq!(
        hits[1].location.as_ref().map(|l| l.mark.line),
        Some(host_line + 3)
    );
}

#[test]
fn ist0101_subset_near_miss_subset_present_short_name_vs_fqdn() {
    // The VS says `reviews.default.svc.cluster.local`, the DR says `reviews`; `v2` exists.
    let input = with_bookinfo(
        &VS_SUBSET_V4
            .replace(
                "host: reviews\n        subset: v4",
                "host: reviews.default.svc.cluster.local\n        subset: v2",
            )
            .replace("subset: v9", "subset: v1"),
    );
    let msgs = run(&input);
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

const TLS_GATEWAY: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: secure-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["secure.example.com"]
    tls:
      mode: SIMPLE
      credentialName: secure-cert
"#;

fn tls_secret(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\ntype: kubernetes.io/tls\ndata: {{tls.crt: eA==, tls.key: eA==}}\n"
    )
}

#[test]
fn ist0101_credential_name_not_found_when_secrets_are_in_the_input() {
    let input = with_bookinfo(&format!(
        "{TLS_GATEWAY}---\n{}",
        tls_secret("istio-system", "other-cert")
    ));
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0101",
        Level::Error,
        r#"Referenced credentialName not found: "secure-cert""#,
        obj("Gateway", "default", "secure-gateway"),
        line_of(&input, "credentialName: secure-cert"),
    );
}

#[test]
fn ist0101_credential_name_near_misses() {
    // No Secrets in the input at all: credentials are not checked.
    let msgs = run(&with_bookinfo(TLS_GATEWAY));
    assert_eq!(problems(&msgs), Vec::<String>::new());
    // The Secret lives where the gateway pods run (istio-system).
    let input = with_bookinfo(&format!(
        "{TLS_GATEWAY}---\n{}",
        tls_secret("istio-system", "secure-cert")
    ));
    assert_eq!(problems(&run(&input)), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// IST0106 SchemaValidationError, IST0133 SchemaWarning, TRL0001 SkippedKind
// ---------------------------------------------------------------------------------------

#[test]
fn ist0106_schema_error_from_loading() {
    let input = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsetz:
  - name: v1
"#;
    let parsed = parse(input);
    let diag = parsed[0].diagnostics[0].clone();
    assert_eq!(diag.level, Level::Error);
    let msgs = analyze(&parsed, &AnalyzeOptions::default());
    let want = if diag.path.is_empty() {
        format!("Schema validation error: {}", diag.message)
    } else {
        format!("Schema validation error: {}: {}", diag.path, diag.message)
    };
    assert!(want.contains("subsetz"), "{want}");
    assert_one(
        &msgs,
        "IST0106",
        Level::Error,
        &want,
        obj("DestinationRule", "default", "reviews"),
        line_of(input, "subsetz:"),
    );
    // Schema messages show line:col.
    let m = &with_code(&msgs, "IST0106")[0];
    assert_eq!(
        m.to_string(),
        format!(
            "Error [IST0106] (DestinationRule default/reviews {FILE}:{}:{}) {want}",
            diag.location.mark.line, diag.location.mark.col
        )
    );
}

#[test]
fn ist0106_near_miss_valid_document() {
    let input = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n";
    let msgs = run(input);
    assert!(with_code(&msgs, "IST0106").is_empty(), "{msgs:#?}");
    assert!(with_code(&msgs, "IST0133").is_empty(), "{msgs:#?}");
}

#[test]
fn ist0106_without_object_shows_file_line_col() {
    let input = "apiVersion: v1\nkind: [oops\n";
    let msgs = run(input);
    let hits = with_code(&msgs, "IST0106");
    assert_eq!(hits.len(), 1, "{msgs:#?}");
    assert_eq!(hits[0].object, None);
    let loc = hits[0].location.as_ref().expect("location");
    assert_eq!(
        hits[0].to_string(),
        format!(
            "Error [IST0106] ({FILE}:{}:{}) {}",
            loc.mark.line, loc.mark.col, hits[0].text
        )
    );
    assert!(hits[0].text.starts_with("Schema validation error: "));
}

#[test]
fn ist0133_schema_warning_from_a_warning_diagnostic() {
    let object = obj("VirtualService", "default", "reviews");
    let warning = Diagnostic {
        level: Level::Warning,
        location: Location {
            file: Arc::from(FILE),
            mark: Mark { line: 7, col: 5 },
        },
        object: Some(object.clone()),
        path: "spec.http[0].mirrorPercent".to_string(),
        message: "using deprecated setting \"mirrorPercent\", use \"mirrorPercentage\" instead"
            .to_string(),
    };
    let parsed = vec![Parsed {
        document: None,
        object: Some(object.clone()),
        diagnostics: vec![warning],
    }];
    let msgs = analyze(&parsed, &AnalyzeOptions::default());
    assert_one(
        &msgs,
        "IST0133",
        Level::Warning,
        "Schema validation warning: spec.http[0].mirrorPercent: using deprecated setting \"mirrorPercent\", use \"mirrorPercentage\" instead",
        object,
        7,
    );
    assert!(msgs[0].to_string().starts_with(&format!(
        "Warning [IST0133] (VirtualService default/reviews {FILE}:7:5) "
    )));
}

#[test]
fn trl0001_skipped_kind_is_info() {
    let input = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata: {a: b}\n";
    let msgs = run(input);
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    let m = &msgs[0];
    assert_eq!(m.code, "TRL0001");
    assert_eq!(m.name, "SkippedKind");
    assert_eq!(m.level, Level::Info);
    assert_eq!(
        m.text,
        "kind ConfigMap (v1) is not Trellis configuration; skipped"
    );
    assert_eq!(m.object, Some(obj("ConfigMap", "default", "settings")));
    assert_eq!(m.documentation_url(), None);
    // Near-miss: kinds the analyzers read (Deployments, TLS Secrets) are not "skipped".
    let input = format!(
        "{}---\n{}",
        tls_secret("default", "cert"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: a\nspec:\n  template:\n    metadata:\n      labels: {app: a}\n"
    );
    assert!(run(&input).is_empty());
}

// ---------------------------------------------------------------------------------------
// IST0109 ConflictingMeshGatewayVirtualServiceHosts
// ---------------------------------------------------------------------------------------

const REVIEWS_AGAIN: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-again
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
"#;

#[test]
fn ist0109_two_mesh_virtual_services_define_the_same_host() {
    let input = with_bookinfo(REVIEWS_AGAIN);
    let msgs = run(&input);
    let hits = with_code(&msgs, "IST0109");
    assert_eq!(hits.len(), 2, "{msgs:#?}");
    let text = "The VirtualServices default/reviews,default/reviews-again associated with mesh gateway define the same host */reviews.default.svc.cluster.local which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.";
    let reviews_name = first_exact_after(
        &input,
        "  name: reviews",
        first_exact_after(&input, "  name: bookinfo", 0),
    );
    let again_name = line_of(&input, "name: reviews-again");
    let got: Vec<(Level, &str, Option<ObjectRef>, usize)> = hits
        .iter()
        .map(|m| {
            (
                m.level,
                m.text.as_str(),
                m.object.clone(),
                m.location.as_ref().map(|l| l.mark.line).unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                Level::Error,
                text,
                Some(obj("VirtualService", "default", "reviews")),
                reviews_name
            ),
            (
                Level::Error,
                text,
                Some(obj("VirtualService", "default", "reviews-again")),
                again_name
            ),
        ]
    );
}

#[test]
fn ist0109_near_miss_one_bound_only_to_an_ingress_gateway() {
    let input = with_bookinfo(&REVIEWS_AGAIN.replace(
        "  hosts: [reviews.default.svc.cluster.local]\n",
        "  hosts: [reviews.default.svc.cluster.local]\n  gateways: [bookinfo-gateway]\n",
    ));
    let msgs = run(&input);
    assert!(with_code(&msgs, "IST0109").is_empty(), "{msgs:#?}");
}

#[test]
fn ist0109_near_miss_export_to_own_namespaces() {
    let a = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ext\n  namespace: NS\nspec:\n  hosts: [api.example.com]\n  exportTo: [\".\"]\n  http:\n  - route:\n    - destination: {host: api.example.com}\n";
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: api\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: DNS\n";
    let input = format!(
        "{se}---\n{}---\n{}",
        a.replace("NS", "team-a"),
        a.replace("NS", "team-b")
    );
    let msgs = run(&input);
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// IST0130 VirtualServiceUnreachableRule, IST0131 VirtualServiceIneffectiveMatch
// ---------------------------------------------------------------------------------------

const TWO_CATCH_ALLS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-rules
spec:
  hosts: [ratings]
  gateways: [bookinfo-gateway]
  http:
  - route:
    - destination: {host: ratings}
  - route:
    - destination: {host: ratings, subset: v1}
"#;

#[test]
fn ist0130_second_rule_without_matches_is_unreachable() {
    let input = with_bookinfo(TWO_CATCH_ALLS);
    let msgs = run(&input);
    let start = line_of(&input, "name: ratings-rules");
    assert_one(
        &msgs,
        "IST0130",
        Level::Warning,
        "VirtualService rule #1 not used (only the last rule can have no matches).",
        obj("VirtualService", "default", "ratings-rules"),
        first_exact_after(&input, "  - route:", start + 5),
    );
}

#[test]
fn ist0130_near_miss_single_catch_all_last() {
    let input = with_bookinfo(&TWO_CATCH_ALLS.replace(
        "  http:\n  - route:\n    - destination: {host: ratings}\n",
        "  http:\n  - match:\n    - uri: {prefix: /ratings}\n    route:\n    - destination: {host: ratings}\n",
    ));
    let msgs = run(&input);
    assert!(with_code(&msgs, "IST0130").is_empty(), "{msgs:#?}");
    assert!(with_code(&msgs, "IST0131").is_empty(), "{msgs:#?}");
}

const DUPLICATE_MATCH: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-dup
spec:
  hosts: [reviews]
  gateways: [bookinfo-gateway]
  http:
  - name: jason
    match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - name: jason-again
      headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v1}
  - route:
    - destination: {host: reviews, subset: v1}
"#;

#[test]
fn ist0131_duplicate_match_is_ineffective() {
    let input = with_bookinfo(DUPLICATE_MATCH);
    let msgs = run(&input);
    let obj_ref = obj("VirtualService", "default", "reviews-dup");
    assert_one(
        &msgs,
        "IST0131",
        Level::Info,
        r#"VirtualService rule #1 match "jason-again" is not used (duplicate/overlapping match in rule "jason")."#,
        obj_ref.clone(),
        line_of(&input, "- name: jason-again"),
    );
    // Every match of rule #1 is a duplicate, so the rule itself is unreachable too.
    assert_one(
        &msgs,
        "IST0130",
        Level::Warning,
        "VirtualService rule #1 not used (all matches used by prior rules).",
        obj_ref,
        line_of(&input, "- name: jason-again") - 1,
    );
}

#[test]
fn ist0131_near_miss_same_header_name_different_value() {
    let input = with_bookinfo(&DUPLICATE_MATCH.replace(
        "    - name: jason-again\n      headers:\n        end-user: {exact: jason}",
        "    - name: jason-again\n      headers:\n        end-user: {exact: paul}",
    ));
    let msgs = run(&input);
    assert!(with_code(&msgs, "IST0131").is_empty(), "{msgs:#?}");
    assert!(with_code(&msgs, "IST0130").is_empty(), "{msgs:#?}");
}

#[test]
fn ist0131_prefix_covered_by_an_earlier_shorter_prefix() {
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: debug
spec:
  hosts: [productpage]
  http:
  - match:
    - uri: {prefix: /debug}
    route:
    - destination: {host: productpage}
  - match:
    - uri: {prefix: /debugs}
    route:
    - destination: {host: productpage, subset: v1}
"#;
    let input = with_bookinfo(vs);
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0131",
        Level::Info,
        "VirtualService rule #1 match #0 of prefix /debugs is not used (duplicate/overlapping match in rule #0 of prefix /debug on #0).",
        obj("VirtualService", "default", "debug"),
        line_of(&input, "- uri: {prefix: /debugs}"),
    );
    // Near-miss: the longer prefix first.
    let swapped = vs
        .replace("{prefix: /debug}", "{prefix: /TMP}")
        .replace("{prefix: /debugs}", "{prefix: /debug}")
        .replace("{prefix: /TMP}", "{prefix: /debugs}");
    let msgs = run(&with_bookinfo(&swapped));
    assert!(with_code(&msgs, "IST0131").is_empty(), "{msgs:#?}");
}

// ---------------------------------------------------------------------------------------
// IST0132 VirtualServiceHostNotFoundInGateway
// ---------------------------------------------------------------------------------------

const WRONG_HOST: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: testing-service
spec:
  hosts: [wrong.com, also-wrong.com]
  gateways:
  - bookinfo-gateway
  http:
  - route:
    - destination: {host: productpage}
"#;

#[test]
fn ist0132_vs_host_not_on_gateway() {
    let input = with_bookinfo(WRONG_HOST);
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0132",
        Level::Warning,
        "one or more host [wrong.com also-wrong.com] defined in VirtualService default/testing-service not found in Gateway default/bookinfo-gateway.",
        obj("VirtualService", "default", "testing-service"),
        line_of(&input, "  - bookinfo-gateway"),
    );
}

#[test]
fn ist0132_near_miss_wildcard_gateway_host() {
    let gw = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: wildcard-gateway
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 8080, name: http-alt, protocol: HTTP}
    hosts: ["*/*.wrong.com"]
"#;
    let vs = WRONG_HOST
        .replace("[wrong.com, also-wrong.com]", "[shop.wrong.com]")
        .replace("- bookinfo-gateway", "- istio-system/wildcard-gateway");
    let msgs = run(&with_bookinfo(&format!("{gw}---\n{vs}")));
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// IST0145 ConflictingGateways
// ---------------------------------------------------------------------------------------

fn gateway(name: &str, port: u32, host: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: {name}
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {{number: {port}, name: http-{name}, protocol: HTTP}}
    hosts: ["{host}"]
"#
    )
}

#[test]
fn ist0145_same_selector_port_and_host() {
    let input = with_bookinfo(&format!(
        "{}---\n{}",
        gateway("alpha", 8081, "foo.example.com"),
        gateway("beta", 8081, "foo.example.com")
    ));
    let msgs = run(&input);
    let hits = with_code(&msgs, "IST0145");
    assert_eq!(hits.len(), 2, "{msgs:#?}");
    let alpha = hits
        .iter()
        .find(|m| m.object == Some(obj("Gateway", "default", "alpha")))
        .expect("alpha");
    assert_eq!(alpha.level, Level::Error);
    assert_eq!(
        alpha.text,
        "Conflict with gateways default/beta (workload selector istio=ingressgateway, port 8081, hosts foo.example.com)."
    );
    assert_eq!(
        alpha.location.as_ref().map(|l| l.mark.line),
        Some(line_of(&input, "name: http-alpha"))
    );
    let beta = hits
        .iter()
        .find(|m| m.object == Some(obj("Gateway", "default", "beta")))
        .expect("beta");
    assert_eq!(
        beta.text,
        "Conflict with gateways default/alpha (workload selector istio=ingressgateway, port 8081, hosts foo.example.com)."
    );
}

#[test]
fn ist0145_near_miss_same_host_different_ports() {
    let input = with_bookinfo(&format!(
        "{}---\n{}",
        gateway("alpha", 8081, "foo.example.com"),
        gateway("beta", 8082, "foo.example.com")
    ));
    let msgs = run(&input);
    assert!(with_code(&msgs, "IST0145").is_empty(), "{msgs:#?}");
}

// ---------------------------------------------------------------------------------------
// IST0173 DestinationRuleSubsetNotSelectPods, IST0174 UnknownDestinationRuleHost
// ---------------------------------------------------------------------------------------

const DR_V3: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews-v3
spec:
  host: reviews
  subsets:
  - name: v3
    labels: {version: v3}
"#;

#[test]
fn ist0173_subset_selects_no_pods() {
    let input = with_bookinfo(DR_V3);
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0173",
        Level::Error,
        "The Subset v3 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
        obj("DestinationRule", "default", "reviews-v3"),
        line_of(&input, "- name: v3"),
    );
}

#[test]
fn ist0173_near_miss_deployment_pod_template_matches() {
    let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: reviews-v3\nspec:\n  template:\n    metadata:\n      labels: {app: reviews, version: v3}\n    spec:\n      containers: [{name: reviews, image: reviews}]\n";
    let msgs = run(&with_bookinfo(&format!("{deploy}---\n{DR_V3}")));
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

#[test]
fn ist0174_destination_rule_host_unknown() {
    let input = with_bookinfo(&DR_V3.replace("host: reviews", "host: reviewz"));
    let msgs = run(&input);
    assert_one(
        &msgs,
        "IST0174",
        Level::Warning,
        "The host reviewz defined in the DestinationRule does not match any services in the mesh.",
        obj("DestinationRule", "default", "reviews-v3"),
        line_of(&input, "host: reviewz"),
    );
    // The subset check is skipped for an unknown host.
    assert!(with_code(&msgs, "IST0173").is_empty(), "{msgs:#?}");
}

#[test]
fn ist0174_near_miss_host_resolves_via_service_entry() {
    let extra = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: googleapis
spec:
  hosts: ["*.googleapis.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: storage
spec:
  host: storage.googleapis.com
  trafficPolicy:
    tls: {mode: SIMPLE}
"#;
    let msgs = run(&with_bookinfo(extra));
    assert_eq!(problems(&msgs), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Ordering, de-duplication and output
// ---------------------------------------------------------------------------------------

#[test]
fn messages_are_sorted_by_level_then_line_and_deduplicated() {
    let input = with_bookinfo(&format!(
        "{DR_V3}---\n{VS_GATEWAY_TYPO}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n"
    ));
    let msgs = run(&input);
    let levels: Vec<Level> = msgs.iter().map(|m| m.level).collect();
    let mut sorted = levels.clone();
    sorted.sort();
    assert_eq!(levels, sorted);
    let errors: Vec<usize> = msgs
        .iter()
        .filter(|m| m.level == Level::Error)
        .map(|m| m.location.as_ref().map(|l| l.mark.line).unwrap_or(0))
        .collect();
    assert!(errors.windows(2).all(|w| w[0] <= w[1]), "{errors:?}");
    assert_eq!(msgs.last().map(|m| m.code), Some("TRL0001"));
    // Analysing the same documents twice reports each message once.
    let mut twice = parse(&input);
    twice.extend(parse(&input));
    assert_eq!(analyze(&twice, &AnalyzeOptions::default()), msgs);
}

#[test]
fn json_output_round_trips() {
    let input = with_bookinfo(VS_GATEWAY_TYPO);
    let msgs = run(&input);
    let json = output::to_json(&msgs);
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), msgs.len());
    let first = &list[0];
    let line = line_of(&input, "- bookinfo-gatway");
    assert_eq!(
        first,
        &serde_json::json!({
            "code": "IST0101",
            "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0101/",
            "level": "Error",
            "message": "Referenced gateway not found: \"bookinfo-gatway\"",
            "origin": "VirtualService default/bookinfo-typo",
            "reference": format!("{FILE}:{line}"),
        })
    );
    assert_eq!(output::to_json(&[]), "[]");
    // TRL codes have no documentation URL.
    let skipped = run("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n");
    let v: serde_json::Value =
        serde_json::from_str(&output::to_json(&skipped)).expect("valid JSON");
    assert_eq!(v[0]["code"], "TRL0001");
    assert!(v[0].get("documentationUrl").is_none());
}

#[test]
fn yaml_output_quotes_where_needed() {
    let input = with_bookinfo(VS_GATEWAY_TYPO);
    let msgs = run(&input);
    let line = line_of(&input, "- bookinfo-gatway");
    let yaml = output::to_yaml(&msgs[..1]);
    assert_eq!(
        yaml,
        format!(
            "- code: IST0101\n  documentationUrl: https://istio.io/latest/docs/reference/config/analysis/ist0101/\n  level: Error\n  message: \"Referenced gateway not found: \\\"bookinfo-gatway\\\"\"\n  origin: VirtualService default/bookinfo-typo\n  reference: {FILE}:{line}\n"
        )
    );
    assert_eq!(output::to_yaml(&[]), "[]\n");
    // The YAML reads back (with Trellis's own YAML reader) as the same strings.
    let docs = trellis_api::yaml::parse_documents(&output::to_yaml(&msgs));
    assert_eq!(docs.len(), 1);
    let node = docs[0].result.as_ref().expect("valid YAML");
    let items = node.as_seq().expect("a list");
    assert_eq!(items.len(), msgs.len());
    for (item, m) in items.iter().zip(&msgs) {
        assert_eq!(
            item.get("message").and_then(|n| n.as_str()),
            Some(m.text.as_str())
        );
        assert_eq!(item.get("code").and_then(|n| n.as_str()), Some(m.code));
    }
}

#[test]
fn yaml_output_quotes_ambiguous_scalars() {
    let m = Message {
        code: "TRL0001",
        name: "SkippedKind",
        level: Level::Info,
        object: None,
        location: None,
        text: "yes".to_string(),
    };
    assert_eq!(
        output::to_yaml(std::slice::from_ref(&m)),
        "- code: TRL0001\n  level: Info\n  message: \"yes\"\n"
    );
    let m = Message {
        text: "- leading dash #x\nnewline".to_string(),
        ..m
    };
    assert_eq!(
        output::to_yaml(&[m]),
        "- code: TRL0001\n  level: Info\n  message: \"- leading dash #x\\nnewline\"\n"
    );
}
