//! `PostgresBus` against the real PostgreSQL: two composers kept coherent, the bus on its
//! own (delivery, own messages skipped, `All` on subscribe), reconnection of both
//! connections after their backends are terminated, and the typed errors (an unknown
//! database, a bad channel, a closed bus, a message too large, a server that is down).
//! Each test has a channel (and an `application_name`) of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capacitor_core::{
    BusMessage, Change, ErrorKind, Invalidation, InvalidationBus, InvalidationSink, LayerConfig, MultiLayer,
};
use capacitor_memory::MokaLayer;
use capacitor_postgres::{PostgresBus, PostgresLayer};
use tokio::time::Instant;

use crate::common::{admin, unique_table, url, url_with, TableGuard};

/// A channel (also used as `application_name`) unique to this call.
fn unique_channel(what: &str) -> String {
    unique_table(&format!("bus_{what}"))
}

/// A bus on `channel`, its connections named `channel` in `pg_stat_activity`.
fn bus(channel: &str) -> PostgresBus {
    bus_as(channel, channel)
}

/// A bus on `channel`, its connections named `app` in `pg_stat_activity`.
fn bus_as(channel: &str, app: &str) -> PostgresBus {
    PostgresBus::builder()
        .url(url_with(&format!("application_name={app}")))
        .channel(channel)
        .build()
        .expect("bus")
}

/// What a [`recorder`] sink received.
type Seen = Arc<Mutex<Vec<Invalidation<String>>>>;

/// A sink recording what it receives.
fn recorder() -> (InvalidationSink<String>, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&seen);
    let sink: InvalidationSink<String> = Arc::new(move |i| into.lock().unwrap().push(i));
    (sink, seen)
}

/// Polls `check` every 20 ms for at most 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "not within 5 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alls(seen: &Mutex<Vec<Invalidation<String>>>) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|i| matches!(i, Invalidation::All))
        .count()
}

fn messages(seen: &Mutex<Vec<Invalidation<String>>>) -> Vec<BusMessage<String>> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|i| match i {
            Invalidation::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn keys(key: &str) -> Change<String> {
    Change::Keys(vec![key.to_owned()])
}

/// Terminates the backends named `app` whose last query starts with `query`, returning
/// how many.
async fn terminate(app: &str, query: &str) -> i64 {
    let admin = admin().await;
    let rows = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE $2 AND pid <> pg_backend_pid()",
            &[&app, &format!("{query}%")],
        )
        .await
        .unwrap();
    i64::try_from(rows.len()).unwrap()
}

async fn composer(table: &str, bus: Arc<PostgresBus>) -> MultiLayer<String, String> {
    let postgres = PostgresLayer::builder()
        .url(url())
        .table(table)
        .sweeper(false)
        .build::<String, String>()
        .await
        .expect("PostgreSQL layer");
    let moka = MokaLayer::builder().max_capacity(10_000).build().unwrap();
    MultiLayer::builder()
        .layer(LayerConfig::new("moka", moka))
        .layer(LayerConfig::new("postgres", postgres))
        .invalidation_bus(bus)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bus_keeps_two_composers_l1_coherent() {
    let table = unique_table("bus2");
    let _guard = TableGuard(table.clone());
    let channel = unique_channel("two");
    let (bus_a, bus_b) = (Arc::new(bus(&channel)), Arc::new(bus(&channel)));
    bus_a.connect().await.unwrap();
    bus_b.connect().await.unwrap();
    let a = composer(&table, bus_a.clone()).await;
    let b = composer(&table, bus_b.clone()).await;
    let key = "user:1".to_owned();
    a.set(key.clone(), "v1".into()).await.unwrap();
    assert_eq!(b.get(&key).await.unwrap(), Some("v1".into())); // now in B's L1

    a.set(key.clone(), "v2".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get(&key).await.unwrap() != Some("v2".into()) {
        assert!(Instant::now() < deadline, "B still serves its stale L1 after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    a.delete(&key).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get(&key).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "B still serves a deleted key after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = b.stats().bus.expect("B has a bus").received;
    assert!(received > 0, "B received no bus message");
    a.close().await.unwrap();
    b.close().await.unwrap();
    bus_a.close().await.unwrap();
    bus_b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bus_delivers_others_messages_not_its_own_and_all_on_subscribe() {
    let channel = unique_channel("direct");
    let (a, b) = (bus(&channel), bus(&channel));
    assert_eq!(a.channel(), channel);
    assert_ne!(a.instance_id(), b.instance_id());
    let (sink_a, seen_a) = recorder();
    let (sink_b, seen_b) = recorder();
    InvalidationBus::<String>::subscribe(&a, sink_a).unwrap();
    InvalidationBus::<String>::subscribe(&b, sink_b).unwrap();
    InvalidationBus::<String>::connect(&a).await.unwrap();
    InvalidationBus::<String>::connect(&b).await.unwrap();
    assert!(a.is_connected() && b.is_connected());
    eventually("All after the first LISTEN", || alls(&seen_b) == 1).await;

    let message = BusMessage::new(1, 1, keys("k"));
    a.publish(&message).await.unwrap();
    eventually("B receives A's message", || !messages(&seen_b).is_empty()).await;
    assert_eq!(messages(&seen_b), vec![message]);
    // B's own message reaches A, and by then A's own would have too.
    b.publish(&BusMessage::new(2, 1, keys("from-b"))).await.unwrap();
    eventually("A receives B's message", || !messages(&seen_a).is_empty()).await;
    assert_eq!(messages(&seen_a), vec![BusMessage::new(2, 1, keys("from-b"))]);
    assert_eq!(messages(&seen_b).len(), 1, "B never receives its own");
    assert_eq!(alls(&seen_b), 1, "exactly one All for the one LISTEN");

    // Payloads that are not a bus's are ignored, and delivery goes on.
    admin()
        .await
        .execute("SELECT pg_notify($1, 'not base64!')", &[&channel])
        .await
        .unwrap();
    a.publish(&BusMessage::new(1, 2, keys("k2"))).await.unwrap();
    eventually("B receives the next message", || messages(&seen_b).len() == 2).await;
    assert_eq!(messages(&seen_b)[1], BusMessage::new(1, 2, keys("k2")));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bus_resubscribes_and_republishes_after_its_backends_are_terminated() {
    let channel = unique_channel("reconnect");
    let (app_a, app_b) = (format!("{channel}_a"), format!("{channel}_b"));
    let (a, b) = (bus_as(&channel, &app_a), bus_as(&channel, &app_b));
    let (sink_b, seen_b) = recorder();
    InvalidationBus::<String>::subscribe(&b, sink_b).unwrap();
    a.connect().await.unwrap();
    b.connect().await.unwrap();
    eventually("All after the first LISTEN", || alls(&seen_b) == 1).await;

    // B's listener must come back and say All again.
    assert_eq!(terminate(&app_b, "LISTEN").await, 1);
    eventually("All after the re-LISTEN", || alls(&seen_b) == 2).await;
    b.connect().await.unwrap();
    a.connect().await.unwrap();
    a.publish(&BusMessage::new(1, 1, keys("after-listener")))
        .await
        .unwrap();
    eventually("a message after the re-LISTEN", || messages(&seen_b).len() == 1).await;

    // A's publisher (its last query was the pg_notify): the next publish waits for the
    // new connection instead of failing.
    assert_eq!(terminate(&app_a, "SELECT pg_notify").await, 1);
    a.publish(&BusMessage::new(1, 2, keys("after-publisher")))
        .await
        .unwrap();
    eventually("a message from the new publisher", || {
        messages(&seen_b).len() == 2
    })
    .await;
    assert_eq!(
        messages(&seen_b)[1],
        BusMessage::new(1, 2, keys("after-publisher"))
    );
    assert_eq!(alls(&seen_b), 2, "the publisher's loss is not the listener's");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bus_errors_are_typed() {
    // An unknown database: refused at once, not after the connect timeout.
    let wrong_db = {
        let base = url();
        let (head, _db) = base.rsplit_once('/').unwrap();
        let db = unique_table("nodb");
        format!("{head}/{db}")
    };
    let bus_wrong = PostgresBus::builder()
        .url(wrong_db)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = bus_wrong.connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // Asked again: the server still refuses, said at once.
    let started = Instant::now();
    assert_eq!(bus_wrong.connect().await.unwrap_err().kind(), ErrorKind::Config);
    assert!(started.elapsed() < Duration::from_millis(500));
    bus_wrong.close().await.unwrap();

    for bad in ["", "Upper", "has-dash", "a b", &"x".repeat(64)] {
        let err = PostgresBus::builder()
            .url(url())
            .channel(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{bad:?}");
        assert!(err.to_string().contains("channel"), "{err}");
    }
    let err = PostgresBus::builder().build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);

    let channel = unique_channel("errors");
    let bus = bus(&channel);
    bus.connect().await.unwrap();
    let max = InvalidationBus::<String>::max_message_bytes(&bus);
    // The largest message goes through; one byte more is refused before sending.
    let header = BusMessage::new(1, 1, Change::<String>::Keys(vec![]))
        .encode()
        .len()
        + 4;
    let fits = BusMessage::new(1, 1, keys(&"k".repeat(max - header)));
    assert_eq!(fits.encode().len(), max);
    bus.publish(&fits).await.unwrap();
    let too_big = BusMessage::new(1, 2, keys(&"k".repeat(max - header + 1)));
    let err = bus.publish(&too_big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    bus.close().await.unwrap();
    bus.close().await.unwrap(); // idempotent
    assert!(!bus.is_connected());
    let err = bus.publish(&BusMessage::new(1, 3, keys("k"))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(bus.connect().await.unwrap_err().kind(), ErrorKind::Closed);
    let (sink, _) = recorder();
    assert_eq!(bus.subscribe(sink).unwrap_err().kind(), ErrorKind::Closed);
    let debug = format!("{bus:?}");
    assert!(
        debug.contains(&channel) && !debug.contains("postgres://"),
        "{debug}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_bus_on_a_down_server_fails_typed_after_waiting() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bus = PostgresBus::builder()
        .url(format!("postgres://postgres:secret-pw@127.0.0.1:{port}/test"))
        .connect_timeout(Duration::from_secs(2))
        .publish_timeout(Duration::from_millis(600))
        .build()
        .expect("build does not need the server");
    let started = Instant::now();
    let err = bus.connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        started.elapsed() <= Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.to_string().contains("secret-pw"), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the driver's error is kept"
    );

    let started = Instant::now();
    let err = bus.publish(&BusMessage::new(1, 1, keys("k"))).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        waited >= Duration::from_millis(550),
        "failed at once ({waited:?}), not after waiting"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert!(!format!("{err:?}").contains("secret-pw"));
    assert!(!format!("{bus:?}").contains("secret-pw"));
    bus.close().await.unwrap();
}
