//! The HTTP/2 guards the broker keeps (issue 12): the stream limit per
//! connection, keepalive pings that drop a connection whose peer stopped
//! answering, and the rapid-reset limit.

use std::time::Duration;

use tidings::client::{self, ConnectOptions};
use tidings::proto::{self, subscriber_service_client::SubscriberServiceClient};
use tidings::server::ServerConfig;

use crate::harness::{Backend, TestBroker, ms, pb};
use crate::proxy::{Proxy, through, upstream_of};

/// A Subscribe stream on `client`'s connection that stays open.
async fn open_stream(
    client: &mut SubscriberServiceClient<tonic::transport::Channel>,
    sub: &str,
) -> (
    tokio::sync::mpsc::Sender<proto::SubscribeRequest>,
    tonic::Streaming<proto::SubscribeResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::SubscribeRequest {
        subscription: sub.into(),
        ..Default::default()
    })
    .await
    .expect("first request");
    let stream = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    (tx, stream)
}

#[tokio::test]
async fn a_connection_holds_at_most_max_concurrent_streams_calls() {
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.max_concurrent_streams = 3;
    })
    .await;
    b.topic_and_sub("t", "s", |_| {}).await;
    // One connection: every call below shares it.
    let mut client = b.raw_subscriber();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open_stream(&mut client, "s").await);
    }
    // A fourth call waits for a stream to end: the server's limit holds.
    let mut pull = client.clone();
    let mut fourth = tokio::spawn(async move {
        pull.pull(proto::PullRequest {
            subscription: "s".into(),
            max_messages: 1,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code())
    });
    assert!(
        tokio::time::timeout(ms(500), &mut fourth).await.is_err(),
        "a fourth call ran beside three open streams"
    );
    drop(streams.pop());
    let answered = tokio::time::timeout(std::time::Duration::from_secs(10), fourth)
        .await
        .expect("answered once a stream ended")
        .expect("task");
    assert_eq!(answered, Ok(()));
    b.stop().await;
}

#[tokio::test]
async fn keepalive_drops_a_connection_whose_peer_went_silent() {
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.keepalive_interval = ms(200);
        c.keepalive_timeout = ms(200);
    })
    .await;
    b.topic_and_sub("t", "s", |s| {
        s.ack_deadline = Some(pb(Duration::from_secs(60)))
    })
    .await;
    b.publish("t", &["held"]).await;
    // A consumer behind a link that will drop every packet.
    let proxy = Proxy::start(upstream_of(&b.url)).await;
    let options = ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    let far = client::connect_with(&through(&b.url, proxy.addr()), options).expect("connect");
    let mut far_client = SubscriberServiceClient::new(far.channel());
    let (_requests, mut stream) = open_stream(&mut far_client, "s").await;
    let first = stream
        .message()
        .await
        .expect("a response")
        .expect("the stream is open");
    assert_eq!(first.messages.len(), 1);
    proxy.black_hole();
    // The broker pings, hears nothing, drops the connection and with it the
    // stream's lease: the message comes to another consumer long before its
    // 60 s ack deadline.
    let again = b.pull("s", 1, Duration::from_secs(20)).await;
    assert_eq!(
        again.len(),
        1,
        "redelivered after the silent peer was dropped"
    );
    assert_eq!(again[0].attempt, 2);
    b.stop().await;
}

#[tokio::test]
async fn a_rapid_reset_flood_loses_its_connection_and_others_are_served() {
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.max_pending_reset_streams = 20;
    })
    .await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let addr = upstream_of(&b.url);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let driver = tokio::spawn(connection);
    let mut opened = 0u32;
    let outcome = loop {
        if opened == 100_000 {
            break "the flood went on";
        }
        sender = match sender.ready().await {
            Ok(s) => s,
            Err(_) => break "closed",
        };
        let request = tonic::codegen::http::Request::post(format!(
            "http://{addr}/tidings.v1.SubscriberService/Pull"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        match sender.send_request(request, false) {
            Ok((_response, mut body)) => body.send_reset(h2::Reason::CANCEL),
            Err(_) => break "closed",
        }
        opened += 1;
        tokio::task::yield_now().await;
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the connection ends")
        .expect("task");
    assert_eq!(outcome, "closed", "after {opened} streams");
    let e = ended.expect_err("closed by the server");
    assert!(e.is_go_away() || e.is_io(), "{e:?}");
    // Others are served all the while.
    b.publish("t", &["fine"]).await;
    assert_eq!(b.pull("s", 1, Duration::from_secs(5)).await.len(), 1);
    b.stop().await;
}
