//! Telemetry validation.

use super::*;

pub(super) fn telemetry(v: &mut V, s: &Telemetry) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    for (i, t) in s.tracing.iter().enumerate() {
        let p = format!("spec.tracing[{i}]");
        if let Some(pc) = t.random_sampling_percentage {
            if !(0.0..=100.0).contains(&pc) {
                v.err(
                    format!("{p}.randomSamplingPercentage"),
                    format!("{pc} must be in 0..100"),
                );
            }
        }
        for (name, tag) in &t.custom_tags {
            let tp = join_key(&format!("{p}.customTags"), name);
            let kinds = usize::from(tag.literal.is_some())
                + usize::from(tag.environment.is_some())
                + usize::from(tag.header.is_some())
                + usize::from(tag.formatter.is_some());
            if kinds != 1 {
                v.err(
                    tp,
                    "a custom tag needs exactly one of literal, environment, header or formatter",
                );
            }
        }
    }
    for (i, m) in s.metrics.iter().enumerate() {
        let p = format!("spec.metrics[{i}]");
        duration(
            v,
            &format!("{p}.reportingInterval"),
            m.reporting_interval.as_ref(),
        );
        for (j, o) in m.overrides.iter().enumerate() {
            let op = format!("{p}.overrides[{j}]");
            if let Some(sel) = &o.selector {
                if sel.metric.is_some() && sel.custom_metric.is_some() {
                    v.err(
                        format!("{op}.match"),
                        "only one of metric or customMetric may be set",
                    );
                }
            }
            for (tag, ov) in &o.tag_overrides {
                let tp = join_key(&format!("{op}.tagOverrides"), tag);
                match ov.operation {
                    TagOperation::Upsert if ov.value.as_deref().unwrap_or_default().is_empty() => {
                        v.err(tp, "value must be set when operation is UPSERT");
                    }
                    TagOperation::Remove if ov.value.is_some() => {
                        v.err(tp, "value must not be set when operation is REMOVE");
                    }
                    _ => {}
                }
            }
        }
    }
}
