//! The PostgreSQL layer for capacitor: [`PostgresLayer`], a persistent, shared,
//! transactional key-value layer on [deadpool-postgres](https://docs.rs/deadpool-postgres)
//! and [tokio-postgres](https://docs.rs/tokio-postgres).
//!
//! Put it at the bottom of a [`MultiLayer`](capacitor_core::MultiLayer) as the
//! authoritative store that every app instance shares, under an in-memory L1.
//!
//! # The table
//!
//! One row per key. [`PostgresLayerBuilder::build`] creates the table when it is missing
//! (unless [`create_table(false)`](PostgresLayerBuilder::create_table)); for the default
//! schema and table (`public.capacitor_kv`) it runs:
//!
//! ```sql
//! CREATE SCHEMA IF NOT EXISTS "public"; -- only when the schema is missing
//! CREATE TABLE IF NOT EXISTS "public"."capacitor_kv" (
//!     key        text COLLATE "C" PRIMARY KEY,
//!     value      bytea NOT NULL,
//!     expires_at timestamptz NULL,
//!     updated_at timestamptz NOT NULL DEFAULT now()
//! );
//! CREATE INDEX IF NOT EXISTS "capacitor_kv_expires_at_idx"
//!     ON "public"."capacitor_kv" (expires_at) WHERE expires_at IS NOT NULL;
//! ```
//!
//! ([`unlogged(true)`](PostgresLayerBuilder::unlogged) makes it `CREATE UNLOGGED TABLE`;
//! [`PostgresLayerBuilder::ddl`] prints the statements for your schema and table.)
//!
//! - `key`: a `String` key as its text, so `SELECT value FROM capacitor_kv WHERE key =
//!   'user:42'` finds it; other key types as the lowercase hex of their
//!   [`StorageKey`](capacitor_core::StorageKey) bytes (see [`KeyFormat`]). `COLLATE "C"`
//!   orders keys by bytes, which prefix scans page by. A `String` key with a NUL byte
//!   (which `text` cannot hold) is refused with
//!   [`ErrorKind::InvalidInput`](capacitor_core::ErrorKind::InvalidInput).
//! - `value`: capacitor's [`envelope`](capacitor_core::envelope) (format version, expiry,
//!   then the [`Codec`](capacitor_core::Codec)'s bytes, bincode by default).
//! - `expires_at`: when the entry expires (`NULL`: never); authoritative. Reads skip rows
//!   with `expires_at <= now` by the layer's clock; the sweeper deletes them.
//! - `updated_at`: the server's time of the last write, for people reading the table.
//!
//! An existing table is checked at build: a missing column, a wrong type, a `key` column
//! without byte ordering or without a unique constraint, an extra `NOT NULL` column
//! without a default, or the wrong `UNLOGGED`-ness is an
//! [`ErrorKind::Config`](capacitor_core::ErrorKind::Config) error naming what is wrong.
//!
//! # Behaviour
//!
//! - Every write commits before it returns: durable under PostgreSQL's usual settings
//!   (an `UNLOGGED` table is emptied by a server crash, not by a clean restart).
//!   [`flush`](capacitor_core::Layer::flush) has nothing to do.
//! - Batch forms take one round trip each; [`apply_atomic`](capacitor_core::Layer::apply_atomic)
//!   is one transaction; [`scan`](capacitor_core::Layer::scan) is lazy keyset pagination.
//! - Statements are prepared once per pooled connection and cached there.
//! - Errors: connection refused or lost → `Unavailable`; pool wait, connect or
//!   `statement_timeout` (SQLSTATE 57014) → `Timeout`; serialization failure or deadlock →
//!   `Conflict`; others `Backend`, each naming the operation and keeping the driver's
//!   error as the source. Connection URLs and passwords never appear in errors or `Debug`.
//! - After a server restart the layer reconnects on its own (closed connections are
//!   dropped from the pool); operations while the server is down fail fast with
//!   `Unavailable`.
//! - Capabilities: scan, transactions, persistence.
//!
//! # TLS
//!
//! Without TLS by default. [`PostgresLayerBuilder::tls`] takes any tokio-postgres
//! connector (for example `tokio_postgres_rustls::MakeRustlsConnect`); the `tls` Cargo
//! feature adds [`PostgresLayerBuilder::native_tls`] (native-tls through
//! postgres-native-tls: OpenSSL on Linux, so `libssl-dev` and `pkg-config` to build) and
//! re-exports `native_tls`. The URL's `sslmode` says whether TLS is required.
//!
//! # Examples
//!
//! An in-memory L1 over PostgreSQL:
//!
//! ```no_run
//! # async fn demo() -> Result<(), capacitor_core::Error> {
//! use std::time::Duration;
//! use capacitor_core::{LayerConfig, MultiLayer};
//! use capacitor_memory::MokaLayer;
//! use capacitor_postgres::PostgresLayer;
//!
//! let db = PostgresLayer::builder()
//!     .url("postgres://app@127.0.0.1:5432/app")
//!     .build::<String, String>()
//!     .await?;
//! let cache = MultiLayer::<String, String>::builder()
//!     .layer(LayerConfig::new("l1", MokaLayer::builder().max_capacity(10_000).build()?)
//!         .ttl(Duration::from_secs(60)))
//!     .layer(LayerConfig::new("postgres", db))
//!     .build()?;
//!
//! cache.set("user:42".into(), "Ada".into()).await?; // committed in PostgreSQL, then L1
//! assert_eq!(cache.get(&"user:42".into()).await?, Some("Ada".to_string()));
//! cache.close().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod core;
mod error;
mod key;
mod layer;
mod scan;
mod schema;
mod sql;
mod sweep;

pub use builder::{PostgresLayerBuilder, MAX_POOL_SIZE};
pub use key::KeyFormat;
pub use layer::{PostgresLayer, MAX_KEY_BYTES};

/// The pool crate, re-exported so that [`PostgresLayer::pool`] and
/// [`PostgresLayerBuilder::pool_config`] are used with the same version.
pub use deadpool_postgres;
/// The driver, re-exported so that [`PostgresLayerBuilder::config`] and
/// [`PostgresLayerBuilder::tls`] are used with the same version.
pub use tokio_postgres;

/// native-tls, re-exported for [`PostgresLayerBuilder::native_tls`].
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use native_tls;
