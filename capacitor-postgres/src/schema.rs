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
        const SUFFIX: &str = "_expires_at_idx";
        if self.name.len() + SUFFIX.len() <= MAX_IDENTIFIER_LEN {
            return format!("{}{SUFFIX}", self.name);
        }
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let hash = self.name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("{}_{hash:08x}_exp", &self.name[..40])
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
    let row = client
        .query_opt(
            "SELECT c.relkind::text, c.relpersistence::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| pg_error(Operation::Build, e))?;
    let Some(row) = row else { return Ok(None) };
    let kind: String = row.try_get(0).map_err(|e| pg_error(Operation::Build, e))?;
    let persistence: String = row.try_get(1).map_err(|e| pg_error(Operation::Build, e))?;
    if kind != "r" && kind != "p" {
        return Err(Error::config(
            "table",
            format_args!(
                "{} exists but is not a table (pg_class.relkind = '{kind}')",
                table.qualified
            ),
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
    tx.commit().await.map_err(|e| pg_error(op, e))
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
