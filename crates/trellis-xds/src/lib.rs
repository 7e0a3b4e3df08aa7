//! The wire between the control plane and the proxies.
//!
//! [`snapshot`] is the proxy's configuration as it travels: everything one proxy needs
//! (its own workload, the services it may reach, their clusters and endpoints, settings).
//! The same model loads from a YAML or JSON file (`trellis-proxy --config snapshot.yaml`,
//! static mode) with located errors; the proxy converts it to its own domain types at the
//! edge and rejects a bad resource with a clear reason.

pub mod ads;
pub mod delta;
pub mod snapshot;
