//! SQL names: a table name split into schema and table, quoting, and the
//! identifier rule for the names the relay creates (slot, publication, schema).
//! A leaf: it depends on nothing else in the crate but the config error.

use super::{invalid, ConfigError};

/// A table name split into schema and table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `outbox.table`: `"table"` (schema `public`) or `"schema.table"`.
    pub fn parse(key: &'static str, t: &str) -> Result<TableName, ConfigError> {
        let (schema, name) = t.split_once('.').unwrap_or(("public", t));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(invalid(
                key,
                format!("{t:?} must be \"table\" or \"schema.table\""),
            ));
        }
        Ok(TableName {
            schema: schema.into(),
            name: name.into(),
        })
    }

    /// `"schema"."table"`, for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The names the relay creates: 1 to 63 of lowercase letters, digits and `_`
/// (no quoting needed anywhere, and PostgreSQL's slot name rule).
pub(crate) fn validate_identifier(key: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > 63 {
        return Err(invalid(key, format!("{v:?} must be 1 to 63 characters")));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            key,
            format!("{v:?} may contain only lowercase letters, digits and '_'"),
        ));
    }
    Ok(())
}
