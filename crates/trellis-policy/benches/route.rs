//! Route matching cost: a request that matches the last of N rules (N = 1, 100, 1000),
//! with uri-prefix and header conditions as generated tables have them, and a table of
//! regex rules (which the uri index cannot narrow down).
//!
//! `cargo bench -p trellis-policy --bench route`

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use trellis_api::common::StringMatch;
use trellis_api::networking::{Destination, HttpMatchRequest, HttpRoute, HttpRouteDestination};
use trellis_policy::route::{RouteTable, SimpleRequest};

fn table(n: usize, regex: bool) -> RouteTable<String> {
    let http: Vec<HttpRoute> = (0..n)
        .map(|i| HttpRoute {
            matches: vec![HttpMatchRequest {
                uri: Some(if regex {
                    StringMatch {
                        regex: Some(format!("/r{i}/.*")),
                        ..StringMatch::default()
                    }
                } else {
                    StringMatch {
                        prefix: Some(format!("/r{i}/")),
                        ..StringMatch::default()
                    }
                }),
                headers: [(
                    "x-tenant".to_string(),
                    StringMatch {
                        exact: Some(format!("t{i}")),
                        ..StringMatch::default()
                    },
                )]
                .into(),
                ..HttpMatchRequest::default()
            }],
            route: vec![HttpRouteDestination {
                destination: Destination {
                    host: format!("d{i}"),
                    ..Destination::default()
                },
                ..HttpRouteDestination::default()
            }],
            ..HttpRoute::default()
        })
        .collect();
    RouteTable::compile(&http, |d, _| Ok(d.host.clone())).expect("compiles")
}

fn bench(c: &mut Criterion) {
    for n in [1usize, 100, 1000] {
        let t = table(n, false);
        let req = SimpleRequest::get("api", &format!("/r{}/items", n - 1))
            .header("x-tenant", &format!("t{}", n - 1));
        c.bench_function(&format!("match last of {n} prefix rules"), |b| {
            b.iter(|| black_box(t.first_match(black_box(&req)).map(|m| m.route.index)))
        });
    }
    let t = table(100, true);
    let req = SimpleRequest::get("api", "/r99/items").header("x-tenant", "t99");
    c.bench_function("match last of 100 regex rules", |b| {
        b.iter(|| black_box(t.first_match(black_box(&req)).map(|m| m.route.index)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
