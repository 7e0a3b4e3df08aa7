//! security.istio.io: PeerAuthentication, AuthorizationPolicy, RequestAuthentication
//! (v1 and v1beta1 share one schema).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::common::{Duration, MatchLabelsSelector, PolicyTargetReference};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub selector: Option<MatchLabelsSelector>,
    pub mtls: Option<MutualTls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl AuthorizationAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthorizationAction::Allow => "ALLOW",
            AuthorizationAction::Deny => "DENY",
            AuthorizationAction::Audit => "AUDIT",
            AuthorizationAction::Custom => "CUSTOM",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// No rules match nothing: an ALLOW policy without rules denies every request
    /// ("allow nothing"); `rules: [{}]` matches every request.
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub action: AuthorizationAction,
    pub provider: Option<ExtensionProvider>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Option<Operation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    pub selector: Option<MatchLabelsSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    /// Istio's schema also accepts the snake-case spelling.
    #[serde(rename = "jwks_uri")]
    pub jwks_uri_snake: Option<String>,
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    pub forward_original_token: Option<bool>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub space_delimited_claims: Vec<String>,
}

impl JwtRule {
    /// The JWKS URI under either spelling.
    pub fn jwks_uri(&self) -> Option<&str> {
        self.jwks_uri.as_deref().or(self.jwks_uri_snake.as_deref())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}
