//! The gRPC fixture, driven by the testkit's hand-written gRPC client.

mod common;

use bytes::Bytes;
use common::bounded;
use http::StatusCode;
use trellis_testkit::grpc::{FAIL_MESSAGE, encode_message};
use trellis_testkit::http_client::HttpClient;
use trellis_testkit::{
    Error, GrpcServer, grpc_call, grpc_call_pingpong, grpc_call_pingpong_with,
    grpc_call_with_authority,
};

fn msgs(items: &[&'static str]) -> Vec<Bytes> {
    items
        .iter()
        .map(|s| Bytes::from_static(s.as_bytes()))
        .collect()
}

#[tokio::test]
async fn unary_echoes_one_message_with_ok_trailers() {
    let server = GrpcServer::start().await.unwrap();
    let resp = bounded(
        "unary",
        grpc_call(server.addr, "/test.Echo/Unary", msgs(&["hello grpc"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.headers.get("content-type").unwrap(),
        "application/grpc"
    );
    assert_eq!(resp.messages, msgs(&["hello grpc"]));
    let trailers = resp.trailers.as_ref().expect("trailers after the message");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(resp.grpc_status.as_deref(), Some("0"));
    assert_eq!(server.stats().messages_echoed(), 1);
}

#[tokio::test]
async fn unary_with_two_messages_is_an_internal_error() {
    let server = GrpcServer::start().await.unwrap();
    let resp = bounded(
        "unary x2",
        grpc_call(server.addr, "/test.Echo/Unary", msgs(&["a", "b"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.grpc_status.as_deref(), Some("13"));
    assert!(resp.messages.is_empty());
}

#[tokio::test]
async fn unary_handles_large_and_empty_messages() {
    let server = GrpcServer::start().await.unwrap();
    let big = Bytes::from(vec![7u8; 200_000]);
    let resp = bounded(
        "big",
        grpc_call(server.addr, "/test.Echo/Unary", vec![big.clone()]),
    )
    .await
    .unwrap();
    assert_eq!(resp.messages, vec![big]);
    let resp = bounded(
        "empty",
        grpc_call(server.addr, "/test.Echo/Unary", vec![Bytes::new()]),
    )
    .await
    .unwrap();
    assert_eq!(resp.messages, vec![Bytes::new()]);
    assert_eq!(resp.grpc_status.as_deref(), Some("0"));
}

#[tokio::test]
async fn stream_echoes_each_message_in_lock_step() {
    let server = GrpcServer::start().await.unwrap();
    let sent = msgs(&["one", "two", "three", "four"]);
    let resp = bounded(
        "pingpong",
        grpc_call_pingpong(server.addr, "/test.Echo/Stream", sent.clone()),
    )
    .await
    .unwrap();
    assert_eq!(resp.messages, sent);
    assert_eq!(resp.grpc_status.as_deref(), Some("0"));
    assert!(resp.trailers.is_some());
    assert_eq!(server.stats().messages_echoed(), 4);
    assert_eq!(server.stats().calls(), 1);
}

#[tokio::test]
async fn stream_also_takes_all_messages_at_once() {
    let server = GrpcServer::start().await.unwrap();
    let sent = msgs(&["a", "bb", "ccc"]);
    let resp = bounded(
        "stream",
        grpc_call(server.addr, "/test.Echo/Stream", sent.clone()),
    )
    .await
    .unwrap();
    assert_eq!(resp.messages, sent);
    assert_eq!(resp.grpc_status.as_deref(), Some("0"));
}

#[tokio::test]
async fn stream_with_no_messages_ends_ok() {
    let server = GrpcServer::start().await.unwrap();
    let resp = bounded(
        "empty stream",
        grpc_call_pingpong(server.addr, "/test.Echo/Stream", vec![]),
    )
    .await
    .unwrap();
    assert!(resp.messages.is_empty());
    assert_eq!(resp.grpc_status.as_deref(), Some("0"));
}

#[tokio::test]
async fn fail_is_a_trailers_only_unavailable() {
    let server = GrpcServer::start().await.unwrap();
    let resp = bounded(
        "fail",
        grpc_call(server.addr, "/test.Echo/Fail", msgs(&["x"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.messages.is_empty());
    assert!(
        resp.trailers.is_none(),
        "trailers-only: status rides in the headers"
    );
    assert_eq!(resp.headers.get("grpc-status").unwrap(), "14");
    assert_eq!(resp.grpc_status.as_deref(), Some("14"));
    assert_eq!(resp.grpc_message.as_deref(), Some(FAIL_MESSAGE));
    // The streaming helper stops sending when the server has already answered.
    let resp = bounded(
        "fail pingpong",
        grpc_call_pingpong(server.addr, "/test.Echo/Fail", msgs(&["x", "y"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.grpc_status.as_deref(), Some("14"));
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let server = GrpcServer::start().await.unwrap();
    let resp = bounded(
        "unknown",
        grpc_call(server.addr, "/test.Echo/Nope", msgs(&["x"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.grpc_status.as_deref(), Some("12"));
}

#[tokio::test]
async fn non_grpc_request_is_refused_with_415() {
    let server = GrpcServer::start().await.unwrap();
    let mut client = HttpClient::h2c(server.addr).await.unwrap();
    let resp = bounded(
        "plain post",
        client.post("h", "/test.Echo/Unary", encode_message(b"x")),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn pingpong_detects_a_peer_that_waits_for_the_whole_request() {
    // Unary collects the whole request before answering, as a buffering proxy would: the first
    // echo cannot arrive while the request stream is still open.
    let server = GrpcServer::start().await.unwrap();
    let wait = std::time::Duration::from_millis(300);
    let authority = server.addr.to_string();
    let result = bounded(
        "buffering peer",
        grpc_call_pingpong_with(
            server.addr,
            &authority,
            "/test.Echo/Unary",
            msgs(&["a", "b"]),
            wait,
        ),
    )
    .await;
    assert!(
        matches!(result, Err(Error::Timeout(..))),
        "lock-step streaming must notice buffering: {result:?}"
    );
}

#[tokio::test]
async fn authority_and_grpc_headers_are_sent_as_given() {
    // The HTTP fixture's /echo reflects what arrived; a framed body echoed back decodes as-is.
    let server = trellis_testkit::HttpServer::start().await.unwrap();
    let authority = "echo.test.svc:50051";
    let resp = bounded(
        "authority",
        grpc_call_with_authority(server.addr, authority, "/echo", msgs(&["x"])),
    )
    .await
    .unwrap();
    assert_eq!(resp.headers.get("x-echo-authority").unwrap(), authority);
    assert_eq!(resp.headers.get("x-echo-version").unwrap(), "HTTP/2.0");
    assert_eq!(
        resp.headers.get("x-echo-h-content-type").unwrap(),
        "application/grpc"
    );
    assert_eq!(resp.headers.get("x-echo-h-te").unwrap(), "trailers");
    assert_eq!(resp.messages, msgs(&["x"]));
    assert_eq!(resp.grpc_status, None);
}
