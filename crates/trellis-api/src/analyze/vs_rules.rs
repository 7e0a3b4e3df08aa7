//! IST0130 VirtualServiceUnreachableRule and IST0131 VirtualServiceIneffectiveMatch: rules
//! that can never be reached and matches that an earlier rule already takes, found the way
//! Istio's validation finds them (first match wins).
//!
//! - A rule without `match` catches everything: a later rule without `match` is
//!   unreachable ("only the last rule can have no matches"), and so is a later rule with
//!   matches ("route without matches defined before").
//! - A match equal to an earlier one (ignoring its `name`) is ineffective (IST0131); a rule
//!   whose matches all are is unreachable ("all matches used by prior rules").
//! - HTTP only: a URI prefix match covered by an earlier, shorter prefix with otherwise the
//!   same conditions (a missing method counts as GET) is ineffective.

use std::collections::HashMap;
use std::fmt::Debug;

use super::{Context, Message, codes};
use crate::common::StringMatch;
use crate::networking::{HttpMatchRequest, HttpRoute};
use crate::resource::{Resource, Spec};

pub(super) fn analyze(ctx: &Context<'_>, out: &mut Vec<Message>) {
    for r in &ctx.resources {
        let Spec::VirtualService(vs) = &r.spec else {
            continue;
        };
        let http: Vec<Rule> = vs
            .http
            .iter()
            .enumerate()
            .map(|(i, h)| Rule {
                name: route_name(h.name.as_deref(), i),
                path: format!("spec.http[{i}]"),
                matches: h
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (match_name(m.name.as_deref(), j), match_key(m)))
                    .collect(),
            })
            .collect();
        unreachable_rules(r, "match", &http, out);
        prefix_overlaps(r, &vs.http, out);

        let tcp: Vec<Rule> = vs
            .tcp
            .iter()
            .enumerate()
            .map(|(i, t)| Rule::l4(format!("spec.tcp[{i}]"), i, &t.matches))
            .collect();
        unreachable_rules(r, "match", &tcp, out);
        let tls: Vec<Rule> = vs
            .tls
            .iter()
            .enumerate()
            .map(|(i, t)| Rule::l4(format!("spec.tls[{i}]"), i, &t.matches))
            .collect();
        unreachable_rules(r, "match", &tls, out);
    }
}

/// A route reduced to what the analysis needs.
struct Rule {
    /// `"name"` or `#index`.
    name: String,
    path: String,
    /// (match name, canonical form without the name).
    matches: Vec<(String, String)>,
}

impl Rule {
    fn l4<M: Debug>(path: String, i: usize, matches: &[M]) -> Rule {
        Rule {
            name: format!("#{i}"),
            path,
            matches: matches
                .iter()
                .enumerate()
                .map(|(j, m)| (format!("#{j}"), format!("{m:?}")))
                .collect(),
        }
    }
}

fn route_name(name: Option<&str>, i: usize) -> String {
    match name {
        Some(n) if !n.is_empty() => format!("{n:?}"),
        _ => format!("#{i}"),
    }
}

fn match_name(name: Option<&str>, j: usize) -> String {
    route_name(name, j)
}

/// A match's canonical form, ignoring its name (two matches that differ only in name are
/// the same match).
fn match_key(m: &HttpMatchRequest) -> String {
    let mut m = m.clone();
    m.name = None;
    format!("{m:?}")
}

fn unreachable(r: &Resource, rule: &Rule, reason: &str) -> Message {
    Message::at(
        codes::VIRTUAL_SERVICE_UNREACHABLE_RULE,
        r,
        &rule.path,
        format!("VirtualService rule {} not used ({reason}).", rule.name),
    )
}

fn unreachable_rules(r: &Resource, match_field: &str, rules: &[Rule], out: &mut Vec<Message>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut catch_all = false;
    for (i, rule) in rules.iter().enumerate() {
        if rule.matches.is_empty() {
            if catch_all {
                out.push(unreachable(
                    r,
                    rule,
                    "only the last rule can have no matches",
                ));
            }
            catch_all = true;
            continue;
        }
        if catch_all {
            out.push(unreachable(r, rule, "route without matches defined before"));
        }
        let mut dups = 0;
        for (j, (mname, key)) in rule.matches.iter().enumerate() {
            match seen.get(key.as_str()) {
                Some(&first) => {
                    dups += 1;
                    out.push(Message::at(
                        codes::VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
                        r,
                        &format!("{}.{match_field}[{j}]", rule.path),
                        format!(
                            "VirtualService rule {} match {mname} is not used (duplicate/overlapping match in rule {}).",
                            rule.name, rules[first].name
                        ),
                    ));
                }
                None => {
                    seen.insert(key, i);
                }
            }
        }
        if dups == rule.matches.len() {
            out.push(unreachable(r, rule, "all matches used by prior rules"));
        }
    }
}

/// The URI prefix of a match, when it is a prefix match.
fn uri_prefix(m: &HttpMatchRequest) -> Option<&str> {
    m.uri.as_ref().and_then(|u| match u {
        StringMatch {
            prefix: Some(p),
            exact: None,
            regex: None,
        } => Some(p.as_str()),
        _ => None,
    })
}

/// Everything but the name and URI, with a missing method read as GET.
fn conditions_key(m: &HttpMatchRequest) -> String {
    let mut m = m.clone();
    m.name = None;
    m.uri = None;
    if m.method.is_none() {
        m.method = Some(StringMatch {
            exact: Some("GET".to_string()),
            prefix: None,
            regex: None,
        });
    }
    format!("{m:?}")
}

fn prefix_overlaps(r: &Resource, routes: &[HttpRoute], out: &mut Vec<Message>) {
    for (i, later) in routes.iter().enumerate() {
        for (j, m) in later.matches.iter().enumerate() {
            let Some(p) = uri_prefix(m) else { continue };
            let cond = conditions_key(m);
            let earlier = routes[..i].iter().enumerate().find_map(|(ei, e)| {
                e.matches.iter().enumerate().find_map(|(ej, em)| {
                    let ep = uri_prefix(em)?;
                    (ep != p && p.starts_with(ep) && conditions_key(em) == cond)
                        .then_some((ei, e, ej, em, ep))
                })
            });
            if let Some((ei, e, ej, em, ep)) = earlier {
                out.push(Message::at(
                    codes::VIRTUAL_SERVICE_INEFFECTIVE_MATCH,
                    r,
                    &format!("spec.http[{i}].match[{j}]"),
                    format!(
                        "VirtualService rule {} match {} of prefix {p} is not used (duplicate/overlapping match in rule {} of prefix {ep} on {}).",
                        route_name(later.name.as_deref(), i),
                        match_name(m.name.as_deref(), j),
                        match_name(em.name.as_deref(), ej),
                        route_name(e.name.as_deref(), ei),
                    ),
                ));
            }
        }
    }
}
