//! The `tracing` feature: one span per composer operation naming the layer that answered
//! and whether it promoted; breaker changes as events; never a key or a value.
#![cfg(feature = "tracing")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the test failing

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use capacitor_core::testkit::{FaultyLayer, MapLayer};
use capacitor_core::{LayerConfig, MultiLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type FieldMap = BTreeMap<String, String>;

#[derive(Default, Clone)]
struct Captured {
    /// Closed spans: name and fields.
    spans: Arc<Mutex<Vec<(String, FieldMap)>>>,
    events: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

struct Open(BTreeMap<String, String>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Captured {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open(fields));
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(open) = span.extensions_mut().get_mut::<Open>() {
                values.record(&mut Fields(&mut open.0));
            }
        }
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions_mut()
                .remove::<Open>()
                .map(|o| o.0)
                .unwrap_or_default();
            self.spans.lock().unwrap().push((span.name().to_owned(), fields));
        }
    }
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(fields);
    }
}

#[test]
fn spans_name_the_answering_layer_and_promotion_and_never_keys_or_values() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l1 = Arc::new(MapLayer::<String, String>::new());
            let remote = FaultyLayer::new(MapLayer::<String, String>::new());
            let faults = remote.faults();
            let cache = MultiLayer::builder()
                .name("traced")
                .layer(LayerConfig::shared("l1", l1.clone()))
                .layer(LayerConfig::new("remote", remote))
                .layer(LayerConfig::new("store", MapLayer::new()))
                .build()
                .unwrap();
            let key = "secret-key-123".to_string();
            cache.set(key.clone(), "secret-value-456".into()).await.unwrap();
            capacitor_core::Layer::delete(&*l1, &key).await.unwrap();
            cache.get(&key).await.unwrap(); // from remote, promoted
            cache.get(&key).await.unwrap(); // from l1
            cache.get(&"secret-missing-789".to_string()).await.unwrap();
            faults.fail_reads(true);
            for _ in 0..5 {
                cache.get(&"secret-missing-789".to_string()).await.unwrap();
            }
        });
    });
    let spans = captured.spans.lock().unwrap().clone();
    let gets: Vec<&BTreeMap<String, String>> = spans
        .iter()
        .filter(|(n, _)| n == "capacitor.get")
        .map(|(_, f)| f)
        .collect();
    let field = |f: &BTreeMap<String, String>, k: &str| f.get(k).cloned().unwrap_or_default();
    assert_eq!(gets.len(), 8, "{spans:?}");
    assert_eq!(
        (
            field(gets[0], "layer"),
            field(gets[0], "promoted"),
            field(gets[0], "outcome")
        ),
        ("remote".into(), "true".into(), "hit".into())
    );
    assert_eq!(
        (
            field(gets[1], "layer"),
            field(gets[1], "promoted"),
            field(gets[1], "outcome")
        ),
        ("l1".into(), "false".into(), "hit".into())
    );
    assert_eq!(field(gets[2], "outcome"), "miss");
    assert!(gets.iter().all(|f| field(f, "cache") == "traced"));
    assert!(spans.iter().any(|(n, _)| n == "capacitor.set"), "{spans:?}");
    let events = captured.events.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| field(e, "layer") == "remote" && field(e, "to") == "open"),
        "the breaker opening is an event: {events:?}"
    );
    let everything = format!("{spans:?}{events:?}");
    assert!(
        !everything.contains("secret"),
        "no key or value recorded: {everything}"
    );
}
