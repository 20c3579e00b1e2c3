//! Why a row (or logical message) cannot become a record: one typed error per
//! cause, each naming the row, the column and the setting to change.

use crate::lsn::Lsn;

/// Why a row cannot become a record.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MappingError {
    #[error("column {column:?} not found in table \"{table}\" (columns: {available}); set {setting} in the config")]
    MissingColumn {
        table: String,
        column: String,
        available: String,
        setting: String,
    },
    #[error("row of \"{table}\"{} (id {id}) has NULL in column {column:?}, which routes the event; make the column NOT NULL", at_lsn(.lsn))]
    NullColumn {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("row of \"{table}\"{} (id {id}) has an unchanged-TOAST value in column {column:?}, which an insert never has", at_lsn(.lsn))]
    UnexpectedToast {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("row of \"{table}\"{} (id {id}) has {got} columns but the relation has {expected}", at_lsn(.lsn))]
    ColumnCount {
        table: String,
        lsn: Lsn,
        id: String,
        got: usize,
        expected: usize,
    },
    #[error(
        "row of \"{table}\"{} (id {id}): column {column:?} is not valid bytea hex text", at_lsn(.lsn)
    )]
    BadBytea {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("column {column:?} of table \"{table}\" is {type_name}; {setting} needs {expected}")]
    ColumnType {
        table: String,
        column: String,
        type_name: String,
        setting: &'static str,
        expected: &'static str,
    },
    #[error("row of \"{table}\"{} (id {id}) has {value:?} in column {column:?}, which is not {expected}", at_lsn(.lsn))]
    BadValue {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
        value: String,
        /// What the value should be, and the setting that reads the column.
        expected: &'static str,
    },
    #[error("logical message at LSN {lsn} with prefix {prefix:?} {problem}")]
    BadMessage {
        prefix: String,
        lsn: Lsn,
        problem: String,
    },
    #[error("row of \"{table}\"{} (id {id}) routes to topic {topic:?}, which is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -); fix the row or outbox.topic", at_lsn(.lsn))]
    BadTopic {
        table: String,
        topic: String,
        lsn: Lsn,
        id: String,
    },
}

/// ` at LSN X/X`, or nothing for a row read by polling (no LSN known).
fn at_lsn(lsn: &Lsn) -> String {
    if *lsn == Lsn::ZERO {
        String::new()
    } else {
        format!(" at LSN {lsn}")
    }
}

impl MappingError {
    /// Short machine-readable reason (metric label and dead-letter header).
    pub fn kind(&self) -> &'static str {
        match self {
            MappingError::MissingColumn { .. } => "missing_column",
            MappingError::NullColumn { .. } => "null_column",
            MappingError::UnexpectedToast { .. } => "unexpected_toast",
            MappingError::ColumnCount { .. } => "column_count",
            MappingError::BadBytea { .. } => "bad_bytea",
            MappingError::BadTopic { .. } => "bad_topic",
            MappingError::ColumnType { .. } => "column_type",
            MappingError::BadValue { .. } => "bad_value",
            MappingError::BadMessage { .. } => "bad_message",
        }
    }
}
