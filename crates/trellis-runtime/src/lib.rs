//! The local runtime behind `trellis up`: each workload replica is a "pod", a network
//! namespace with transparent interception rules, a sidecar and the app, all behind one
//! node namespace per mesh so the host's network is never touched ([`net`]); and the
//! processes, supervised and restarted with backoff ([`supervise`]).
//!
//! The runtime knows nothing of services or configuration: the `trellis` command plans
//! the pods (names, ports, hosts files, command lines) and hands them over.

pub mod forward;
pub mod net;
pub mod supervise;

pub use forward::{Forward, forward, spawn_in};
pub use net::{MeshNet, PodNet, preflight};
pub use supervise::Proc;

/// A mesh name is part of namespace names: lowercase letters, digits and `-`, at most
/// 20 characters, from whatever the user gave (a directory name, say).
pub fn mesh_name(raw: &str) -> String {
    let mut s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s = s.trim_matches('-').to_string();
    s.truncate(20);
    if s.is_empty() { "mesh".to_string() } else { s }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mesh_names_fit_namespace_names() {
        assert_eq!(super::mesh_name("Book Info!"), "book-info");
        assert_eq!(super::mesh_name("///"), "mesh");
        assert_eq!(super::mesh_name(&"a".repeat(40)).len(), 20);
    }
}
