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
    pub(crate) apply: String,
    pub(crate) remove_if_unchanged: String,
    pub(crate) scan_first: String,
    pub(crate) scan_next: String,
    pub(crate) scan_first_open: String,
    pub(crate) scan_next_open: String,
    pub(crate) sweep: String,
    pub(crate) clear: String,
    /// With [`tags`](crate::PostgresLayerBuilder::tags) on.
    pub(crate) tags: Option<TagStatements>,
}

/// The statements only a layer keeping tags runs.
#[derive(Debug)]
pub(crate) struct TagStatements {
    pub(crate) set_tagged: String,
    pub(crate) remove_by_tag: String,
}

/// The deadline check of a fenced write (see `fence`): evaluated once per statement.
const FENCE: &str = "SELECT clock_timestamp() < $DEADLINE::timestamptz AS ok";

const UPSERT_TAIL: &str = "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
     expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at";

impl Statements {
    /// With `tags`, every upsert also deletes the tag rows of the keys it writes, in the
    /// same statement (so a failed statement changes neither): the last write of a key
    /// decides its tags. Deletes need nothing more: the tag table's foreign key cascades.
    pub(crate) fn new(table: &Table, tags: bool) -> Statements {
        let t = &table.qualified;
        let tt = table.tags_qualified();
        let untag = |keys: &str| {
            if tags {
                format!("t AS (DELETE FROM {tt} WHERE key {keys} AND (SELECT ok FROM f)), ")
            } else {
                String::new()
            }
        };
        let untag_one = untag("= $1");
        let untag_many = untag("= ANY($1::text[])");
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
            // Fenced writes (see `fence`): nothing is proposed when the statement starts
            // past its deadline; the first column says whether it started in time.
            set: format!(
                "WITH f AS ({}), {untag_one}u AS (INSERT INTO {t} (key, value, expires_at, updated_at) \
                 SELECT $1, $2, $3, now() FROM f WHERE f.ok {UPSERT_TAIL} RETURNING 1) \
                 SELECT (SELECT ok FROM f), (SELECT count(*) FROM u)",
                FENCE.replace("$DEADLINE", "$4")
            ),
            delete: format!(
                "WITH f AS ({}), d AS (DELETE FROM {t} WHERE key = $1 AND (SELECT ok FROM f) \
                 RETURNING (expires_at IS NULL OR expires_at > $2::timestamptz) AS live) \
                 SELECT (SELECT ok FROM f), coalesce((SELECT bool_or(live) FROM d), false)",
                FENCE.replace("$DEADLINE", "$3")
            ),
            get_many: format!(
                "SELECT key, value, expires_at FROM {t} \
                 WHERE key = ANY($1::text[]) AND (expires_at IS NULL OR expires_at > $2)"
            ),
            // Keys are unique and sorted by the caller: ON CONFLICT cannot touch a row twice
            // in one statement, and a fixed lock order keeps concurrent batches from
            // deadlocking each other.
            set_many: format!(
                "WITH f AS ({}), {untag_many}u AS (INSERT INTO {t} (key, value, expires_at, updated_at) \
                 SELECT k, v, e, now() FROM unnest($1::text[], $2::bytea[], $3::timestamptz[]) AS u(k, v, e) \
                 WHERE (SELECT ok FROM f) {UPSERT_TAIL} RETURNING 1) \
                 SELECT (SELECT ok FROM f), (SELECT count(*) FROM u)",
                FENCE.replace("$DEADLINE", "$4")
            ),
            delete_many: format!(
                "WITH f AS ({}), d AS (DELETE FROM {t} WHERE key = ANY($1::text[]) AND (SELECT ok FROM f) \
                 RETURNING expires_at) \
                 SELECT (SELECT ok FROM f), \
                 (SELECT count(*) FILTER (WHERE expires_at IS NULL OR expires_at > $2::timestamptz) FROM d)",
                FENCE.replace("$DEADLINE", "$3")
            ),
            // A transaction as one statement: its deletes and upserts (of distinct keys)
            // commit together, with no COMMIT message that could arrive after the deadline.
            apply: format!(
                "WITH f AS ({}), d AS (DELETE FROM {t} WHERE key = ANY($4::text[]) AND (SELECT ok FROM f) RETURNING 1), \
                 {untag_many}u AS (INSERT INTO {t} (key, value, expires_at, updated_at) \
                 SELECT k, v, e, now() FROM unnest($1::text[], $2::bytea[], $3::timestamptz[]) AS u(k, v, e) \
                 WHERE (SELECT ok FROM f) {UPSERT_TAIL} RETURNING 1) \
                 SELECT (SELECT ok FROM f), (SELECT count(*) FROM d), (SELECT count(*) FROM u)",
                FENCE.replace("$DEADLINE", "$5")
            ),
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
            // One statement: every row, or none. The tag rows go first, so that the
            // cascade has nothing left to find.
            clear: format!(
                "WITH f AS ({}), {}d AS (DELETE FROM {t} WHERE (SELECT ok FROM f) RETURNING 1) \
                 SELECT (SELECT ok FROM f), (SELECT count(*) FROM d)",
                FENCE.replace("$DEADLINE", "$1"),
                if tags {
                    format!("t AS (DELETE FROM {tt} WHERE (SELECT ok FROM f)), ")
                } else {
                    String::new()
                }
            ),
            tags: tags.then(|| TagStatements::new(t, &tt)),
        }
    }
}

impl TagStatements {
    fn new(t: &str, tt: &str) -> TagStatements {
        TagStatements {
            // The upsert, then the key's tags: those of this write kept or inserted, the
            // others deleted (two disjoint sets of rows, so the order in which PostgreSQL
            // runs the CTEs does not matter). The inserts read `u`: no tag without its row.
            set_tagged: format!(
                "WITH f AS ({}), u AS (INSERT INTO {t} (key, value, expires_at, updated_at) \
                 SELECT $1, $2, $3, now() FROM f WHERE f.ok {UPSERT_TAIL} RETURNING key), \
                 d AS (DELETE FROM {tt} WHERE key = $1 AND (SELECT ok FROM f) AND tag <> ALL($5::text[])), \
                 i AS (INSERT INTO {tt} (key, tag) SELECT DISTINCT u.key, g FROM u, unnest($5::text[]) AS g \
                 ON CONFLICT (key, tag) DO NOTHING) \
                 SELECT (SELECT ok FROM f), (SELECT count(*) FROM u)",
                FENCE.replace("$DEADLINE", "$4")
            ),
            // `t`: the keys carrying the tag, read once. Their rows are deleted by row
            // version (ctid): a row rewritten by a write that committed meanwhile fails the
            // recheck and stays, with the tags that write gave it. The foreign key cascades
            // to the tag rows of the deleted rows; `o` deletes those of keys that have no
            // row (left by a cascade that did not run: triggers disabled, a restore).
            // Every key of `t` is returned, so that caches above drop them all.
            remove_by_tag: format!(
                "WITH f AS ({}), t AS (SELECT key FROM {tt} WHERE tag = $1 AND (SELECT ok FROM f)), \
                 d AS (DELETE FROM {t} WHERE ctid = ANY (ARRAY(\
                   SELECT kv.ctid FROM {t} kv JOIN t ON kv.key = t.key)) RETURNING 1), \
                 o AS (DELETE FROM {tt} WHERE key IN (\
                   SELECT t.key FROM t WHERE NOT EXISTS (SELECT 1 FROM {t} kv WHERE kv.key = t.key))) \
                 SELECT (SELECT ok FROM f), ARRAY(SELECT key FROM t)",
                FENCE.replace("$DEADLINE", "$2")
            ),
        }
    }
}
