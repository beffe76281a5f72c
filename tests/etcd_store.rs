//! The etcd store against a real etcd: event order, and racing allocations.

mod common;

use common::Etcd;
use loopmesh::addresses::AddressPool;
use loopmesh::config::EtcdConfig;
use loopmesh::store::etcd::EtcdStore;
use loopmesh::store::{Change, Store, StoreEvent};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

fn store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::new(EtcdConfig::with_endpoints(vec![etcd.endpoint()]), "/lm").unwrap()
}

/// The revision a write committed at.
fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("etcd answers with a header").revision()
}

async fn next(rx: &mut mpsc::Receiver<StoreEvent>) -> StoreEvent {
    tokio::time::timeout(common::PATIENCE, rx.recv())
        .await
        .expect("store event in time")
        .expect("store running")
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_every_revision_in_order() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    client.put("/lm/services/before", "port: 1", None).await.unwrap();
    client.put("/other/ignored", "x", None).await.unwrap();

    let store = Arc::new(store(&etcd));
    let (tx, mut rx) = mpsc::channel(64);
    let runner = store.clone();
    tokio::spawn(async move { runner.sync(tx).await });

    let StoreEvent::Snapshot {
        revision: snap,
        entries,
    } = next(&mut rx).await
    else {
        panic!("the first event must be a snapshot")
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, "services/before");
    assert_eq!(next(&mut rx).await, StoreEvent::Reachable);

    let mut written = Vec::new();
    for i in 0..50 {
        let key = format!("/lm/instances/a/i{i}");
        let put = client.put(key, format!("n: {i}"), None).await.unwrap();
        written.push(revision_of(put.header()));
    }
    let deleted = client.delete("/lm/instances/a/i7", None).await.unwrap();
    let rev = revision_of(deleted.header());
    written.push(rev);

    let mut seen = Vec::new();
    while seen.len() < written.len() {
        match next(&mut rx).await {
            StoreEvent::Changes { revision, changes } => {
                assert_eq!(changes.len(), 1);
                if revision == rev {
                    assert_eq!(changes[0], Change::Delete("instances/a/i7".into()));
                }
                seen.push(revision);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, written, "every revision, once, in order");
    assert!(written[0] > snap);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_arrives_as_one_batch() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let store = Arc::new(store(&etcd));
    let (tx, mut rx) = mpsc::channel(64);
    let runner = store.clone();
    tokio::spawn(async move { runner.sync(tx).await });
    assert!(matches!(next(&mut rx).await, StoreEvent::Snapshot { .. }));
    assert_eq!(next(&mut rx).await, StoreEvent::Reachable);

    let ops: Vec<_> = (0..10)
        .map(|i| etcd_client::TxnOp::put(format!("/lm/services/s{i}"), "port: 1", None))
        .collect();
    client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    match next(&mut rx).await {
        StoreEvent::Changes { changes, .. } => assert_eq!(changes.len(), 10),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_allocations_from_many_clients_agree_and_never_collide() {
    let etcd = Etcd::start();
    // A small pool makes stable-hash collisions between services likely.
    let pool = AddressPool::parse("127.100.0.0/26").unwrap();
    let services: Vec<String> = (0..40).map(|i| format!("svc-{i}")).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _agent in 0..6 {
        let store = Arc::new(store(&etcd));
        for service in services.clone() {
            let store = store.clone();
            tasks.spawn(async move {
                let mut last_err = None;
                for _ in 0..20 {
                    match store.allocate_address(&service, &pool).await {
                        Ok(addr) => return (service, addr),
                        Err(err) => last_err = Some(err.to_string()),
                    }
                }
                panic!("allocation for {service} kept failing: {last_err:?}");
            });
        }
    }
    let mut agreed: HashMap<String, std::net::Ipv4Addr> = HashMap::new();
    while let Some(result) = tasks.join_next().await {
        let (service, addr) = result.unwrap();
        assert!(pool.contains(addr));
        let first = *agreed.entry(service.clone()).or_insert(addr);
        assert_eq!(first, addr, "{service} got two different addresses");
    }
    let distinct: HashSet<_> = agreed.values().collect();
    assert_eq!(
        distinct.len(),
        services.len(),
        "an address was handed to two services"
    );

    // And etcd holds exactly what the callers were told.
    let mut client = etcd.client().await;
    for (service, addr) in &agreed {
        let got = client
            .get(format!("/lm/addresses/{service}"), None)
            .await
            .unwrap();
        assert_eq!(got.kvs()[0].value_str().unwrap(), addr.to_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_etcd_is_reported_and_then_recovered() {
    let mut etcd = Etcd::start();
    let mut config = EtcdConfig::with_endpoints(vec![etcd.endpoint()]);
    config.retry_max = Duration::from_millis(200);
    config.request_timeout = Duration::from_secs(1);
    let store = Arc::new(EtcdStore::new(config, "/lm").unwrap());
    etcd.stop();
    let (tx, mut rx) = mpsc::channel(64);
    let runner = store.clone();
    tokio::spawn(async move { runner.sync(tx).await });
    match next(&mut rx).await {
        StoreEvent::Unreachable { reason } => assert!(reason.contains(&etcd.endpoint()), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    etcd.restart();
    loop {
        match next(&mut rx).await {
            StoreEvent::Unreachable { .. } => continue,
            StoreEvent::Snapshot { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(next(&mut rx).await, StoreEvent::Reachable);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_larger_than_one_page_is_complete_and_consistent() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    for batch in 0..45 {
        let ops: Vec<_> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                etcd_client::TxnOp::put(
                    format!("/lm/instances/big/i{n:05}"),
                    format!("{{host: h{n}, port: 1}}"),
                    None,
                )
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let (revision, entries) = store(&etcd).snapshot().await.unwrap();
    assert_eq!(entries.len(), 4500);
    let keys: Vec<_> = entries.iter().map(|e| e.key.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "pages must neither overlap nor skip");
    assert_eq!(
        revision,
        client.get("x", None).await.unwrap().header().unwrap().revision()
    );
}
