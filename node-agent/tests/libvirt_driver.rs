#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The libvirt driver against libvirt itself (its built-in test driver, `test:///default`,
//! whose state every connection of this process shares): create, lookup, idempotent retry,
//! delete, and the failure paths. The foreign domain `test` that the test driver starts with
//! is counted and never touched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use node_agent::config::{DomainTypeSetting, LibvirtConfig};
use node_agent::driver::libvirt::LibvirtDriver;
use node_agent::driver::libvirt::xml::{domain_name, domain_uuid};
use node_agent::driver::{BuildLog, Driver, DriverError, LogEvent, VmSpec};
use placement::{ClaimToken, Epoch, NodeId, RequestId, Resources};
use virt::connect::Connect;

fn cfg(dir: &std::path::Path) -> LibvirtConfig {
    LibvirtConfig {
        uri: "test:///default".into(),
        domain_type: DomainTypeSetting::Auto,
        pool: "updraft-drv".into(),
        instances_dir: dir.join("instances"),
        console_dir: dir.join("console"),
        network: "network:default".into(),
        ..Default::default()
    }
}

fn vm(id: &str, token: u64) -> VmSpec {
    VmSpec {
        request: RequestId::new(id).unwrap(),
        resources: Resources::new(2, 1024, 10),
        image: None,
        metadata: BTreeMap::from([("owner".to_string(), "team-a".to_string())]),
        node: NodeId::new("node-a").unwrap(),
        epoch: Epoch(1),
        token: ClaimToken(token),
    }
}

fn driver(dir: &std::path::Path) -> (LibvirtDriver, PathBuf) {
    let log = dir.join("driver-log.jsonl");
    let d = LibvirtDriver::new(
        NodeId::new("node-a").unwrap(),
        cfg(dir),
        BuildLog::new(log.clone()),
    )
    .unwrap();
    (d, log)
}

fn test_conn() -> Connect {
    Connect::open(Some("test:///default")).unwrap()
}

#[tokio::test]
async fn create_find_retry_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (d, log) = driver(dir.path());
    d.health().await.unwrap();
    let host = d.host().await.unwrap().unwrap();
    assert!(host.0 > 0 && host.1 > 0, "{host:?}");

    let spec = vm("drv-a", 7);
    let info = d.create(&spec).await.unwrap();
    assert!(info.running);
    assert_eq!(info.name, "updraft-drv-a");
    assert_eq!(info.request, Some(spec.request.clone()));
    assert_eq!(info.resources, spec.resources);
    assert_eq!(d.domain_type().map(|t| t.as_str()), Some("test"));

    // libvirt itself has it, under the derived name and UUID, with its disk in the pool
    let conn = test_conn();
    let dom = conn.lookup_domain_by_name("updraft-drv-a").unwrap();
    assert!(dom.is_active().unwrap());
    assert_eq!(
        dom.uuid_string().unwrap(),
        domain_uuid(&spec.request).to_string()
    );
    let pool = conn.lookup_storage_pool_by_name("updraft-drv").unwrap();
    pool.lookup_storage_vol_by_name("updraft-drv-a.qcow2")
        .unwrap();
    let xml = dom.xml_desc(0).unwrap();
    assert!(
        xml.contains("https://updraft.dev/xmlns/instance/1"),
        "{xml}"
    );

    // a retry under the same claim finds the domain; nothing new is made
    let again = d.create(&spec).await.unwrap();
    assert_eq!(again.name, info.name);
    // listed as ours, with the claim token; the test driver's own `test` domain is foreign
    let all = d.list().await.unwrap();
    let ours = all
        .iter()
        .find(|i| i.request.as_ref() == Some(&spec.request))
        .unwrap();
    assert_eq!(ours.token, Some(ClaimToken(7)));
    let foreign = all.iter().find(|i| i.name == "test").unwrap();
    assert!(foreign.request.is_none());
    assert!(foreign.resources.vcpus > 0 && foreign.resources.memory_mib > 0);

    // a new claim of the same request replaces what an older claim left
    let newer = vm("drv-a", 8);
    d.create(&newer).await.unwrap();
    let listed = d.list().await.unwrap();
    let mine: Vec<_> = listed
        .iter()
        .filter(|i| i.request.as_ref() == Some(&spec.request))
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].token, Some(ClaimToken(8)));

    // delete: domain and disk gone; a second delete is success
    d.destroy(&spec.request).await.unwrap();
    assert!(conn.lookup_domain_by_name("updraft-drv-a").is_err());
    assert!(
        pool.lookup_storage_vol_by_name("updraft-drv-a.qcow2")
            .is_err()
    );
    d.destroy(&spec.request).await.unwrap();
    // the foreign domain is untouched
    assert!(
        conn.lookup_domain_by_name("test")
            .unwrap()
            .is_active()
            .unwrap()
    );

    // the driver's own log saw every create and the one destroy that removed a domain
    let entries = BuildLog::read(&log).unwrap();
    let created = entries
        .iter()
        .filter(|e| e.event == LogEvent::Created)
        .count();
    let destroyed = entries
        .iter()
        .filter(|e| e.event == LogEvent::Destroyed)
        .count();
    assert_eq!((created, destroyed), (3, 1));
}

#[tokio::test]
async fn failures_carry_libvirts_text_and_touch_nothing_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = driver(dir.path());
    let conn = test_conn();

    // an image that is not in the pool
    let mut spec = vm("drv-img", 1);
    spec.image = Some("no-such-image.qcow2".into());
    match d.create(&spec).await {
        Err(DriverError::Rejected(t)) => {
            assert!(
                t.contains("no-such-image.qcow2") && t.contains("not found"),
                "{t}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.lookup_domain_by_name("updraft-drv-img").is_err());

    // libvirt refuses the definition: another domain already holds the derived UUID
    let clash = vm("drv-clash", 1);
    let squatter = format!(
        "<domain type='test'><name>squatter</name><uuid>{}</uuid><memory>1024</memory>\
         <vcpu>1</vcpu><os><type>hvm</type></os></domain>",
        domain_uuid(&clash.request)
    );
    conn.define_domain_xml(&squatter).unwrap();
    match d.create(&clash).await {
        Err(DriverError::Rejected(t)) => assert!(t.contains("define domain"), "{t}"),
        other => panic!("{other:?}"),
    }
    // its disk was cleaned up with it
    let pool = conn.lookup_storage_pool_by_name("updraft-drv").unwrap();
    assert!(
        pool.lookup_storage_vol_by_name("updraft-drv-clash.qcow2")
            .is_err()
    );
    conn.lookup_domain_by_name("squatter")
        .unwrap()
        .undefine()
        .unwrap();

    // a domain with our name but without our metadata is never destroyed
    let foreign_id = RequestId::new("drv-foreign").unwrap();
    let foreign = format!(
        "<domain type='test'><name>{}</name><memory>1024</memory><vcpu>1</vcpu>\
         <os><type>hvm</type></os></domain>",
        domain_name(&foreign_id)
    );
    conn.define_domain_xml(&foreign).unwrap();
    assert!(matches!(
        d.destroy(&foreign_id).await,
        Err(DriverError::Rejected(_))
    ));
    assert!(matches!(
        d.create(&vm("drv-foreign", 1)).await,
        Err(DriverError::Rejected(_))
    ));
    let still = conn.lookup_domain_by_name("updraft-drv-foreign").unwrap();
    still.undefine().unwrap();

    // more disk than the pool has
    let mut huge = vm("drv-huge", 1);
    huge.resources.disk_gib = 1 << 30;
    match d.create(&huge).await {
        Err(DriverError::Exhausted(t)) => assert!(t.contains("create disk"), "{t}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_libvirt_is_unavailable_and_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.uri = format!(
        "qemu+unix:///system?socket={}",
        dir.path().join("no-libvirtd.sock").display()
    );
    let d = LibvirtDriver::new(
        NodeId::new("node-a").unwrap(),
        c,
        BuildLog::in_dir(dir.path()),
    )
    .unwrap();
    match d.health().await {
        Err(DriverError::Unavailable(t)) => assert!(t.contains("connect"), "{t}"),
        other => panic!("{other:?}"),
    }
    // the next call inside the backoff does not hammer the socket, and says when it retries
    match d.create(&vm("drv-down", 1)).await {
        Err(DriverError::Unavailable(t)) => assert!(t.contains("next attempt"), "{t}"),
        other => panic!("{other:?}"),
    }
    assert!(d.list().await.is_err());
}
