//! Authorization cost: a request judged against 100 policies (50 DENY that do not match,
//! then 50 ALLOW of which only the last matches: the longest path through the engine),
//! each rule with a principal, a method, a path pattern and a header condition, as
//! generated policies have them; and against one (matching ALLOW) policy, for comparison.
//!
//! `cargo bench -p trellis-policy --bench authz`

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use trellis_api::security::{
    AuthorizationAction, AuthorizationPolicy, Condition, Operation, Rule, RuleFrom, RuleTo, Source,
};
use trellis_policy::authz::{Decision, Http, Policies, Request, compile_api};

fn policy(i: usize, action: AuthorizationAction) -> AuthorizationPolicy {
    AuthorizationPolicy {
        action,
        rules: vec![Rule {
            from: vec![RuleFrom {
                source: Some(Source {
                    principals: vec![format!("cluster.local/ns/ns{i}/sa/client")],
                    ..Source::default()
                }),
            }],
            to: vec![RuleTo {
                operation: Some(Operation {
                    methods: vec!["GET".into()],
                    paths: vec![format!("/api/v{i}/*")],
                    ..Operation::default()
                }),
            }],
            when: vec![Condition {
                key: "request.headers[x-tenant]".into(),
                values: vec![format!("t{i}")],
                not_values: vec![],
            }],
        }],
        ..AuthorizationPolicy::default()
    }
}

fn policies(n: usize) -> Policies {
    let list = (0..n)
        .map(|i| {
            let action = if i < n / 2 {
                AuthorizationAction::Deny
            } else {
                AuthorizationAction::Allow
            };
            compile_api(&format!("shop/p{i}"), &policy(i, action)).expect("compiles")
        })
        .collect();
    Policies::new(list)
}

fn bench(c: &mut Criterion) {
    for n in [1usize, 100] {
        let p = policies(n);
        let last = n - 1;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-tenant",
            http::HeaderValue::from_str(&format!("t{last}")).expect("value"),
        );
        let principal = format!("cluster.local/ns/ns{last}/sa/client");
        let path = format!("/api/v{last}/items");
        let r = Request {
            principal: Some(&principal),
            source_ip: Some("10.1.2.3".parse().expect("ip")),
            remote_ip: Some("10.1.2.3".parse().expect("ip")),
            destination_port: Some(9080),
            http: Some(Http {
                method: "GET",
                path: &path,
                host: "reviews.shop.svc.cluster.local",
                headers: Some(&headers),
                request_principal: None,
            }),
            ..Request::default()
        };
        // Allowed by the last ALLOW policy, every DENY having been tried first.
        assert_eq!(p.evaluate(&r).0, Decision::Allow, "the intended path");
        c.bench_function(&format!("authorize, {n} policies"), |b| {
            b.iter(|| black_box(p.evaluate(black_box(&r))))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
