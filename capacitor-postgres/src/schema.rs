//! The table: identifier validation, the DDL, and the check that an existing table has the
//! shape the layer reads and writes.

use capacitor_core::{Error, ErrorKind, Operation, Result};
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::error::{pg_error, pg_error_in};

/// The longest identifier PostgreSQL keeps whole (`NAMEDATALEN - 1`); longer ones are
/// silently truncated by the server, so they are refused here.
const MAX_IDENTIFIER_LEN: usize = 63;

/// Checks that `value` is a plain identifier: `[A-Za-z_][A-Za-z0-9_]{0,62}`. Anything else
/// is refused (never spliced into SQL), naming `field`.
pub(crate) fn validate_identifier(field: &str, value: &str) -> Result<()> {
    let mut chars = value.chars();
    let Some(first) = chars.next() else {
        return Err(Error::config(field, "must not be empty"));
    };
    if value.len() > MAX_IDENTIFIER_LEN {
        return Err(Error::config(
            field,
            format_args!(
                "is {} bytes long; PostgreSQL identifiers are at most {MAX_IDENTIFIER_LEN}",
                value.len()
            ),
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_') || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(Error::config(
            field,
            "must be a plain identifier: an ASCII letter or `_`, then ASCII letters, digits or `_` \
             (quotes, spaces, dots and other characters are refused)",
        ));
    }
    Ok(())
}

/// `"name"`: safe because [`validate_identifier`] admits no `"`. Quoting keeps the case
/// the user wrote (`Sessions` stays `Sessions`, not `sessions`) and makes reserved words
/// usable.
pub(crate) fn quote(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

/// The table the layer uses, by its validated parts.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// `"schema"."name"`.
    pub(crate) qualified: String,
}

impl Table {
    pub(crate) fn new(schema: &str, name: &str) -> Result<Table> {
        validate_identifier("schema", schema)?;
        validate_identifier("table", name)?;
        Ok(Table {
            schema: schema.to_owned(),
            name: name.to_owned(),
            qualified: format!("{}.{}", quote(schema), quote(name)),
        })
    }

    /// The name of the index on `expires_at` the sweeper reads: `<table>_expires_at_idx`,
    /// shortened with a hash of the table name when that would pass 63 bytes (so that two
    /// long table names never share an index name).
    pub(crate) fn expiry_index(&self) -> String {
        self.derived("_expires_at_idx", "_exp")
    }

    /// The name of the tag table: `<table>_tags`, shortened as [`expiry_index`](Self::expiry_index).
    pub(crate) fn tags_name(&self) -> String {
        self.derived("_tags", "_tags")
    }

    /// The tag table, `"schema"."<table>_tags"`.
    pub(crate) fn tags_qualified(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.tags_name()))
    }

    /// The name of the index on the tag table's `tag`: `<table>_tags_tag_idx`, shortened as
    /// [`expiry_index`](Self::expiry_index).
    pub(crate) fn tags_index(&self) -> String {
        self.derived("_tags_tag_idx", "_tagidx")
    }

    /// `<table><suffix>`, or, when that would pass 63 bytes, the table name's first 40
    /// bytes, a hash of the whole name and `short` (so that two long table names never
    /// share a derived name).
    fn derived(&self, suffix: &str, short: &str) -> String {
        if self.name.len() + suffix.len() <= MAX_IDENTIFIER_LEN {
            return format!("{}{suffix}", self.name);
        }
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let hash = self.name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        // Identifiers are ASCII (validated), so byte 40 is a character boundary.
        format!("{}_{hash:08x}{short}", &self.name[..40])
    }

    /// The statements that create the tag table and its index. The foreign key makes
    /// every delete of a row (`delete`, `delete_many`, `apply_atomic`'s deletes, the
    /// sweeper, `clear`) drop the key's tags in the same statement.
    pub(crate) fn tags_ddl(&self, unlogged: bool) -> Vec<String> {
        vec![
            format!(
                "CREATE {}TABLE IF NOT EXISTS {} (\n    \
                     key text COLLATE \"C\" NOT NULL REFERENCES {} (key) ON DELETE CASCADE,\n    \
                     tag text NOT NULL,\n    \
                     PRIMARY KEY (key, tag)\n\
                 )",
                if unlogged { "UNLOGGED " } else { "" },
                self.tags_qualified(),
                self.qualified
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} (tag)",
                quote(&self.tags_index()),
                self.tags_qualified()
            ),
        ]
    }

    /// The statements that create the table (and its schema when missing), in order.
    pub(crate) fn ddl(&self, unlogged: bool) -> Vec<String> {
        vec![
            format!("CREATE SCHEMA IF NOT EXISTS {}", quote(&self.schema)),
            format!(
                "CREATE {}TABLE IF NOT EXISTS {} (\n    \
                     key        text COLLATE \"C\" PRIMARY KEY,\n    \
                     value      bytea NOT NULL,\n    \
                     expires_at timestamptz NULL,\n    \
                     updated_at timestamptz NOT NULL DEFAULT now()\n\
                 )",
                if unlogged { "UNLOGGED " } else { "" },
                self.qualified
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} (expires_at) WHERE expires_at IS NOT NULL",
                quote(&self.expiry_index()),
                self.qualified
            ),
        ]
    }
}

/// A column the layer needs: name, `information_schema` data type, whether it must accept
/// NULL.
struct Expected {
    name: &'static str,
    data_type: &'static str,
    ddl_type: &'static str,
    nullable: Option<bool>,
}

const COLUMNS: &[Expected] = &[
    Expected {
        name: "key",
        data_type: "text",
        ddl_type: "text COLLATE \"C\"",
        nullable: None,
    },
    Expected {
        name: "value",
        data_type: "bytea",
        ddl_type: "bytea",
        nullable: None,
    },
    Expected {
        name: "expires_at",
        data_type: "timestamp with time zone",
        ddl_type: "timestamptz NULL",
        nullable: Some(true),
    },
    Expected {
        name: "updated_at",
        data_type: "timestamp with time zone",
        ddl_type: "timestamptz",
        nullable: None,
    },
];

/// Whether the table exists: `Some(unlogged)` when it does.
async fn persistence(client: &impl GenericClient, table: &Table) -> Result<Option<bool>> {
    relation_persistence(client, &table.schema, &table.name, &table.qualified).await
}

/// Whether the relation `schema.name` (shown as `qualified`) exists and is a table:
/// `Some(unlogged)` when it does.
async fn relation_persistence(
    client: &impl GenericClient,
    schema: &str,
    name: &str,
    qualified: &str,
) -> Result<Option<bool>> {
    let row = client
        .query_opt(
            "SELECT c.relkind::text, c.relpersistence::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(|e| pg_error(Operation::Build, e))?;
    let Some(row) = row else { return Ok(None) };
    let kind: String = row.try_get(0).map_err(|e| pg_error(Operation::Build, e))?;
    let persistence: String = row.try_get(1).map_err(|e| pg_error(Operation::Build, e))?;
    if kind != "r" && kind != "p" {
        return Err(Error::config(
            "table",
            format_args!("{qualified} exists but is not a table (pg_class.relkind = '{kind}')"),
        ));
    }
    Ok(Some(persistence == "u"))
}

/// Creates the table when asked to and it is missing, then checks its shape.
///
/// Everything runs in one transaction. When `statement_timeout` is given it is set for that
/// transaction only (`SET LOCAL`), so the layer's own, possibly short, statement timeout
/// does not cancel DDL that waits on a busy catalog. The creation holds an advisory lock on
/// the table's name, so that processes starting together do not race on
/// `CREATE TABLE IF NOT EXISTS` (which can fail with a unique violation on the catalog when
/// two run at once).
pub(crate) async fn prepare(
    client: &mut deadpool_postgres::Object,
    table: &Table,
    create: bool,
    unlogged: bool,
    tags: bool,
    statement_timeout: Option<Duration>,
) -> Result<()> {
    let op = Operation::Build;
    let tx = client.transaction().await.map_err(|e| pg_error(op, e))?;
    if let Some(timeout) = statement_timeout {
        let ms = timeout.as_millis().max(1);
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {ms}"))
            .await
            .map_err(|e| pg_error(op, e))?;
    }
    let existing = persistence(&*tx, table).await?;
    if existing.is_none() {
        if !create {
            return Err(Error::config(
                "table",
                format_args!(
                    "{} does not exist and create_table(false) was given; create it with the DDL \
                     in the capacitor-postgres docs",
                    table.qualified
                ),
            ));
        }
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("capacitor-postgres:{}", table.qualified)],
        )
        .await
        .map_err(|e| pg_error(op, e))?;
        let schema_exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&table.schema],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_error(op, e))?;
        let ddl = table.ddl(unlogged);
        // `CREATE SCHEMA IF NOT EXISTS` needs the CREATE privilege on the database even when
        // the schema exists: run it only when it is missing.
        let skip = usize::from(schema_exists);
        for statement in &ddl[skip..] {
            tx.batch_execute(statement)
                .await
                .map_err(|e| pg_error_in(op, &format!("cannot create {}: ", table.qualified), e))?;
        }
    }
    let existing_unlogged = persistence(&*tx, table).await?.unwrap_or(unlogged);
    if existing_unlogged != unlogged {
        return Err(Error::config(
            "unlogged",
            format_args!(
                "{} exists and is {}, but the layer was built with unlogged({unlogged}); \
                 change one (ALTER TABLE … SET {})",
                table.qualified,
                if existing_unlogged { "UNLOGGED" } else { "LOGGED" },
                if unlogged { "UNLOGGED" } else { "LOGGED" }
            ),
        ));
    }
    check_shape(&*tx, table).await?;
    if tags {
        prepare_tags(&tx, table, create, unlogged).await?;
    }
    tx.commit().await.map_err(|e| pg_error(op, e))
}

/// Creates the tag table when asked to and it is missing (also next to an existing kv
/// table: turning tags on for a table in use), then checks its shape.
async fn prepare_tags(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
    create: bool,
    unlogged: bool,
) -> Result<()> {
    let op = Operation::Build;
    let tags = table.tags_qualified();
    let name = table.tags_name();
    let existing = relation_persistence(&**tx, &table.schema, &name, &tags).await?;
    if existing.is_none() {
        if !create {
            return Err(Error::config(
                "tags",
                format_args!(
                    "the tag table {tags} does not exist and create_table(false) was given; \
                     create it with the DDL in the capacitor-postgres docs (PostgresLayerBuilder::ddl)"
                ),
            ));
        }
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("capacitor-postgres:{tags}")],
        )
        .await
        .map_err(|e| pg_error(op, e))?;
        for statement in table.tags_ddl(unlogged) {
            tx.batch_execute(&statement)
                .await
                .map_err(|e| pg_error_in(op, &format!("cannot create {tags}: "), e))?;
        }
    }
    let existing_unlogged = relation_persistence(&**tx, &table.schema, &name, &tags)
        .await?
        .unwrap_or(unlogged);
    if existing_unlogged != unlogged {
        return Err(Error::config(
            "tags",
            format_args!(
                "the tag table {tags} is {}, but {} is {}: they must match (a crash would \
                 otherwise empty one and not the other); change one (ALTER TABLE … SET {})",
                if existing_unlogged { "UNLOGGED" } else { "LOGGED" },
                table.qualified,
                if unlogged { "UNLOGGED" } else { "LOGGED" },
                if unlogged { "UNLOGGED" } else { "LOGGED" }
            ),
        ));
    }
    check_tags_shape(&**tx, table).await
}

/// Checks the tag table: `key` and `tag` text columns, a unique index on exactly
/// `(key, tag)` (the inserts' `ON CONFLICT (key, tag)`), an index led by `tag`
/// (`remove_by_tag`), and the foreign key to the kv table with `ON DELETE CASCADE` (what
/// untags deleted and swept rows). Every mismatch is an [`ErrorKind::Config`] error
/// naming the table.
async fn check_tags_shape(client: &impl GenericClient, table: &Table) -> Result<()> {
    let op = Operation::Build;
    let tags = table.tags_qualified();
    let name = table.tags_name();
    let shape_error = |problem: String| {
        Error::new(
            ErrorKind::Config,
            op,
            format!("`tags`: the tag table {tags} has an incompatible shape: {problem}"),
        )
    };
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text, column_default IS NOT NULL \
             FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&table.schema, &name],
        )
        .await
        .map_err(|e| pg_error(op, e))?;
    let mut columns = Vec::with_capacity(rows.len());
    for row in rows {
        let get = |i| row.try_get::<_, Option<String>>(i).map_err(|e| pg_error(op, e));
        let has_default: bool = row.try_get(3).map_err(|e| pg_error(op, e))?;
        columns.push((
            get(0)?.unwrap_or_default(),
            get(1)?.unwrap_or_default(),
            get(2)?.as_deref() == Some("YES"),
            has_default,
        ));
    }
    for expected in ["key", "tag"] {
        match columns.iter().find(|c| c.0 == expected) {
            None => {
                return Err(shape_error(format!(
                    "column `{expected}` is missing (expected text)"
                )))
            }
            Some(c) if c.1 != "text" => {
                return Err(shape_error(format!(
                    "column `{expected}` has type {}, expected text",
                    c.1
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(c) = columns
        .iter()
        .find(|c| c.0 != "key" && c.0 != "tag" && !c.2 && !c.3)
    {
        return Err(shape_error(format!(
            "column `{}` is NOT NULL without a default, so the layer's inserts would fail",
            c.0
        )));
    }
    let row = client
        .query_one(
            "WITH r AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                        WHERE n.nspname = $1 AND c.relname = $2), \
                  kv AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                        WHERE n.nspname = $1 AND c.relname = $3) \
             SELECT \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = (SELECT oid FROM r) \
                 AND i.indisunique AND i.indnkeyatts = 2 AND i.indpred IS NULL \
                 AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                      WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[])) \
                     = ARRAY['key', 'tag']), \
               EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                   ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = (SELECT oid FROM r) AND i.indpred IS NULL AND a.attname = 'tag'), \
               EXISTS (SELECT 1 FROM pg_constraint k \
                 WHERE k.conrelid = (SELECT oid FROM r) AND k.confrelid = (SELECT oid FROM kv) \
                   AND k.contype = 'f' AND k.confdeltype = 'c' AND k.convalidated \
                   AND array_length(k.conkey, 1) = 1 \
                   AND (SELECT attname FROM pg_attribute WHERE attrelid = k.conrelid AND attnum = k.conkey[1]) = 'key')",
            &[&table.schema, &name, &table.name],
        )
        .await
        .map_err(|e| pg_error(op, e))?;
    let flag = |i| row.try_get::<_, bool>(i).map_err(|e| pg_error(op, e));
    if !flag(0)? {
        return Err(shape_error(
            "it has no PRIMARY KEY or UNIQUE constraint on exactly (key, tag), which its \
             inserts (ON CONFLICT (key, tag)) need"
                .to_owned(),
        ));
    }
    if !flag(1)? {
        return Err(shape_error(format!(
            "it has no index led by `tag`, which remove_by_tag reads (CREATE INDEX ON {tags} (tag))"
        )));
    }
    if !flag(2)? {
        return Err(shape_error(format!(
            "it has no foreign key (key) REFERENCES {} (key) ON DELETE CASCADE, which \
             removes a key's tags with its row (deletes, the sweeper)",
            table.qualified
        )));
    }
    Ok(())
}

/// Checks the columns, their types, the `COLLATE "C"` ordering of `key` and the unique
/// index `ON CONFLICT (key)` needs. Every mismatch is an [`ErrorKind::Config`] error
/// naming the column.
async fn check_shape(client: &impl GenericClient, table: &Table) -> Result<()> {
    let op = Operation::Build;
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text, \
                    collation_name::text, column_default IS NOT NULL \
             FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| pg_error(op, e))?;
    struct Column {
        name: String,
        data_type: String,
        nullable: bool,
        collation: Option<String>,
        has_default: bool,
    }
    let mut columns = Vec::with_capacity(rows.len());
    for row in rows {
        let get = |i| row.try_get::<_, Option<String>>(i).map_err(|e| pg_error(op, e));
        columns.push(Column {
            name: get(0)?.unwrap_or_default(),
            data_type: get(1)?.unwrap_or_default(),
            nullable: get(2)?.as_deref() == Some("YES"),
            collation: get(3)?,
            has_default: row.try_get(4).map_err(|e| pg_error(op, e))?,
        });
    }
    let shape_error = |column: &str, problem: String| {
        Error::new(
            ErrorKind::Config,
            op,
            format!(
                "`table`: {} has an incompatible shape: column `{column}` {problem}",
                table.qualified
            ),
        )
    };
    for expected in COLUMNS {
        let Some(column) = columns.iter().find(|c| c.name == expected.name) else {
            return Err(shape_error(
                expected.name,
                format!("is missing (expected {})", expected.ddl_type),
            ));
        };
        if column.data_type != expected.data_type {
            return Err(shape_error(
                expected.name,
                format!("has type {}, expected {}", column.data_type, expected.ddl_type),
            ));
        }
        if expected.nullable == Some(true) && !column.nullable {
            return Err(shape_error(
                expected.name,
                "is NOT NULL, but keys without expiry store NULL there".to_owned(),
            ));
        }
    }
    for column in &columns {
        if !COLUMNS.iter().any(|e| e.name == column.name) && !column.nullable && !column.has_default {
            return Err(shape_error(
                &column.name,
                "is NOT NULL without a default, so the layer's inserts would fail".to_owned(),
            ));
        }
    }
    // Prefix scans page through keys in byte order: the key column must compare bytes.
    let key_collation = columns
        .iter()
        .find(|c| c.name == "key")
        .and_then(|c| c.collation.clone());
    let byte_order = match key_collation.as_deref() {
        Some("C" | "POSIX" | "ucs_basic") => true,
        Some(_) => false,
        // The database's default collation.
        None => client
            .query_one(
                "SELECT datcollate IN ('C', 'POSIX') FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_error(op, e))?,
    };
    if !byte_order {
        return Err(shape_error(
            "key",
            format!(
                "has collation {}, expected COLLATE \"C\" (byte order, which prefix scans page by)",
                key_collation.as_deref().unwrap_or("default (not C)")
            ),
        ));
    }
    let unique: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
               JOIN pg_class c ON c.oid = i.indrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indnkeyatts = 1 \
               AND i.indpred IS NULL AND a.attname = 'key')",
            &[&table.schema, &table.name],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| pg_error(op, e))?;
    if !unique {
        return Err(shape_error(
            "key",
            "has no PRIMARY KEY or UNIQUE constraint of its own, which the upserts \
             (ON CONFLICT (key)) need"
                .to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["capacitor_kv", "_x", "A1", &"a".repeat(63)] {
            assert!(validate_identifier("table", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "x; drop table y",
            "\"quoted\"",
            "a.b",
            "naïve",
            "a-b",
            &"a".repeat(64),
        ] {
            let err = validate_identifier("table", bad).err();
            assert_eq!(err.as_ref().map(Error::kind), Some(ErrorKind::Config), "{bad}");
            assert!(err.is_some_and(|e| e.message().contains("`table`")));
        }
    }

    #[test]
    fn expiry_index_names_fit() {
        let short = Table::new("public", "kv").ok().map(|t| t.expiry_index());
        assert_eq!(short.as_deref(), Some("kv_expires_at_idx"));
        let a = Table::new("public", &"a".repeat(63))
            .ok()
            .map(|t| t.expiry_index());
        let b = Table::new("public", &format!("{}b", "a".repeat(62)))
            .ok()
            .map(|t| t.expiry_index());
        assert!(a.as_ref().is_some_and(|n| n.len() <= 63));
        assert_ne!(a, b);
    }
}
