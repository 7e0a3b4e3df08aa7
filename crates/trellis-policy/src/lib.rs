//! Pure decision engines shared by the proxy and the CLI (`trellis explain`): no sockets,
//! no async, no clocks. The proxy calls them on the data path, so they are compiled once
//! per snapshot and cheap per request.
//!
//! - [`route`]: VirtualService HTTP routing — first-match over `http[]`, every match
//!   condition Istio has, weighted destinations.
//! - [`jwt`]: JWT signature and claim checks for RequestAuthentication.
//! - [`authz`]: AuthorizationPolicy — CUSTOM, DENY, ALLOW, AUDIT with Istio's matching.

pub mod authz;
pub mod jwt;
pub mod route;
