//! WebSocket (RFC 6455) through the gateway with real peers (`tokio-tungstenite` on both
//! sides): the route's plugins run on the handshake (auth applies), then frames flow both
//! ways (text, binary, ping/pong, a large frame, close) until a side closes; the access log
//! line is written at close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// An echo WebSocket server: every text and binary message comes back; it answers pings
/// (tungstenite does) and closes when the client does.
async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                    if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(upstream: SocketAddr, route_extra: &str) -> String {
    format!(
        "{}\n[upstreams.ws]\nendpoints = [\"{upstream}\"]\n\
         [plugins.auth]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"a-websocket-test-secret-of-32-bytes!\"\n\
         [[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"ws\"\nplugins = [\"auth\"]\n{route_extra}\n",
        server("")
    )
}

#[tokio::test]
async fn frames_flow_both_ways_after_an_authenticated_handshake() {
    let upstream = echo_server().await;
    let gw = Gateway::start(&config(upstream, "")).await;
    let url = format!("ws://{}/ws/chat", gw.addr);

    // Without a token the handshake is refused by the route's jwt plugin.
    let refused = tokio_tungstenite::connect_async(url.as_str()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }

    let token = hs256(
        "a-websocket-test-secret-of-32-bytes!",
        serde_json::json!({"sub": "alice"}),
    );
    let mut ws = connect_echoing(&gw, url.as_str(), &token).await;

    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Message::Pong(p) = ws.next().await.unwrap().unwrap() {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"are you there");
    // A 1 MiB frame crosses intact.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    // Many messages in a row keep their order.
    for i in 0..100 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..100 {
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
    }
    ws.close(None).await.unwrap();
    // The access log line comes when the connection is over.
    let log = gw.access_log_lines(2).await;
    let line = log
        .iter()
        .find(|l| l["status"] == 101)
        .unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(line["route"], "ws");
}

/// A quiet WebSocket outlives the pool's `read_timeout` up to the route's
/// `websocket_idle_timeout`, then the gateway closes it.
#[tokio::test]
async fn an_idle_websocket_lives_until_the_routes_idle_timeout() {
    let upstream = echo_server().await;
    let cfg = config(upstream, "websocket_idle_timeout = \"3s\"")
        .replace("endpoints = [", "read_timeout = \"300ms\"\nendpoints = [");
    let gw = Gateway::start(&cfg).await;
    let token = hs256(
        "a-websocket-test-secret-of-32-bytes!",
        serde_json::json!({"sub": "alice"}),
    );
    let mut ws = connect_echoing(&gw, &format!("ws://{}/ws/quiet", gw.addr), &token).await;
    // Quiet for longer than read_timeout: still open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ws.send(Message::text("still there?")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still there?")
    );
    // Quiet for longer than websocket_idle_timeout: the gateway ends it.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "closed after the idle timeout");
}

/// A WebSocket through the gateway that has echoed a first message. Known issue
/// (docs/protocols.md): rarely, under load, Pingora ends a session right after the 101. A
/// client reconnects; so does this, once, and says so.
async fn connect_echoing(
    gw: &Gateway,
    url: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    for attempt in 1..=2 {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut conn, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        conn.send(Message::text("hello")).await.unwrap();
        match conn.next().await {
            Some(Ok(m)) => {
                assert_eq!(m, Message::text("hello"));
                return conn;
            }
            other if attempt == 1 => {
                eprintln!("session ended after the upgrade ({other:?}); reconnecting")
            }
            other => panic!("first echo: {other:?}\n{}\n{}", gw.stderr(), gw.stdout()),
        }
    }
    unreachable!("the loop returns or panics")
}
