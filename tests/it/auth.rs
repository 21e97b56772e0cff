//! Access control: principals from bearer tokens and client certificates,
//! rights per topic and subscription, admin (issue 12).

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tidings::client::{self, ConnectOptions, Connection, Transport};
use tidings::proto::{
    self, admin_service_client::AdminServiceClient,
    publisher_service_client::PublisherServiceClient,
    subscriber_service_client::SubscriberServiceClient,
};
use tidings::server::ServerConfig;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::{Backend, TestBroker};

/// The SHA-256 of `token` as the access file lists it.
fn hashed(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// An access file with an admin, a publisher of `orders.*` and a consumer
/// of `billing`.
fn access_file(dir: &Path) -> std::path::PathBuf {
    let file = serde_json::json!({"principals": [
        {"name": "ops", "tokens": [hashed("admin-token")], "admin": true},
        {"name": "order-service", "tokens": [hashed("publisher-token")], "publish": ["orders.*"]},
        {"name": "billing-service", "tokens": [hashed("consumer-token")], "consume": ["billing"],
         "certificates": ["billing.internal"]},
    ]});
    let path = dir.join("access.json");
    std::fs::write(&path, file.to_string()).expect("write the access file");
    path
}

async fn start(dir: &Path) -> TestBroker {
    let path = access_file(dir);
    TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.access_file = Some(path);
    })
    .await
}

fn connection(b: &TestBroker, token: Option<&str>) -> Connection {
    let options = ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        token: token.map(str::to_owned),
        ..ConnectOptions::default()
    };
    client::connect_with(&b.url, options).expect("connect")
}

struct Raw {
    publisher: PublisherServiceClient<Transport>,
    subscriber: SubscriberServiceClient<Transport>,
    admin: AdminServiceClient<Transport>,
}

fn raw(b: &TestBroker, token: Option<&str>) -> Raw {
    let c = connection(b, token);
    Raw {
        publisher: PublisherServiceClient::new(c.transport()),
        subscriber: SubscriberServiceClient::new(c.transport()),
        admin: AdminServiceClient::new(c.transport()),
    }
}

fn message(topic: &str) -> proto::Message {
    proto::Message {
        id: uuid::Uuid::now_v7().to_string(),
        topic: topic.into(),
        payload: b"x".to_vec(),
        ..Default::default()
    }
}

/// The code of every RPC of the three services, called with requests
/// that name topic `topic` and subscription `sub`.
async fn every_rpc(r: &mut Raw, topic: &str, sub: &str) -> Vec<(&'static str, Code)> {
    fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
        result.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    let s = sub.to_owned();
    let mut out = vec![
        (
            "Publish",
            code(
                r.publisher
                    .publish(proto::PublishRequest {
                        messages: vec![message(topic)],
                    })
                    .await,
            ),
        ),
        (
            "Pull",
            code(
                r.subscriber
                    .pull(proto::PullRequest {
                        subscription: s.clone(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "Peek",
            code(
                r.subscriber
                    .peek(proto::PeekRequest {
                        subscription: s.clone(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "Ack",
            code(
                r.subscriber
                    .ack(proto::AckRequest {
                        subscription: s.clone(),
                        ack_ids: vec!["x".into()],
                    })
                    .await,
            ),
        ),
        (
            "Nack",
            code(
                r.subscriber
                    .nack(proto::NackRequest {
                        subscription: s.clone(),
                        nacks: vec![proto::Nack {
                            ack_id: "x".into(),
                            ..Default::default()
                        }],
                    })
                    .await,
            ),
        ),
        (
            "ExtendLease",
            code(
                r.subscriber
                    .extend_lease(proto::ExtendLeaseRequest {
                        subscription: s.clone(),
                        extensions: vec![proto::LeaseExtension {
                            ack_id: "x".into(),
                            extension: None,
                        }],
                    })
                    .await,
            ),
        ),
        (
            "CreateTopic",
            code(
                r.admin
                    .create_topic(proto::CreateTopicRequest {
                        topic: Some(proto::Topic {
                            name: "new-topic".into(),
                            ..Default::default()
                        }),
                    })
                    .await,
            ),
        ),
        (
            "GetTopic",
            code(
                r.admin
                    .get_topic(proto::GetTopicRequest { name: topic.into() })
                    .await,
            ),
        ),
        (
            "ListTopics",
            code(
                r.admin
                    .list_topics(proto::ListTopicsRequest::default())
                    .await,
            ),
        ),
        (
            "UpdateTopic",
            code(
                r.admin
                    .update_topic(proto::UpdateTopicRequest {
                        topic: Some(proto::Topic {
                            name: topic.into(),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["retention".into()],
                        }),
                    })
                    .await,
            ),
        ),
        (
            "DeleteTopic",
            code(
                r.admin
                    .delete_topic(proto::DeleteTopicRequest {
                        name: "no-such-topic".into(),
                    })
                    .await,
            ),
        ),
        (
            "CreateSubscription",
            code(
                r.admin
                    .create_subscription(proto::CreateSubscriptionRequest {
                        subscription: Some(proto::Subscription {
                            name: "new-sub".into(),
                            topic: topic.into(),
                            ..Default::default()
                        }),
                    })
                    .await,
            ),
        ),
        (
            "GetSubscription",
            code(
                r.admin
                    .get_subscription(proto::GetSubscriptionRequest { name: s.clone() })
                    .await,
            ),
        ),
        (
            "ListSubscriptions",
            code(
                r.admin
                    .list_subscriptions(proto::ListSubscriptionsRequest::default())
                    .await,
            ),
        ),
        (
            "UpdateSubscription",
            code(
                r.admin
                    .update_subscription(proto::UpdateSubscriptionRequest {
                        subscription: Some(proto::Subscription {
                            name: s.clone(),
                            max_attempts: 5,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["max_attempts".into()],
                        }),
                    })
                    .await,
            ),
        ),
        (
            "DeleteSubscription",
            code(
                r.admin
                    .delete_subscription(proto::DeleteSubscriptionRequest {
                        name: "no-such-sub".into(),
                    })
                    .await,
            ),
        ),
        (
            "GetSubscriptionStats",
            code(
                r.admin
                    .get_subscription_stats(proto::GetSubscriptionStatsRequest {
                        subscription: s.clone(),
                    })
                    .await,
            ),
        ),
        (
            "Seek",
            code(
                r.admin
                    .seek(proto::SeekRequest {
                        subscription: s.clone(),
                        target: Some(proto::seek_request::Target::Sequence(0)),
                    })
                    .await,
            ),
        ),
        (
            "ListDeadLetters",
            code(
                r.admin
                    .list_dead_letters(proto::ListDeadLettersRequest {
                        subscription: s.clone(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "RedriveDeadLetters",
            code(
                r.admin
                    .redrive_dead_letters(proto::RedriveDeadLettersRequest {
                        subscription: s.clone(),
                        sequences: vec![],
                    })
                    .await,
            ),
        ),
        (
            "PurgeDeadLetters",
            code(
                r.admin
                    .purge_dead_letters(proto::PurgeDeadLettersRequest {
                        subscription: s.clone(),
                        all: true,
                        ..Default::default()
                    })
                    .await,
            ),
        ),
    ];
    // The streams: the status arrives with the response or its first item.
    let stream = tokio_stream::iter(vec![proto::PublishStreamRequest {
        messages: vec![message(topic)],
    }]);
    let published = match r.publisher.publish_stream(stream).await {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
        Err(s) => s.code(),
    };
    out.push(("PublishStream", published));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::SubscribeRequest {
        subscription: s.clone(),
        ..Default::default()
    })
    .await
    .expect("first request");
    let subscribed = match r
        .subscriber
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(resp) => {
            match tokio::time::timeout(Duration::from_millis(500), resp.into_inner().message())
                .await
            {
                Ok(Err(s)) => s.code(),
                // Open (nothing to deliver yet) or a delivery: allowed.
                _ => Code::Ok,
            }
        }
        Err(s) => s.code(),
    };
    drop(tx);
    out.push(("Subscribe", subscribed));
    out
}

#[tokio::test]
async fn every_rpc_without_credentials_is_unauthenticated_and_health_stays_open() {
    let dir = TempDir::new().expect("tempdir");
    let b = start(dir.path()).await;
    for token in [None, Some("not-a-known-token")] {
        let mut r = raw(&b, token);
        let codes = every_rpc(&mut r, "orders.created", "billing").await;
        assert_eq!(codes.len(), 23);
        for (rpc, code) in codes {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with token {token:?}");
        }
    }
    let health = client::Admin::new(&connection(&b, None)).health("").await;
    assert!(health.is_ok(), "{health:?}");
    b.stop().await;
}

#[tokio::test]
async fn each_principal_may_do_what_it_is_granted_and_nothing_else() {
    let dir = TempDir::new().expect("tempdir");
    let b = start(dir.path()).await;
    let admin = client::Admin::new(&connection(&b, Some("admin-token")));
    for t in ["orders.created", "billing-topic"] {
        admin.create_topic(t).await.expect("admin creates topics");
    }
    for (name, topic) in [
        ("billing", "orders.created"),
        ("shipping", "orders.created"),
    ] {
        admin
            .create_subscription(tidings::store::NewSubscription {
                name: name.into(),
                topic: topic.into(),
                settings: Default::default(),
                start: tidings::model::StartPosition::Earliest,
            })
            .await
            .expect("admin creates subscriptions");
    }

    // The publisher: orders.* yes, anything else no, no consuming, no admin.
    let mut publisher = raw(&b, Some("publisher-token"));
    publisher
        .publisher
        .publish(proto::PublishRequest {
            messages: vec![message("orders.created")],
        })
        .await
        .expect("publish to orders.created");
    let denied = publisher
        .publisher
        .publish(proto::PublishRequest {
            messages: vec![message("orders.created"), message("billing-topic")],
        })
        .await
        .expect_err("publish to billing-topic");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("billing-topic"),
        "{}",
        denied.message()
    );
    let info = denied
        .get_error_details()
        .error_info()
        .cloned()
        .expect("ErrorInfo");
    assert_eq!(info.reason, "PERMISSION_DENIED");
    assert_eq!(
        info.metadata.get("principal").map(String::as_str),
        Some("order-service")
    );
    assert_eq!(
        info.metadata.get("permission").map(String::as_str),
        Some("publish")
    );
    assert_eq!(
        info.metadata.get("resource").map(String::as_str),
        Some("billing-topic")
    );
    for (rpc, code) in every_rpc(&mut publisher, "orders.created", "billing").await {
        let expected = if rpc.starts_with("Publish") {
            Code::Ok
        } else {
            Code::PermissionDenied
        };
        assert_eq!(code, expected, "publisher: {rpc}");
    }

    // The consumer of billing: its subscription yes, shipping no, no admin.
    let mut consumer = raw(&b, Some("consumer-token"));
    let allowed = [
        "Pull",
        "Peek",
        "Ack",
        "Nack",
        "ExtendLease",
        "GetSubscriptionStats",
        "Subscribe",
    ];
    for (rpc, code) in every_rpc(&mut consumer, "orders.created", "billing").await {
        if allowed.contains(&rpc) {
            assert_ne!(code, Code::PermissionDenied, "consumer of billing: {rpc}");
            assert_ne!(code, Code::Unauthenticated, "consumer of billing: {rpc}");
        } else {
            assert_eq!(code, Code::PermissionDenied, "consumer of billing: {rpc}");
        }
    }
    for (rpc, code) in every_rpc(&mut consumer, "orders.created", "shipping").await {
        assert_eq!(
            code,
            Code::PermissionDenied,
            "consumer of billing on shipping: {rpc}"
        );
    }
    // Its leases work on its own subscription only: an ack id of shipping
    // sent as billing's is not billing's message.
    let pulled = admin_pull(&b, "shipping").await;
    let err = consumer
        .subscriber
        .ack(proto::AckRequest {
            subscription: "billing".into(),
            ack_ids: vec![pulled],
        })
        .await
        .expect_err("another subscription's lease");
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(
        admin.stats("shipping").await.expect("stats").acked,
        0,
        "shipping's message is not acked"
    );

    // The admin may do everything.
    let mut ops = raw(&b, Some("admin-token"));
    for (rpc, code) in every_rpc(&mut ops, "orders.created", "billing").await {
        assert!(
            !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
            "admin: {rpc} gave {code:?}"
        );
    }
    b.stop().await;
}

/// Leases one message of `sub` as the admin; returns its ack id.
async fn admin_pull(b: &TestBroker, sub: &str) -> String {
    let mut ops = raw(b, Some("admin-token"));
    let pulled = ops
        .subscriber
        .pull(proto::PullRequest {
            subscription: sub.into(),
            max_messages: 1,
            max_wait: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("pull")
        .into_inner()
        .messages;
    pulled.first().expect("a message").ack_id.clone()
}

#[tokio::test]
async fn a_changed_access_file_takes_effect_without_a_restart() {
    let dir = TempDir::new().expect("tempdir");
    let path = access_file(dir.path());
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.access_file = Some(path.clone());
        c.network.tls_reload_interval = Duration::from_millis(50);
    })
    .await;
    let admin = client::Admin::new(&connection(&b, Some("admin-token")));
    admin.create_topic("billing-topic").await.expect("topic");
    let mut publisher = raw(&b, Some("publisher-token"));
    let publish = |r: &mut Raw| {
        let mut p = r.publisher.clone();
        async move {
            p.publish(proto::PublishRequest {
                messages: vec![message("billing-topic")],
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code())
        }
    };
    assert_eq!(publish(&mut publisher).await, Err(Code::PermissionDenied));
    let granted = serde_json::json!({"principals": [
        {"name": "ops", "tokens": [hashed("admin-token")], "admin": true},
        {"name": "order-service", "tokens": [hashed("publisher-token")], "publish": ["*"]},
    ]});
    let tmp = dir.path().join("access.json.tmp");
    std::fs::write(&tmp, granted.to_string()).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while publish(&mut publisher).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new rules never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The consumer's token is gone from the file: refused now.
    let mut consumer = raw(&b, Some("consumer-token"));
    let e = consumer
        .subscriber
        .peek(proto::PeekRequest {
            subscription: "billing".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token no longer listed");
    assert_eq!(e.code(), Code::Unauthenticated);
    b.stop().await;
}

#[tokio::test]
async fn a_json_web_token_of_the_identity_provider_names_its_principal() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let dir = TempDir::new().expect("tempdir");
    let idp = rcgen::KeyPair::generate().expect("key");
    std::fs::write(dir.path().join("idp.pem"), idp.public_key_pem()).expect("write key");
    let rules = serde_json::json!({
        "principals": [
            {"name": "ops", "tokens": [hashed("admin-token")], "admin": true},
            {"name": "billing-service", "consume": ["billing"]},
        ],
        "jwt": {"keys": ["idp.pem"], "issuer": "https://idp.test", "audience": "tidings"},
    });
    let path = dir.path().join("access.json");
    std::fs::write(&path, rules.to_string()).expect("access file");
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.access_file = Some(path);
    })
    .await;
    let admin = client::Admin::new(&connection(&b, Some("admin-token")));
    admin.create_topic("orders").await.expect("topic");
    for name in ["billing", "shipping"] {
        admin
            .create_subscription(tidings::store::NewSubscription {
                name: name.into(),
                topic: "orders".into(),
                settings: Default::default(),
                start: tidings::model::StartPosition::Earliest,
            })
            .await
            .expect("subscription");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let sign = |key: &rcgen::KeyPair, claims: serde_json::Value| {
        let key = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signing key");
        encode(&Header::new(Algorithm::ES256), &claims, &key).expect("sign")
    };
    let claims = |sub: &str, aud: &str, exp: u64| serde_json::json!({"sub": sub, "iss": "https://idp.test", "aud": aud, "exp": exp});
    let peek = |token: String, sub: &'static str| {
        let mut r = raw(&b, Some(&token));
        async move {
            r.subscriber
                .peek(proto::PeekRequest {
                    subscription: sub.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned()))
        }
    };
    let good = sign(&idp, claims("billing-service", "tidings", now + 600));
    assert_eq!(peek(good.clone(), "billing").await, Ok(()));
    let denied = peek(good, "shipping")
        .await
        .expect_err("not its subscription");
    assert_eq!(denied.0, Code::PermissionDenied, "{denied:?}");
    let other_key = rcgen::KeyPair::generate().expect("key");
    for (token, why) in [
        (
            sign(&idp, claims("billing-service", "tidings", now - 600)),
            "expired",
        ),
        (
            sign(
                &idp,
                claims("billing-service", "another-service", now + 600),
            ),
            "wrong audience",
        ),
        (
            sign(&other_key, claims("billing-service", "tidings", now + 600)),
            "another key",
        ),
        (
            sign(&idp, claims("mallory", "tidings", now + 600)),
            "no such principal",
        ),
    ] {
        let refused = peek(token, "billing").await.expect_err(why);
        assert_eq!(refused.0, Code::Unauthenticated, "{why}: {refused:?}");
    }
    b.stop().await;
}

/// Whether a reflection call without credentials is answered.
async fn reflection_answers(b: &TestBroker) -> Result<(), Code> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut client = ServerReflectionClient::new(connection(b, None).channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .map_err(|s| s.code())?
        .into_inner();
    stream.message().await.map(|_| ()).map_err(|s| s.code())
}

#[tokio::test]
async fn reflection_is_open_unless_told_otherwise() {
    let dir = TempDir::new().expect("tempdir");
    let b = start(dir.path()).await;
    assert_eq!(reflection_answers(&b).await, Ok(()));
    b.stop().await;
    let path = access_file(dir.path());
    let b = TestBroker::start_with(Backend::Sqlite, |c: &mut ServerConfig| {
        c.access_file = Some(path);
        c.public_reflection = false;
    })
    .await;
    assert_eq!(reflection_answers(&b).await, Err(Code::Unauthenticated));
    b.stop().await;
}
