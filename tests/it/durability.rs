//! Restarts: nothing committed is lost.

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::{TestBroker, backend_test, ms, payload, pb};

backend_test! {
    async fn server_restarted_on_the_same_data_dir_loses_nothing(backend) {
        let b = TestBroker::start(backend).await;
        // The abandoned leases must run out soon after the restart, but
        // every later lease must outlast a pull and its ack on a loaded
        // machine (at 300 ms, an ack on a busy CI machine came too late).
        b.topic_and_sub("t", "s", |s| s.ack_deadline = Some(pb(ms(2000))))
            .await;
        let payloads: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        b.publish("t", &refs).await;
        // Ack the first ten, lease (and abandon) the next ten.
        let first = b.pull("s", 10, Duration::from_secs(5)).await;
        b.ack("s", first.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .unwrap();
        let abandoned = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(abandoned.len(), 10);

        let b = b.restart().await;
        let stats = b.stats("s").await;
        assert_eq!(stats.acked, 10);
        assert_eq!(stats.backlog, 90);
        let mut seen = HashSet::new();
        while seen.len() < 90 {
            let got = b.pull("s", 100, Duration::from_secs(5)).await;
            assert!(
                !got.is_empty(),
                "everything unacked comes back, {} so far",
                seen.len()
            );
            for m in &got {
                assert!(
                    seen.insert(payload(m)),
                    "no duplicate within one lease round"
                );
            }
            b.ack("s", got.iter().map(|m| m.ack_id.clone()).collect())
                .await
                .unwrap();
        }
        let expected: HashSet<String> = payloads[10..].iter().cloned().collect();
        assert_eq!(seen, expected);
        assert_eq!(b.stats("s").await.backlog, 0);
        // Sequence numbers continue after the restart.
        assert_eq!(b.publish("t", &["after"]).await, vec![101]);
        b.stop().await;
    }
}
