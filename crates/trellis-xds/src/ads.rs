//! The transport between proxies and the control plane: Envoy's Delta ADS
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`), a
//! bidirectional gRPC stream. Only the transport messages are defined here (field numbers
//! as in Envoy's protos); what they carry is Trellis's own snapshot, as an `Any`.
//!
//! Plus gRPC's message framing (a 1-byte compression flag, a 4-byte big-endian length, the
//! message), so both sides can speak gRPC over any HTTP/2 stack.

use prost::Message;

/// The gRPC method path.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The type URL of a proxy snapshot.
pub const SNAPSHOT_TYPE_URL: &str = "type.googleapis.com/trellis.snapshot.v1.Snapshot";
/// Largest message accepted (a snapshot of a big mesh is a few MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// `envoy.config.core.v3.Node` (the fields Trellis uses): who is asking. `metadata`
/// carries the workload instance the proxy runs beside.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<prost_types::Struct>,
}

/// `google.rpc.Status`: why a proxy refused a response (a NACK).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryRequest {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    /// Versions the proxy already has (on reconnect).
    #[prost(btree_map = "string, string", tag = "5")]
    pub initial_resource_versions: std::collections::BTreeMap<String, String>,
    /// The nonce of the response this request answers (ACK, or NACK with error_detail).
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

/// `envoy.service.discovery.v3.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<prost_types::Any>,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryResponse {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// The CA's gRPC method (Istio's).
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The key of `IstioCertificateRequest.metadata` naming the proxy's instance (for status
/// pages; the identity comes from the token).
pub const INSTANCE_NAME_KEY: &str = "NAME";

/// `istio.v1.auth.IstioCertificateRequest`: a PEM CSR and the validity asked for (seconds).
/// The bootstrap token travels in the `authorization: Bearer` header.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: the certificate, then the CA's chain (PEM).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// One gRPC message frame.
pub fn frame<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode_raw(&mut out);
    out
}

/// Why a stream of frames could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A compressed message (Trellis never asks for compression).
    Compressed,
    TooLarge(usize),
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Compressed => write!(f, "compressed gRPC messages are not accepted"),
            FrameError::TooLarge(n) => write!(f, "gRPC message of {n} bytes is over the limit"),
            FrameError::Decode(e) => write!(f, "gRPC message does not decode: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reassembles gRPC messages from the chunks of an HTTP/2 body, whatever their sizes.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(FrameError::Compressed);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let msg =
            M::decode(&self.buf[5..5 + len]).map_err(|e| FrameError::Decode(e.to_string()))?;
        self.buf.drain(..5 + len);
        Ok(Some(msg))
    }
}

/// What a proxy announces about the instance it runs beside (in `Node.metadata`, with
/// Istio-like keys: NAME, NAMESPACE, SERVICE_ACCOUNT, LABELS, INSTANCE_IPS, PORTS,
/// LOCALITY, AUTO_REGISTER_GROUP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announce {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub addresses: Vec<String>,
    /// `(name, port)` of each port the app listens on.
    pub ports: Vec<(Option<String>, u16)>,
    pub locality: Option<String>,
    /// A WorkloadGroup of the namespace to register under (a VM's proxy): the control
    /// plane takes the instance's labels, service account and ports from its template.
    pub workload_group: Option<String>,
}

fn text(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
    }
}

fn get_text<'a>(m: &'a prost_types::Struct, k: &str) -> Option<&'a str> {
    match m.fields.get(k)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

impl Announce {
    /// The node a sidecar for this instance sends (`sidecar~<ip>~<name>.<ns>~<ns>.svc.cluster.local`).
    pub fn to_node(&self) -> Node {
        let mut f = std::collections::BTreeMap::new();
        f.insert("NAME".to_string(), text(&self.name));
        f.insert("NAMESPACE".to_string(), text(&self.namespace));
        f.insert("SERVICE_ACCOUNT".to_string(), text(&self.service_account));
        f.insert("INSTANCE_IPS".to_string(), text(&self.addresses.join(",")));
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(n, p)| format!("{}:{p}", n.as_deref().unwrap_or("")))
            .collect();
        f.insert("PORTS".to_string(), text(&ports.join(",")));
        if let Some(l) = &self.locality {
            f.insert("LOCALITY".to_string(), text(l));
        }
        if let Some(g) = &self.workload_group {
            f.insert("AUTO_REGISTER_GROUP".to_string(), text(g));
        }
        f.insert(
            "LABELS".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                    fields: self
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), text(v)))
                        .collect(),
                })),
            },
        );
        Node {
            id: format!(
                "sidecar~{}~{}.{}~{}.svc.cluster.local",
                self.addresses.first().map_or("", String::as_str),
                self.name,
                self.namespace,
                self.namespace
            ),
            cluster: self.name.clone(),
            metadata: Some(prost_types::Struct { fields: f }),
        }
    }

    /// What a node announces; `None` without a name and namespace.
    pub fn from_node(node: &Node) -> Option<Announce> {
        let m = node.metadata.as_ref()?;
        let name = get_text(m, "NAME").filter(|s| !s.is_empty())?.to_string();
        let namespace = get_text(m, "NAMESPACE")
            .filter(|s| !s.is_empty())?
            .to_string();
        let labels = match m.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(prost_types::value::Kind::StructValue(s)) => s
                .fields
                .keys()
                .filter_map(|k| Some((k.clone(), get_text(s, k)?.to_string())))
                .collect(),
            _ => Default::default(),
        };
        let split = |k: &str| -> Vec<String> {
            get_text(m, k)
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        Some(Announce {
            name,
            namespace,
            service_account: get_text(m, "SERVICE_ACCOUNT")
                .unwrap_or("default")
                .to_string(),
            labels,
            addresses: split("INSTANCE_IPS"),
            ports: split("PORTS")
                .iter()
                .filter_map(|p| {
                    let (n, port) = p.rsplit_once(':')?;
                    Some(((!n.is_empty()).then(|| n.to_string()), port.parse().ok()?))
                })
                .collect(),
            locality: get_text(m, "LOCALITY").map(str::to_string),
            workload_group: get_text(m, "AUTO_REGISTER_GROUP")
                .filter(|g| !g.is_empty())
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_chunking() {
        let req = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "sidecar~10.0.0.1~web-0.web".into(),
                ..Default::default()
            }),
            type_url: SNAPSHOT_TYPE_URL.into(),
            response_nonce: "7".into(),
            ..Default::default()
        };
        let mut bytes = frame(&req);
        bytes.extend(frame(&DeltaDiscoveryRequest::default()));
        for chunk in [1, 2, 3, 7, 64] {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                d.push(c);
                while let Some(m) = d.next_message::<DeltaDiscoveryRequest>().expect("decodes") {
                    got.push(m);
                }
            }
            assert_eq!(
                got,
                vec![req.clone(), DeltaDiscoveryRequest::default()],
                "chunks of {chunk}"
            );
        }
        let mut d = Deframer::default();
        d.push(&[1, 0, 0, 0, 0]);
        assert_eq!(d.next_message::<Status>(), Err(FrameError::Compressed));
        let mut d = Deframer::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_message::<Status>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn an_instance_round_trips_through_the_node() {
        let a = Announce {
            name: "web-0".into(),
            namespace: "web".into(),
            service_account: "web".into(),
            labels: [("app".to_string(), "web".to_string())]
                .into_iter()
                .collect(),
            addresses: vec!["10.0.0.1".into()],
            ports: vec![(Some("http".into()), 8080), (None, 9090)],
            locality: Some("eu/a".into()),
            workload_group: Some("legacy".into()),
        };
        let node = a.to_node();
        assert_eq!(node.id, "sidecar~10.0.0.1~web-0.web~web.svc.cluster.local");
        let bytes = node.encode_to_vec();
        let back = Node::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(Announce::from_node(&back), Some(a));
        assert_eq!(Announce::from_node(&Node::default()), None);
    }
}
