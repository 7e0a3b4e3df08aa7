//! Route matching with Istio's semantics, on VirtualServices written as Istio YAML.

use std::time::{Duration, Instant};

use trellis_api::{LoadOptions, Spec, parse_text};
use trellis_policy::route::{RouteError, RouteTable, SimpleRequest};

/// Compiles the `http[]` of the one VirtualService in `yaml`; destinations become
/// `host/subset` strings.
fn table(yaml: &str) -> RouteTable<String> {
    try_table(yaml).expect("routes compile")
}

fn try_table(yaml: &str) -> Result<RouteTable<String>, RouteError> {
    let parsed = parse_text(yaml, "vs.yaml", &LoadOptions::default());
    let r = parsed[0]
        .resource()
        .unwrap_or_else(|| panic!("valid VirtualService: {:?}", parsed[0].diagnostics));
    let Spec::VirtualService(vs) = &r.spec else {
        panic!("not a VirtualService")
    };
    RouteTable::compile(&vs.http, |d, _| {
        Ok(format!("{}/{}", d.host, d.subset.as_deref().unwrap_or("-")))
    })
}

/// Where `req` goes: the chosen destination for `roll`, and the rule name.
fn route(t: &RouteTable<String>, req: &SimpleRequest, roll: u32) -> Option<(String, String)> {
    let m = t.first_match(req)?;
    Some((m.route.pick(roll)?.clone(), m.route.name.clone()))
}

const BOOKINFO_REVIEWS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
"#;

#[test]
fn jason_goes_to_v2_everyone_else_is_split_50_50() {
    let t = table(BOOKINFO_REVIEWS);
    let jason = SimpleRequest::get("reviews:9080", "/reviews/0").header("end-user", "jason");
    assert_eq!(
        route(&t, &jason, 7),
        Some(("reviews/v2".into(), "jason".into()))
    );
    let other = SimpleRequest::get("reviews:9080", "/reviews/0").header("end-user", "mike");
    // Rolls spread over the range split evenly between v1 and v3.
    let (mut v1, mut v3) = (0, 0);
    for i in 0..2000u32 {
        match route(&t, &other, i.wrapping_mul(2_654_435_761))
            .map(|(d, _)| d)
            .as_deref()
        {
            Some("reviews/v1") => v1 += 1,
            Some("reviews/v3") => v3 += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((900..=1100).contains(&v1), "v1 {v1} v3 {v3}");
    assert_eq!(v1 + v3, 2000);
    assert_eq!(route(&t, &other, 0).map(|(_, n)| n).as_deref(), Some("#1"));
}

const MANY: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api]
  http:
  - name: exact-login
    match: [{uri: {exact: /login}}]
    route: [{destination: {host: login}}]
  - name: static-any-case
    match: [{uri: {prefix: /Static/}, ignoreUriCase: true}]
    route: [{destination: {host: static}}]
  - name: versioned-api
    match: [{uri: {regex: "/api/v[0-9]+/.*"}, method: {exact: POST}}]
    route: [{destination: {host: api-writes}}]
  - name: canary-cookie
    match:
    - headers:
        cookie: {regex: ".*canary=yes.*"}
    - queryParams:
        canary: {exact: "yes"}
    route: [{destination: {host: api, subset: canary}}]
  - name: debug-header-present
    match:
    - headers: {x-debug: {}}
      withoutHeaders: {x-debug-off: {exact: "1"}}
    route: [{destination: {host: debug}}]
  - name: from-frontend-on-8080
    match: [{port: 8080, sourceLabels: {app: frontend}, sourceNamespace: shop}]
    route: [{destination: {host: internal}}]
  - name: authority-and-scheme
    match: [{authority: {prefix: "admin."}, scheme: {exact: https}}]
    route: [{destination: {host: admin}}]
  - name: fallback
    route: [{destination: {host: api, subset: stable}}]
"#;

#[test]
fn every_match_condition() {
    let t = table(MANY);
    let to = |req: SimpleRequest| route(&t, &req, 0).map(|(d, n)| format!("{d} {n}"));
    let get = |p: &str| SimpleRequest::get("api", p);

    assert_eq!(to(get("/login")).as_deref(), Some("login/- exact-login"));
    assert_eq!(
        to(get("/login/again")).as_deref(),
        Some("api/stable fallback"),
        "exact is exact"
    );
    assert_eq!(
        to(get("/STATIC/app.js")).as_deref(),
        Some("static/- static-any-case")
    );
    assert_eq!(
        to(get("/static/app.js")).as_deref(),
        Some("static/- static-any-case")
    );
    assert_eq!(to(get("/Stat")).as_deref(), Some("api/stable fallback"));

    let mut post = get("/api/v2/items");
    post.method = "POST".into();
    assert_eq!(
        to(post.clone()).as_deref(),
        Some("api-writes/- versioned-api")
    );
    assert_eq!(
        to(get("/api/v2/items")).as_deref(),
        Some("api/stable fallback"),
        "method must match too"
    );
    post.path = "/api/vx/items".into();
    assert_eq!(
        to(post).as_deref(),
        Some("api/stable fallback"),
        "regex is anchored"
    );

    assert_eq!(
        to(get("/x").header("Cookie", "a=1; canary=yes; b=2")).as_deref(),
        Some("api/canary canary-cookie")
    );
    assert_eq!(
        to(get("/x?a=1&canary=yes")).as_deref(),
        Some("api/canary canary-cookie"),
        "entries are ORed"
    );
    assert_eq!(
        to(get("/x?canary=no")).as_deref(),
        Some("api/stable fallback")
    );

    assert_eq!(
        to(get("/x").header("x-debug", "")).as_deref(),
        Some("debug/- debug-header-present")
    );
    assert_eq!(
        to(get("/x").header("x-debug", "1").header("x-debug-off", "1")).as_deref(),
        Some("api/stable fallback"),
        "withoutHeaders vetoes"
    );
    assert_eq!(
        to(get("/x").header("x-debug", "1").header("x-debug-off", "0")).as_deref(),
        Some("debug/- debug-header-present")
    );

    let mut internal = get("/x");
    internal.port = Some(8080);
    internal
        .source_labels
        .insert("app".into(), "frontend".into());
    internal.source_labels.insert("version".into(), "v1".into());
    internal.source_namespace = "shop".into();
    assert_eq!(
        to(internal.clone()).as_deref(),
        Some("internal/- from-frontend-on-8080")
    );
    internal.source_namespace = "other".into();
    assert_eq!(to(internal.clone()).as_deref(), Some("api/stable fallback"));
    internal.source_namespace = "shop".into();
    internal.port = Some(9090);
    assert_eq!(to(internal).as_deref(), Some("api/stable fallback"));

    let mut admin = SimpleRequest::get("admin.example.com", "/");
    admin.scheme = "https".into();
    assert_eq!(
        to(admin.clone()).as_deref(),
        Some("admin/- authority-and-scheme")
    );
    admin.scheme = "http".into();
    assert_eq!(to(admin).as_deref(), Some("api/stable fallback"));
}

#[test]
fn no_rule_matches_when_there_is_no_catch_all() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: a}}]\n",
    );
    assert!(t.first_match(&SimpleRequest::get("a", "/b")).is_none());
    assert!(t.first_match(&SimpleRequest::get("a", "/a/b")).is_some());
}

#[test]
fn a_catastrophic_regex_cannot_stall_matching() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - match: [{uri: {regex: \"(a+)+$\"}}]\n    route: [{destination: {host: a}}]\n  - route: [{destination: {host: b}}]\n",
    );
    let evil = format!("{}!", "a".repeat(50_000));
    let req = SimpleRequest::get("a", &evil);
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(route(&t, &req, 0).map(|(d, _)| d).as_deref(), Some("b/-"));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn route_table_errors_name_the_field() {
    // A destination the caller cannot resolve is reported with its path.
    let parsed = parse_text(BOOKINFO_REVIEWS, "vs.yaml", &LoadOptions::default());
    let Some(Spec::VirtualService(vs)) = parsed[0].resource().map(|r| &r.spec) else {
        panic!("vs")
    };
    let e = RouteTable::<String>::compile(&vs.http, |d, path| {
        if d.subset.as_deref() == Some("v3") {
            Err(RouteError {
                path: path.to_string(),
                reason: "no subset v3 in the DestinationRule".into(),
            })
        } else {
            Ok(d.host.clone())
        }
    })
    .expect_err("missing subset");
    assert_eq!(
        e.to_string(),
        "http[1].route[1].destination: no subset v3 in the DestinationRule"
    );
}

#[test]
fn http_requests_are_matched_directly() {
    use std::collections::BTreeMap;
    use trellis_policy::route::HttpRequestView;
    let t = table(BOOKINFO_REVIEWS);
    let req = http::Request::builder()
        .uri("/reviews/1")
        .header("host", "reviews:9080")
        .header("End-User", "jason")
        .body(())
        .expect("request");
    let labels = BTreeMap::new();
    let view = HttpRequestView {
        req: &req,
        port: Some(9080),
        source_labels: &labels,
        source_namespace: "default",
        gateway: "mesh",
    };
    let m = t.first_match(&view).expect("match");
    assert_eq!(m.route.name, "jason");
    assert_eq!(m.route.pick(0).map(String::as_str), Some("reviews/v2"));
}

#[test]
fn the_uri_index_never_changes_which_rule_matches() {
    use trellis_api::common::StringMatch;
    use trellis_api::networking::{Destination, HttpMatchRequest, HttpRoute, HttpRouteDestination};
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let paths = [
        "/",
        "/a",
        "/a/b",
        "/ab",
        "/api/v1/x",
        "/API/v1",
        "/b",
        "/static/app.js",
        "/a/b/c",
    ];
    let sm = |kind: u64, lit: &str| match kind {
        0 => StringMatch {
            exact: Some(lit.into()),
            ..StringMatch::default()
        },
        1 => StringMatch {
            prefix: Some(lit.into()),
            ..StringMatch::default()
        },
        _ => StringMatch {
            regex: Some(format!("{}.*", regex_escape(lit))),
            ..StringMatch::default()
        },
    };
    for round in 0..50 {
        let n = 16 + rnd(40) as usize;
        let http: Vec<HttpRoute> = (0..n)
            .map(|i| {
                let entries = rnd(3) as usize; // 0: catch-all rule
                HttpRoute {
                    matches: (0..entries)
                        .map(|_| {
                            let lit = paths[rnd(paths.len() as u64) as usize];
                            let mut m = HttpMatchRequest {
                                uri: (rnd(5) > 0).then(|| sm(rnd(3), lit)),
                                ignore_uri_case: (rnd(6) == 0).then_some(true),
                                ..HttpMatchRequest::default()
                            };
                            if rnd(4) == 0 {
                                m.method = Some(StringMatch {
                                    exact: Some("POST".into()),
                                    ..StringMatch::default()
                                });
                            }
                            m
                        })
                        .collect(),
                    route: vec![HttpRouteDestination {
                        destination: Destination {
                            host: format!("d{i}"),
                            ..Destination::default()
                        },
                        ..HttpRouteDestination::default()
                    }],
                    ..HttpRoute::default()
                }
            })
            .collect();
        let t = RouteTable::compile(&http, |d, _| Ok(d.host.clone())).expect("compile");
        for p in paths {
            for method in ["GET", "POST"] {
                let mut req = SimpleRequest::get("a", p);
                req.method = method.into();
                let indexed = t.first_match(&req).map(|m| m.route.index);
                let linear = t.routes().iter().find(|r| r.matches(&req)).map(|r| r.index);
                assert_eq!(indexed, linear, "round {round}, {method} {p}");
            }
        }
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '/' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}
