//! The hand-written peer: the cache-aside code a user writes today without capacitor.
//!
//! A moka cache in front of Redis (fred), and for the three-tier case in front of
//! PostgreSQL too (tokio-postgres, prepared statements, a plain `key text, value bytea`
//! table of its own). A read checks moka, then Redis, then PostgreSQL, and backfills every
//! tier above the one that answered; a write goes to PostgreSQL, then Redis, then moka.
//! Values are plain postcard ([`crate::encode`]). This is what the `hand_written`
//! function of a group runs, beside `capacitor` and `raw` (the same backend calls inlined
//! in the benchmark: the floor).

use std::fmt;
use std::time::Duration;

use capacitor::postgres::tokio_postgres::{self, NoTls, Statement};
use capacitor::redis::fred::prelude::{Client, ClientLike, Config, KeysInterface, Value};

use crate::{decode, encode};

/// The error a hand-written cache propagates with `?`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The PostgreSQL tier of a [`HandWritten`] cache.
struct Pg {
    client: tokio_postgres::Client,
    table: String,
    get: Statement,
    upsert: Statement,
}

/// moka in front of Redis (and optionally PostgreSQL), written by hand.
pub struct HandWritten {
    moka: moka::sync::Cache<String, String>,
    redis: Client,
    prefix: String,
    pg: Option<Pg>,
}

impl fmt::Debug for HandWritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandWritten")
            .field("prefix", &self.prefix)
            .field("table", &self.pg.as_ref().map(|p| p.table.as_str()))
            .finish_non_exhaustive()
    }
}

/// A connected fred client, or why there is none (within 3 s).
///
/// # Errors
///
/// When the URL does not parse or the server does not answer.
pub async fn redis_client(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| e.to_string())?;
    let client = Client::new(config, None, None, None);
    drop(client.connect());
    match tokio::time::timeout(Duration::from_secs(3), client.wait_for_connect()).await {
        Ok(Ok(())) => Ok(client),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".to_owned()),
    }
}

/// A tokio-postgres connection (its driver spawned on the current runtime), or why there
/// is none (within 3 s).
///
/// # Errors
///
/// When the server does not answer or refuses the connection.
pub async fn postgres_client(url: &str) -> Result<tokio_postgres::Client, String> {
    let connect = tokio_postgres::connect(url, NoTls);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }),
        Err(_) => Err("no answer within 3 s".to_owned()),
    }
}

/// Deletes every Redis key under `prefix` (SCAN + DEL), and only those.
///
/// # Errors
///
/// A Redis error.
pub async fn delete_prefix(client: &Client, prefix: &str) -> Result<(), BoxError> {
    let mut cursor = "0".to_owned();
    loop {
        let (next, keys): (String, Vec<String>) = client
            .scan_page(cursor.as_str(), format!("{prefix}*"), Some(1_000), None)
            .await?;
        if !keys.is_empty() {
            let _: i64 = client.del(keys).await?;
        }
        if next == "0" {
            return Ok(());
        }
        cursor = next;
    }
}

/// Writes `entries` (already-prefixed keys, postcard values) with MSETs of 1,000.
///
/// # Errors
///
/// A Redis error.
pub async fn redis_preload(client: &Client, entries: &[(String, Vec<u8>)]) -> Result<(), BoxError> {
    for chunk in entries.chunks(1_000) {
        let pairs: Vec<(String, Value)> = chunk
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone().into_boxed_slice())))
            .collect();
        client.mset(pairs).await?;
    }
    Ok(())
}

impl HandWritten {
    /// Connects its own Redis client, and with `postgres = Some((url, table))` its own
    /// PostgreSQL connection, creating `table` (which must not exist yet).
    ///
    /// # Errors
    ///
    /// When a server does not answer or the table cannot be created.
    pub async fn connect(
        redis_url: &str,
        prefix: impl Into<String>,
        postgres: Option<(&str, &str)>,
    ) -> Result<Self, BoxError> {
        let redis = redis_client(redis_url).await?;
        let pg = match postgres {
            None => None,
            Some((url, table)) => {
                let client = postgres_client(url).await?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE \"{table}\" (key text PRIMARY KEY, value bytea NOT NULL)"
                    ))
                    .await?;
                let get = client
                    .prepare(&format!("SELECT value FROM \"{table}\" WHERE key = $1"))
                    .await?;
                let upsert = client
                    .prepare(&format!(
                        "INSERT INTO \"{table}\" (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                    ))
                    .await?;
                Some(Pg {
                    client,
                    table: table.to_owned(),
                    get,
                    upsert,
                })
            }
        };
        Ok(HandWritten {
            moka: moka::sync::Cache::new(1_000_000),
            redis,
            prefix: prefix.into(),
            pg,
        })
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Loads `entries` into PostgreSQL (when it has that tier) and, with `into_redis`,
    /// into Redis; not into moka.
    ///
    /// # Errors
    ///
    /// A Redis or PostgreSQL error.
    pub async fn preload(&self, entries: &[(String, String)], into_redis: bool) -> Result<(), BoxError> {
        if let Some(pg) = &self.pg {
            for chunk in entries.chunks(1_000) {
                let (ks, vs): (Vec<String>, Vec<Vec<u8>>) =
                    chunk.iter().map(|(k, v)| (k.clone(), encode(v))).unzip();
                pg.client
                    .execute(
                        &format!(
                            "INSERT INTO \"{}\" (key, value) SELECT * FROM unnest($1::text[], $2::bytea[])",
                            pg.table
                        ),
                        &[&ks, &vs],
                    )
                    .await?;
            }
        }
        if into_redis {
            let encoded: Vec<(String, Vec<u8>)> = entries
                .iter()
                .map(|(k, v)| (self.redis_key(k), encode(v)))
                .collect();
            redis_preload(&self.redis, &encoded).await?;
        }
        Ok(())
    }

    /// The value under `key`: moka, else Redis (backfilling moka), else PostgreSQL
    /// (backfilling Redis and moka).
    ///
    /// # Errors
    ///
    /// A Redis or PostgreSQL error.
    pub async fn get(&self, key: &str) -> Result<Option<String>, BoxError> {
        if let Some(v) = self.moka.get(key) {
            return Ok(Some(v));
        }
        let redis_key = self.redis_key(key);
        let bytes: Option<Vec<u8>> = self.redis.get(&redis_key).await?;
        if let Some(bytes) = bytes {
            let v = decode(&bytes);
            self.moka.insert(key.to_owned(), v.clone());
            return Ok(Some(v));
        }
        let Some(pg) = &self.pg else {
            return Ok(None);
        };
        let Some(row) = pg.client.query_opt(&pg.get, &[&key]).await? else {
            return Ok(None);
        };
        let bytes: &[u8] = row.try_get(0)?;
        let v = decode(bytes);
        let _: () = self
            .redis
            .set(
                redis_key,
                Value::from(bytes.to_vec().into_boxed_slice()),
                None,
                None,
                false,
            )
            .await?;
        self.moka.insert(key.to_owned(), v.clone());
        Ok(Some(v))
    }

    /// Writes `value` under `key` to PostgreSQL (when it has that tier), Redis and moka,
    /// in that order.
    ///
    /// # Errors
    ///
    /// A Redis or PostgreSQL error.
    pub async fn set(&self, key: String, value: String) -> Result<(), BoxError> {
        let bytes = encode(&value);
        if let Some(pg) = &self.pg {
            pg.client.execute(&pg.upsert, &[&key, &bytes]).await?;
        }
        let _: () = self
            .redis
            .set(
                self.redis_key(&key),
                Value::from(bytes.into_boxed_slice()),
                None,
                None,
                false,
            )
            .await?;
        self.moka.insert(key, value);
        Ok(())
    }

    /// Drops `key` from moka only (a benchmark's setup, to force the next read below).
    pub fn forget_local(&self, key: &str) {
        self.moka.invalidate(key);
    }

    /// Drops `key` from moka and Redis (a benchmark's setup, to force the next read down
    /// to PostgreSQL).
    ///
    /// # Errors
    ///
    /// A Redis error.
    pub async fn forget_cached(&self, key: &str) -> Result<(), BoxError> {
        self.moka.invalidate(key);
        let _: i64 = self.redis.del(self.redis_key(key)).await?;
        Ok(())
    }

    /// Removes what this peer made: its Redis keys and its table. Then disconnects.
    ///
    /// # Errors
    ///
    /// A Redis or PostgreSQL error.
    pub async fn cleanup(self) -> Result<(), BoxError> {
        delete_prefix(&self.redis, &self.prefix).await?;
        if let Some(pg) = &self.pg {
            pg.client
                .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", pg.table))
                .await?;
        }
        let _ = self.redis.quit().await;
        Ok(())
    }
}
