//! Trellis configuration model: Istio's configuration kinds, Kubernetes `Service` and
//! `Namespace`, and Trellis's own `Workload`. Parses multi-document YAML and JSON with
//! errors that name the file, line, column and field path; validates with Istio's
//! semantics; and runs cross-resource analyzers with `istioctl analyze`'s message codes.
//!
//! No I/O beyond reading the text (and files) it is given.

pub mod de;
pub mod yaml;
