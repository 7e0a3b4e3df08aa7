//! Host names as Istio and Kubernetes read them: short names, namespace-qualified names,
//! fully qualified names and wildcards. Pure functions, shared by the analyzers, the
//! registry and the route tables.

/// The cluster DNS domain services live under.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The suffix of Kubernetes service names (`<name>.<ns>.svc.cluster.local`).
pub const SERVICE_SUFFIX: &str = ".svc.cluster.local";

/// Whether the host is a wildcard (`*` or `*.example.com`).
pub fn is_wildcard(host: &str) -> bool {
    host.starts_with('*')
}

/// Istio's expansion of a host written in `namespace`: a short name (no dot, not a
/// wildcard) becomes `<name>.<namespace>.svc.cluster.local`; anything else is kept verbatim.
///
/// This is what `istioctl analyze` and Istio's config resolution do. Trellis's registry
/// additionally understands `name.ns` and `name.ns.svc` (see [`kube_candidates`]).
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || is_wildcard(host) || host.is_empty() {
        host.to_string()
    } else {
        format!("{host}.{namespace}{SERVICE_SUFFIX}")
    }
}

/// The names a host may stand for when looked up from `namespace`, most specific first.
///
/// Like Kubernetes DNS (search path `<ns>.svc.cluster.local svc.cluster.local
/// cluster.local`): `reviews` → `reviews.<ns>.svc.cluster.local`; `reviews.prod` →
/// `reviews.prod` and `reviews.prod.svc.cluster.local`; `reviews.prod.svc` →
/// `reviews.prod.svc` and `reviews.prod.svc.cluster.local`; an FQDN verbatim.
///
/// Trellis deliberately resolves `name.ns` and `name.ns.svc` to the Kubernetes service,
/// as a pod's resolver would; `istioctl analyze` compares such names verbatim and reports
/// them as not found.
pub fn kube_candidates(host: &str, namespace: &str) -> Vec<String> {
    if host.is_empty() || is_wildcard(host) {
        return vec![host.to_string()];
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let labels: Vec<&str> = host.split('.').collect();
    match labels.len() {
        1 => vec![fqdn(host, namespace)],
        2 => vec![host.to_string(), format!("{host}{SERVICE_SUFFIX}")],
        3 if labels[2] == "svc" => {
            vec![host.to_string(), format!("{host}.{CLUSTER_DOMAIN}")]
        }
        _ => vec![host.to_string()],
    }
}

/// Splits `name.ns.svc.cluster.local` into `(name, ns)`.
pub fn split_service_fqdn(host: &str) -> Option<(&str, &str)> {
    let rest = host.strip_suffix(SERVICE_SUFFIX)?;
    let (name, ns) = rest.split_once('.')?;
    if name.is_empty() || ns.is_empty() || ns.contains('.') {
        return None;
    }
    Some((name, ns))
}

/// Whether `pattern` (a host, possibly a wildcard) matches the concrete or wildcard host
/// `host`: `*` matches everything, `*.example.com` matches any name ending in
/// `.example.com` (at any depth) and the wildcard `*.a.example.com`; otherwise names must be
/// equal (case-insensitively, as DNS).
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        // suffix starts with '.' for valid wildcards ("*.example.com").
        let h = host.strip_prefix('*').unwrap_or(host);
        return h.len() > suffix.len() && ends_with_ignore_case(h, suffix)
            || (host.starts_with('*') && h.eq_ignore_ascii_case(suffix));
    }
    !is_wildcard(host) && pattern.eq_ignore_ascii_case(host)
}

/// Whether two hosts (either may be a wildcard) can name the same thing: Istio's
/// symmetric `host.Name.Matches`.
pub fn overlaps(a: &str, b: &str) -> bool {
    matches(a, b) || matches(b, a)
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.is_char_boundary(s.len() - suffix.len())
        && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_expands_only_short_names() {
        assert_eq!(fqdn("reviews", "prod"), "reviews.prod.svc.cluster.local");
        assert_eq!(fqdn("reviews.prod", "default"), "reviews.prod");
        assert_eq!(fqdn("httpbin.org", "default"), "httpbin.org");
        assert_eq!(fqdn("*.example.com", "default"), "*.example.com");
        assert_eq!(fqdn("*", "default"), "*");
    }

    #[test]
    fn kube_candidates_follow_the_dns_search_path() {
        assert_eq!(
            kube_candidates("reviews", "prod"),
            ["reviews.prod.svc.cluster.local"]
        );
        assert_eq!(
            kube_candidates("reviews.prod", "default"),
            ["reviews.prod", "reviews.prod.svc.cluster.local"]
        );
        assert_eq!(
            kube_candidates("reviews.prod.svc", "default"),
            ["reviews.prod.svc", "reviews.prod.svc.cluster.local"]
        );
        assert_eq!(
            kube_candidates("reviews.prod.svc.cluster.local", "default"),
            ["reviews.prod.svc.cluster.local"]
        );
        assert_eq!(kube_candidates("api.example.com", "x"), ["api.example.com"]);
        assert_eq!(kube_candidates("*.example.com", "x"), ["*.example.com"]);
    }

    #[test]
    fn split_service_fqdn_reads_name_and_namespace() {
        assert_eq!(
            split_service_fqdn("reviews.prod.svc.cluster.local"),
            Some(("reviews", "prod"))
        );
        assert_eq!(split_service_fqdn("reviews.prod"), None);
        assert_eq!(split_service_fqdn("a.b.c.svc.cluster.local"), None);
    }

    #[test]
    fn wildcards_match_by_suffix() {
        assert!(matches("*", "anything.example.com"));
        assert!(matches("*.example.com", "foo.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(matches("*.example.com", "FOO.Example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "fooexample.com"));
        assert!(matches("*.example.com", "*.a.example.com"));
        assert!(!matches("*.a.example.com", "*.example.com"));
        assert!(matches("foo.example.com", "foo.example.com"));
        assert!(!matches("foo.example.com", "*.example.com"));
        assert!(!matches("foo.example.com", "bar.example.com"));
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlaps("foo.example.com", "*.example.com"));
        assert!(overlaps("*.example.com", "foo.example.com"));
        assert!(overlaps("*.example.com", "*.a.example.com"));
        assert!(overlaps("*", "x"));
        assert!(overlaps("*.example.com", "*.example.com"));
        assert!(!overlaps("*.example.com", "*.example.org"));
        assert!(!overlaps("a.com", "b.com"));
    }
}
