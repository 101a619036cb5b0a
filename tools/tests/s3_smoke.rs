//! The local Ceph engine seen from Rust (issue 16): the `object_store` S3 client against the
//! RGW that tools/ceph/start.sh starts (put, get, ranged get, head, list, delete, not-found),
//! the gateway stopped and started again with tools/ceph/rgw.sh, and a whole cluster stopped
//! and restarted with its objects kept. See tests/common/s3.rs for where the store comes from.

mod common;

use std::time::{Duration, Instant};

use common::s3::{runtime, s3, test_prefix, Ceph};
use common::*;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Bytes a test can recognise at any offset (a read at the wrong place gives other bytes).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8).collect()
}

#[test]
fn object_store_round_trip() {
    let Some(s3) = s3() else { return };
    let store = s3.store();
    let rt = runtime();
    let prefix = test_prefix();
    let big = ObjPath::from(format!("{prefix}/layers/big"));
    let small = ObjPath::from(format!("{prefix}/layers/sub/small"));
    let big_data = pattern(5 * MIB as usize + 123, 1);
    let small_data = pattern(4096, 2);

    rt.block_on(async {
        store.put(&big, PutPayload::from(big_data.clone())).await.expect("put big");
        store.put(&small, PutPayload::from(small_data.clone())).await.expect("put small");

        let got = store.get(&big).await.expect("get big").bytes().await.expect("body of big");
        assert!(got[..] == big_data[..], "GET of {big} gave {} bytes, not the {} put", got.len(), big_data.len());

        // A ranged read across the 4 MiB stripe boundary of RGW.
        let range = 4 * MIB - 1000..4 * MIB + 3096;
        let part = store.get_range(&big, range.clone()).await.expect("ranged get");
        assert_eq!(&part[..], &big_data[range.start as usize..range.end as usize], "ranged GET {range:?}");

        let meta = store.head(&small).await.expect("head small");
        assert_eq!(meta.size, 4096);

        let mut listed: Vec<(String, u64)> = store
            .list(Some(&ObjPath::from(prefix.as_str())))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .expect("list");
        listed.sort();
        assert_eq!(
            listed,
            vec![(big.to_string(), big_data.len() as u64), (small.to_string(), 4096)],
            "listing of {prefix}"
        );
        let dirs = store.list_with_delimiter(Some(&ObjPath::from(format!("{prefix}/layers")))).await.expect("list /");
        assert_eq!(dirs.objects.len(), 1, "{dirs:?}");
        assert_eq!(dirs.common_prefixes, vec![ObjPath::from(format!("{prefix}/layers/sub"))]);

        store.delete(&big).await.expect("delete big");
        store.delete(&small).await.expect("delete small");
        match store.get(&big).await {
            Err(object_store::Error::NotFound { .. }) => {}
            other => panic!("GET of a deleted object: expected NotFound, got {:?}", other.map(|r| r.meta)),
        }
        let left: Vec<_> = store.list(Some(&ObjPath::from(prefix.as_str()))).try_collect().await.expect("list");
        assert!(left.is_empty(), "left after delete: {left:?}");
    });
}

#[test]
fn rgw_stopped_then_started_again() {
    let Some(ceph) = Ceph::start() else { return };
    // No retries: each request tells at once whether the gateway answers.
    let store = ceph.s3().store_with_retries(0, Duration::from_secs(5));
    let rt = runtime();
    let key = ObjPath::from("survives/rgw-restart");
    let data = pattern(MIB as usize, 3);
    rt.block_on(store.put(&key, PutPayload::from(data.clone()))).expect("put before the stop");

    let said = ceph.rgw_stop();
    assert!(said.contains("stopped rgw"), "rgw.sh stop said: {said}");
    let t = Instant::now();
    let err = rt.block_on(store.get_range(&key, 0..4096)).expect_err("a GET with radosgw stopped succeeded");
    assert!(!matches!(err, object_store::Error::NotFound { .. }), "a stopped gateway is not a missing object: {err}");
    assert!(t.elapsed() < Duration::from_secs(5), "the failed GET took {:?}", t.elapsed());

    let said = ceph.rgw_start();
    assert!(said.contains("S3 answers"), "rgw.sh start said: {said}");
    let got = rt.block_on(async { store.get(&key).await?.bytes().await }).expect("GET after the gateway came back");
    assert!(got[..] == data[..], "the object read after the restart differs from the one written");
    let key2 = ObjPath::from("written/after-rgw-restart");
    rt.block_on(store.put(&key2, PutPayload::from(pattern(8192, 4)))).expect("put after the restart");
    assert_eq!(rt.block_on(store.head(&key2)).expect("head").size, 8192);
}

#[test]
fn cluster_stopped_and_restarted_keeps_objects() {
    let Some(ceph) = Ceph::start() else { return };
    let rt = runtime();
    let key = ObjPath::from("survives/cluster-restart");
    let data = pattern(3 * MIB as usize, 5);
    rt.block_on(ceph.s3().store().put(&key, PutPayload::from(data.clone()))).expect("put");

    // A running cluster is not started twice.
    let refused = ceph.start_script().expect_err("start.sh on a running cluster succeeded");
    assert!(refused.contains("is running"), "{refused}");

    let said = ceph.stop();
    assert!(said.contains("stopped rgw") && said.contains("osd") && said.contains("mon"), "stop.sh said: {said}");
    assert!(!said.contains("killed"), "stop.sh had to kill: {said}");
    let again = ceph.stop();
    assert!(again.contains("nothing running"), "a second stop.sh said: {again}");
    let store = ceph.s3().store_with_retries(0, Duration::from_secs(5));
    rt.block_on(store.head(&key)).expect_err("HEAD with the cluster stopped succeeded");

    let said = ceph.restart();
    assert!(said.contains("restarted"), "start.sh on the stopped DIR said: {said}");
    let got = rt.block_on(async { store.get(&key).await?.bytes().await }).expect("GET after the restart");
    assert!(got[..] == data[..], "the object read after the restart differs from the one written");
}
