//! The WebSocket echo fixture.

mod common;

use common::bounded;
use trellis_testkit::{WsEchoServer, WsMessage, ws_echo};

#[tokio::test]
async fn text_and_binary_messages_come_back_unchanged() {
    let server = WsEchoServer::start().await.unwrap();
    let sent = vec![
        WsMessage::text("hello"),
        WsMessage::binary(vec![0u8, 1, 2, 255]),
        WsMessage::text("ünïcödé"),
        WsMessage::binary(vec![42u8; 100_000]),
    ];
    let echoes = bounded("ws echo", ws_echo(server.addr, "ws.test", sent.clone()))
        .await
        .unwrap();
    assert_eq!(echoes, sent);
    assert_eq!(server.stats().upgrades(), 1);
    assert_eq!(server.stats().messages_echoed(), 4);
}

#[tokio::test]
async fn a_plain_http_request_is_not_upgraded() {
    let server = WsEchoServer::start().await.unwrap();
    // tungstenite closes the connection on a request without the Upgrade headers.
    let resp = bounded(
        "plain get",
        trellis_testkit::http_client::get(server.addr, "ws.test", "/echo"),
    )
    .await;
    if let Ok(resp) = resp {
        assert_ne!(resp.status, http::StatusCode::SWITCHING_PROTOCOLS);
    }
    assert_eq!(server.stats().upgrades(), 0);
}
