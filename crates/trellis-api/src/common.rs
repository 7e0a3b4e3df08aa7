//! Types shared by several kinds: object metadata, durations, percentages, protocols,
//! selectors and string matches.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer};

/// Labels and other string maps, kept sorted so output and comparisons are stable.
pub type Labels = BTreeMap<String, String>;

/// Kubernetes object metadata. Fields the API server fills in (uid, resourceVersion…) are
/// accepted and ignored so that manifests exported with `kubectl get -o yaml` load.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub generate_name: Option<String>,
    pub uid: Option<IgnoredAny>,
    pub resource_version: Option<IgnoredAny>,
    pub generation: Option<IgnoredAny>,
    pub creation_timestamp: Option<IgnoredAny>,
    pub deletion_timestamp: Option<IgnoredAny>,
    pub deletion_grace_period_seconds: Option<IgnoredAny>,
    pub owner_references: Option<IgnoredAny>,
    pub finalizers: Option<IgnoredAny>,
    pub managed_fields: Option<IgnoredAny>,
    pub self_link: Option<IgnoredAny>,
}

/// A duration as Istio accepts it: Go syntax, one or more decimal numbers each with a unit
/// (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), e.g. `1.5s`, `100ms`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}ns", d.as_nanos())
        }
    }
}

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (examples: \"1.5s\", \"100ms\", \"1h30m\")")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| DurationError {
            input: s.to_string(),
            reason,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(fail("empty"));
        }
        if text.starts_with('-') {
            return Err(fail("durations cannot be negative"));
        }
        let text = text.strip_prefix('+').unwrap_or(text);
        if text == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut total: u128 = 0; // nanoseconds
        let mut rest = text;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if num_len == 0 {
                return Err(fail("expected a number"));
            }
            let (num, after) = rest.split_at(num_len);
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(fail("missing unit")),
                _ => return Err(fail("unknown unit")),
            };
            let (int_part, frac_part) = match num.split_once('.') {
                Some((i, f)) => (i, f),
                None => (num, ""),
            };
            if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
                return Err(fail("expected a number"));
            }
            let int: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| fail("number too large"))?
            };
            let mut value = int.checked_mul(scale).ok_or_else(|| fail("too large"))?;
            // Fractions: keep up to nanosecond precision.
            let mut frac_scale = scale;
            for c in frac_part.chars().take(18) {
                frac_scale /= 10;
                let digit = u128::from(c.to_digit(10).ok_or_else(|| fail("expected a number"))?);
                value += digit * frac_scale;
            }
            total = total.checked_add(value).ok_or_else(|| fail("too large"))?;
            rest = next;
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| fail("too large"))?;
        let nanos = (total % 1_000_000_000) as u32;
        Ok(Duration(std::time::Duration::new(secs, nanos)))
    }
}

impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"1.5s\" or \"100ms\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Istio's `Percent` message: `{value: 12.5}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// An application protocol as Istio names it, matched case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Https,
    Http2,
    Grpc,
    GrpcWeb,
    HttpProxy,
    Tcp,
    Tls,
    Udp,
    Mongo,
    Redis,
    Mysql,
    Hbone,
}

impl Protocol {
    pub const ALL: [Protocol; 13] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::HttpProxy,
        Protocol::Tcp,
        Protocol::Tls,
        Protocol::Udp,
        Protocol::Mongo,
        Protocol::Redis,
        Protocol::Mysql,
        Protocol::Hbone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Https => "HTTPS",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-WEB",
            Protocol::HttpProxy => "HTTP_PROXY",
            Protocol::Tcp => "TCP",
            Protocol::Tls => "TLS",
            Protocol::Udp => "UDP",
            Protocol::Mongo => "MONGO",
            Protocol::Redis => "REDIS",
            Protocol::Mysql => "MYSQL",
            Protocol::Hbone => "HBONE",
        }
    }

    /// HTTP-family protocols (routed with `http[]` rules).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Protocols that carry TLS the proxy does not terminate by default.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown protocol {s:?}, expected one of {}",
                    Protocol::ALL.map(Protocol::as_str).join(", ")
                )
            })
    }
}

impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol name such as HTTP, GRPC, TCP or TLS")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Protocol, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Kubernetes `IntOrString` (a Service's `targetPort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `workloadSelector: {labels: {...}}` (Sidecar, ServiceEntry).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// `selector: {matchLabels: {...}}` (security and telemetry kinds, DestinationRule).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabelsSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// A Gateway API style reference to the resource a policy attaches to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

/// Istio's `StringMatch`: exactly one of exact, prefix or regex; none set means "present"
/// when used for headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

impl StringMatch {
    /// How many of exact/prefix/regex are set (valid: 0 or 1).
    pub fn set_count(&self) -> usize {
        [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count()
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.exact, &self.prefix, &self.regex) {
            (Some(e), _, _) => write!(f, "exact {e:?}"),
            (_, Some(p), _) => write!(f, "prefix {p:?}"),
            (_, _, Some(r)) => write!(f, "regex {r:?}"),
            _ => f.write_str("present"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> std::time::Duration {
        s.parse::<Duration>().expect(s).0
    }

    #[test]
    fn durations_parse_go_syntax() {
        assert_eq!(d("1.5s"), std::time::Duration::from_millis(1500));
        assert_eq!(d("100ms"), std::time::Duration::from_millis(100));
        assert_eq!(d("1h"), std::time::Duration::from_secs(3600));
        assert_eq!(d("1h30m"), std::time::Duration::from_secs(5400));
        assert_eq!(d("250us"), std::time::Duration::from_micros(250));
        assert_eq!(d(".5s"), std::time::Duration::from_millis(500));
        assert_eq!(d("0"), std::time::Duration::ZERO);
        for bad in ["", "5", "1.5", "s", "-1s", "1x", "1..5s", "1s2"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should fail");
        }
        let err = "5".parse::<Duration>().expect_err("no unit");
        assert!(err.to_string().contains("missing unit"), "{err}");
    }

    #[test]
    fn protocols_are_case_insensitive() {
        assert_eq!("http".parse::<Protocol>(), Ok(Protocol::Http));
        assert_eq!("HTTP".parse::<Protocol>(), Ok(Protocol::Http));
        assert_eq!("tls".parse::<Protocol>(), Ok(Protocol::Tls));
        assert_eq!("gRPC-Web".parse::<Protocol>(), Ok(Protocol::GrpcWeb));
        let err = "htp".parse::<Protocol>().expect_err("unknown");
        assert!(err.contains("unknown protocol \"htp\""), "{err}");
    }
}
