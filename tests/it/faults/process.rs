//! Process faults: the broker killed with SIGKILL and restarted on its
//! storage, and the broker frozen with SIGSTOP and thawed with SIGCONT.

use tokio::time::sleep;

use super::broker::BrokerProcess;
use super::load::LoadConfig;
use super::{Fresh, Params, Run, label};
use crate::harness::backend_test;

backend_test! {
    /// SIGKILL under load, again and again, each time restarted on the same
    /// storage and address after clients met a refused port for a moment.
    async fn sigkill_and_restart_under_load_lose_nothing(backend) {
        let params = Params::from_env();
        let fresh = Fresh::new(&backend).await;
        let mut broker = BrokerProcess::start(fresh.storage(), &[]).await;
        let name = format!("SIGKILL on {}", label(&backend));
        let mut run = Run::start(&name, &broker.url(), params, LoadConfig::new(params.seed)).await;
        for _ in 0..params.cycles {
            run.next_cycle().await;
            broker.kill().await;
            sleep(run.fault_span() / 4).await;
            broker.restart().await;
        }
        run.recovered().await;
        run.finish(&broker.url()).await;
        drop(broker);
        fresh.remove().await;
    }
}

backend_test! {
    /// SIGSTOP under load: the broker holds its connections open and answers
    /// nothing, longer than the clients' deadlines, so calls time out and
    /// clients reconnect; after SIGCONT everything carries on.
    async fn sigstop_and_sigcont_under_load_lose_nothing(backend) {
        let params = Params::from_env();
        let fresh = Fresh::new(&backend).await;
        let broker = BrokerProcess::start(fresh.storage(), &[]).await;
        let name = format!("SIGSTOP on {}", label(&backend));
        let config = LoadConfig::new(params.seed);
        let mut run = Run::start(&name, &broker.url(), params, config).await;
        for _ in 0..params.cycles {
            run.next_cycle().await;
            broker.freeze();
            sleep(config.call_timeout + run.fault_span()).await;
            broker.thaw();
        }
        run.recovered().await;
        let summary = run.finish(&broker.url()).await;
        assert!(
            summary.failure_kinds.get("timeout").is_some_and(|&n| n > 0),
            "{name}: no call timed out, so the fault did not bite"
        );
        drop(broker);
        fresh.remove().await;
    }
}
