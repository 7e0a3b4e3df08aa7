//! DestinationRule analyzers:
//!
//! - IST0174 UnknownDestinationRuleHost: `spec.host` resolves to no service in the mesh.
//! - IST0173 DestinationRuleSubsetNotSelectPods: a subset whose labels (merged with a
//!   ServiceEntry's workloadSelector) select no pod or Trellis Workload. As in Istio, pods in
//!   any namespace count.

use super::{AnalyzeOptions, Context, Message, codes, ns_of};
use crate::resource::Spec;

pub(super) fn analyze(ctx: &Context<'_>, opts: &AnalyzeOptions, out: &mut Vec<Message>) {
    for r in &ctx.resources {
        let Spec::DestinationRule(dr) = &r.spec else {
            continue;
        };
        if dr.host.is_empty() {
            continue;
        }
        let ns = ns_of(r, &opts.default_namespace);
        // Seen from the DR's namespace and from the namespaces it is exported to.
        let mut viewers: Vec<&str> = vec![ns];
        viewers.extend(
            dr.export_to
                .iter()
                .map(String::as_str)
                .filter(|e| !matches!(*e, "." | "*" | "~")),
        );
        let Some(svc) = ctx.registry.lookup_from(&dr.host, ns, &viewers) else {
            out.push(Message::at(
                codes::UNKNOWN_DESTINATION_RULE_HOST,
                r,
                "spec.host",
                format!(
                    "The host {} defined in the DestinationRule does not match any services in the mesh.",
                    dr.host
                ),
            ));
            continue;
        };
        for (i, subset) in dr.subsets.iter().enumerate() {
            let mut selector = svc.selector.clone();
            selector.extend(subset.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            if ctx.registry.pods_selected(&selector).next().is_none() {
                out.push(Message::at(
                    codes::DESTINATION_RULE_SUBSET_NOT_SELECT_PODS,
                    r,
                    &format!("spec.subsets[{i}].name"),
                    format!(
                        "The Subset {} defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
                        subset.name
                    ),
                ));
            }
        }
    }
}
