//! Health and reflection, as standard gRPC tools use them, and draining.

use std::time::Duration;

use tidings::proto;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::{v1, v1alpha};

use crate::harness::{TestBroker, backend_test};

backend_test! {
    async fn health_reports_serving_for_the_server_and_each_service(backend) {
        let b = TestBroker::start(backend).await;
        let mut health = HealthClient::new(b.channel.clone());
        for service in [
            "",
            "tidings.v1.PublisherService",
            "tidings.v1.SubscriberService",
            "tidings.v1.AdminService",
        ] {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
        }
        b.stop().await;
    }
}

backend_test! {
    async fn reflection_v1_and_v1alpha_list_all_three_services(backend) {
        let b = TestBroker::start(backend).await;
        let mut client = v1::server_reflection_client::ServerReflectionClient::new(b.channel.clone());
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            "tidings.v1.PublisherService",
            "tidings.v1.SubscriberService",
            "tidings.v1.AdminService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.contains(&expected.to_string()),
                "{expected} in {names:?}"
            );
        }

        let mut old = v1alpha::server_reflection_client::ServerReflectionClient::new(b.channel.clone());
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "tidings.v1.PublisherService".into(),
                ),
            ),
        };
        let mut responses = old
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        assert!(matches!(
            response.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ));
        b.stop().await;
    }
}

backend_test! {
    async fn draining_turns_health_not_serving_and_ends_streams_with_unavailable(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let mut health = HealthClient::new(b.channel.clone());
        let mut watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            watch.message().await.unwrap().unwrap().status,
            ServingStatus::Serving as i32
        );

        // A raw stream, so that the status it ends with is visible.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(proto::SubscribeRequest {
            subscription: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = b
            .raw_subscriber()
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        b.publish("t", &["x"]).await;
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.messages.len(), 1);

        let stopping = tokio::spawn(b.stop());
        let status = watch.message().await.unwrap().unwrap().status;
        assert_eq!(status, ServingStatus::NotServing as i32);
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream ends on drain");
        let err = end.expect_err("ends with a status");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        drop(tx);
        drop(stream);
        drop(watch);
        stopping.await.unwrap();
    }
}

backend_test! {
    async fn drain_timeout_closes_connections_that_never_finish(backend) {
        let b = TestBroker::start_with(backend, |c| c.drain_timeout = Duration::from_millis(300)).await;
        let mut health = HealthClient::new(b.channel.clone());
        // A Watch never ends by itself; draining must not wait for it forever.
        let mut watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        watch.message().await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(10), b.stop())
            .await
            .expect("stopped after the drain timeout");
        drop(watch);
    }
}

#[tokio::test]
async fn health_turns_not_serving_and_publish_unavailable_when_storage_fails() {
    let Some(backend @ crate::harness::Backend::Postgres(_)) = crate::harness::Backend::postgres()
    else {
        return;
    };
    let admin_url = match &backend {
        crate::harness::Backend::Postgres(url) => url.clone(),
        crate::harness::Backend::Sqlite => unreachable!(),
    };
    let b = TestBroker::start(backend).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let mut health = HealthClient::new(b.channel.clone());
    let serving =
        |r: tonic_health::pb::HealthCheckResponse| r.status == ServingStatus::Serving as i32;
    assert!(serving(
        health
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
    ));

    // Take the database away under the broker.
    let url = b.database_url().unwrap().to_owned();
    let name = url.rsplit('/').next().unwrap().to_owned();
    crate::harness::drop_database(&admin_url, &name).await;

    let err = b
        .raw_publisher()
        .publish(proto::PublishRequest {
            messages: vec![crate::harness::wire(tidings::client::Outgoing::new(
                "t", "x",
            ))],
        })
        .await
        .expect_err("storage is gone");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let mut not_serving = false;
    for _ in 0..100 {
        let r = health
            .check(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        if r.status == ServingStatus::NotServing as i32 {
            not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        not_serving,
        "health reports NOT_SERVING while storage fails"
    );
    b.stop().await;
}
