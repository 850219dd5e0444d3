//! The SQL the layer runs, built once per layer from the validated table name.
//!
//! "Live" means `expires_at IS NULL OR expires_at > $now`, where `$now` is the layer's
//! clock (the same clock the expiries were computed with), not the server's `now()`.

use crate::schema::Table;

/// Every statement, prepared on first use on each pooled connection and cached there.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) get: String,
    pub(crate) exists: String,
    pub(crate) set: String,
    pub(crate) delete: String,
    pub(crate) get_many: String,
    pub(crate) set_many: String,
    pub(crate) delete_many: String,
    pub(crate) delete_keys: String,
    pub(crate) remove_if_unchanged: String,
    pub(crate) scan_first: String,
    pub(crate) scan_next: String,
    pub(crate) scan_first_open: String,
    pub(crate) scan_next_open: String,
    pub(crate) sweep: String,
}

const UPSERT_TAIL: &str = "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
     expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at";

impl Statements {
    pub(crate) fn new(table: &Table) -> Statements {
        let t = &table.qualified;
        let scan = |lower: &str, upper: bool| {
            let (upper_clause, now, limit) = if upper {
                ("AND key < $2 ", "$3", "$4")
            } else {
                ("", "$2", "$3")
            };
            format!(
                "SELECT key, value, expires_at FROM {t} WHERE key {lower} $1 {upper_clause}\
                 AND (expires_at IS NULL OR expires_at > {now}) ORDER BY key LIMIT {limit}"
            )
        };
        Statements {
            get: format!(
                "SELECT value, expires_at FROM {t} \
                 WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)"
            ),
            exists: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} \
                 WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2))"
            ),
            set: format!(
                "INSERT INTO {t} (key, value, expires_at, updated_at) VALUES ($1, $2, $3, now()) {UPSERT_TAIL}"
            ),
            delete: format!(
                "DELETE FROM {t} WHERE key = $1 \
                 RETURNING (expires_at IS NULL OR expires_at > $2::timestamptz)"
            ),
            get_many: format!(
                "SELECT key, value, expires_at FROM {t} \
                 WHERE key = ANY($1::text[]) AND (expires_at IS NULL OR expires_at > $2)"
            ),
            // Keys are unique and sorted by the caller: ON CONFLICT cannot touch a row twice
            // in one statement, and a fixed lock order keeps concurrent batches from
            // deadlocking each other.
            set_many: format!(
                "INSERT INTO {t} (key, value, expires_at, updated_at) \
                 SELECT k, v, e, now() FROM unnest($1::text[], $2::bytea[], $3::timestamptz[]) AS u(k, v, e) \
                 {UPSERT_TAIL}"
            ),
            delete_many: format!(
                "WITH d AS (DELETE FROM {t} WHERE key = ANY($1::text[]) RETURNING expires_at) \
                 SELECT count(*) FILTER (WHERE expires_at IS NULL OR expires_at > $2::timestamptz) FROM d"
            ),
            delete_keys: format!("DELETE FROM {t} WHERE key = ANY($1::text[])"),
            remove_if_unchanged: format!("DELETE FROM {t} WHERE key = $1 AND value = $2"),
            scan_first: scan(">=", true),
            scan_next: scan(">", true),
            scan_first_open: scan(">=", false),
            scan_next_open: scan(">", false),
            // SKIP LOCKED: several processes sweeping one table never wait for each other,
            // nor for a writer holding one of the rows.
            sweep: format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY(\
                   SELECT ctid FROM {t} WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)) \
                 AND expires_at <= $1"
            ),
        }
    }
}
