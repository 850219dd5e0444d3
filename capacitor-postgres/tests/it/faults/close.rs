//! Close ends scans and every operation.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_scans_and_every_operation() {
    within(TEST_TIMEOUT, async {
        let table = unique_table("close");
        let _guard = TableGuard(table.clone());
        let layer = builder(&table)
            .scan_page_size(2)
            .build::<String, String>()
            .await
            .expect("build");
        for i in 0..6 {
            layer.set(&format!("k{i}"), &s("v"), None).await.expect("set");
        }
        let mut stream = layer.scan(b"k").expect("scan");
        assert!(next(&mut stream).await.expect("item").is_ok());
        layer.close().await.expect("close");
        assert!(layer.pool().is_closed());
        assert_eq!(
            next(&mut stream)
                .await
                .expect("an item")
                .map(drop)
                .map_err(|e| e.kind()),
            Err(ErrorKind::Closed)
        );
        assert!(next(&mut stream).await.is_none(), "then the stream ends");
        assert_eq!(kind(layer.scan(b"k").map(drop)), ErrorKind::Closed);
        assert_eq!(kind(layer.get_many(&[s("k1")]).await), ErrorKind::Closed);
        assert_eq!(kind(layer.get_many(&[]).await), ErrorKind::Closed);
        assert_eq!(kind(layer.set_many(&[], None).await), ErrorKind::Closed);
        assert_eq!(kind(layer.delete_many(&[s("k1")]).await), ErrorKind::Closed);
        assert_eq!(
            kind(layer.apply_atomic(&[WriteOp::Delete { key: s("k1") }]).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(layer.flush().await), ErrorKind::Closed);
        layer.close().await.expect("idempotent");
    })
    .await;
}
