//! Trellis configuration model: Istio's configuration kinds, Kubernetes `Service` and
//! `Namespace`, and Trellis's own `Workload`. Parses multi-document YAML and JSON with
//! errors that name the file, line, column and field path; validates with Istio's
//! semantics; and runs cross-resource analyzers with `istioctl analyze`'s message codes.
//!
//! No I/O beyond reading the text (and files) it is given.

pub mod analyze;
pub mod common;
pub mod de;
pub mod host;
pub mod kube;
pub mod load;
pub mod mesh;
pub mod networking;
pub mod resource;
pub mod security;
pub mod telemetry;
pub mod validate;
pub mod workload;
pub mod yaml;

pub use load::{LoadOptions, Parsed, load_paths, parse_text};
pub use resource::{Diagnostic, Document, Kind, Level, ObjectRef, Resource, Spec};
