//! Network faults, through the cutting proxy of `proxy.rs`: between the
//! clients and the broker, and between the broker and PostgreSQL. A black
//! hole drops every byte both ways and resets nothing; a reset closes every
//! open connection; a freeze (database link only) leaves the open
//! connections silent for ever.

use tokio::time::sleep;

use super::broker::{BrokerProcess, Storage};
use super::load::LoadConfig;
use super::postgres::SHORT_BOUNDS;
use super::{Fresh, Params, Run, label, postgres_admin_url};
use crate::harness::{Backend, backend_test};
use crate::proxy::{Proxy, through, upstream_of};

backend_test! {
    /// Cuts between the clients and the broker: black holes longer and
    /// shorter than the clients' deadlines, resets, and a black hole ended
    /// by a reset.
    async fn cut_links_between_clients_and_broker_lose_nothing(backend) {
        let params = Params::from_env();
        let fresh = Fresh::new(&backend).await;
        let broker = BrokerProcess::start(fresh.storage(), &[]).await;
        let proxy = Proxy::start(broker.addr()).await;
        let name = format!("client-broker link cut on {}", label(&backend));
        let config = LoadConfig::new(params.seed);
        let via = format!("http://{}", proxy.addr());
        let mut run = Run::start(&name, &via, params, config).await;
        for cycle in 0..params.cycles {
            run.next_cycle().await;
            let span = config.call_timeout / 2 + run.fault_span();
            match cycle % 3 {
                0 => {
                    proxy.black_hole();
                    sleep(span).await;
                    proxy.heal();
                }
                1 => proxy.reset(),
                _ => {
                    proxy.black_hole();
                    sleep(span).await;
                    proxy.reset();
                    proxy.heal();
                }
            }
        }
        run.recovered().await;
        run.finish(&broker.url()).await;
        drop(broker);
        fresh.remove().await;
    }
}

/// Cuts between the broker and PostgreSQL: black holes, resets and frozen
/// connections, which the broker must notice by its own deadlines.
#[tokio::test]
async fn cut_links_between_broker_and_postgres_lose_nothing() {
    let Some(admin_url) = postgres_admin_url() else {
        return;
    };
    let params = Params::from_env();
    let fresh = Fresh::new(&Backend::Postgres(admin_url.clone())).await;
    let proxy = Proxy::start(upstream_of(&admin_url)).await;
    let Storage::Postgres(url) = fresh.storage() else {
        unreachable!("a PostgreSQL backend has a database URL");
    };
    let storage = Storage::Postgres(through(&url, proxy.addr()));
    let broker = BrokerProcess::start(storage, &SHORT_BOUNDS).await;
    let name = "broker-PostgreSQL link cut";
    let mut run = Run::start(name, &broker.url(), params, LoadConfig::new(params.seed)).await;
    for cycle in 0..params.cycles {
        run.next_cycle().await;
        match cycle % 3 {
            0 => {
                proxy.black_hole();
                sleep(run.fault_span()).await;
                proxy.heal();
            }
            1 => proxy.reset(),
            _ => proxy.freeze(),
        }
    }
    run.recovered().await;
    run.finish(&broker.url()).await;
    drop(broker);
    drop(proxy);
    fresh.remove().await;
}
