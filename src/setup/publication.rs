//! The publication: the statement that creates it (inserts only, through the
//! root of a partitioned table, a shard's row filter), creating it when
//! missing, and the tables it publishes.

use tokio_postgres::Client;

use super::{check_row_filter, q, row_filter, SetupError};
use crate::config::{quote_ident, Config, TableName};
use crate::setup::server::Server;

/// `CREATE PUBLICATION` for the relay (inserts only), without `;`. A
/// partitioned table is published through its root: rows of every partition,
/// present and future, arrive as rows of the table itself. A shard's
/// publication passes only its rows (`row_filter`, see `shard`).
pub fn create_publication_sql(
    publication: &str,
    table: &TableName,
    partitioned: bool,
    row_filter: Option<&str>,
) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {}{} WITH (publish = 'insert'{})",
        quote_ident(publication),
        table.quoted(),
        row_filter.map_or(String::new(), |f| format!(" WHERE ({f})")),
        if partitioned {
            ", publish_via_partition_root = true"
        } else {
            ""
        }
    )
}

/// Creates the publication if missing; returns whether this call created it.
pub(super) async fn ensure_publication(
    client: &Client,
    cfg: &Config,
    server: &Server,
    table: &TableName,
    partitioned: bool,
) -> Result<bool, SetupError> {
    let name = &cfg.postgres.publication;
    let found = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(q("looking up the publication"))?;
    let mut created = false;
    match found {
        Some(row) if partitioned && !row.get::<_, bool>(0) => {
            return Err(SetupError::NotViaRoot {
                name: name.clone(),
                table: table.clone(),
            })
        }
        Some(_) => {}
        None if server.in_recovery => {
            return Err(SetupError::NoPublicationOnStandby {
                name: name.clone(),
                table: table.clone(),
                partitioned,
            })
        }
        None if !cfg.postgres.create_missing => {
            return Err(SetupError::NoPublication {
                name: name.clone(),
                table: table.clone(),
            })
        }
        None => {
            let sql = create_publication_sql(name, table, partitioned, row_filter(cfg).as_deref());
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    created = true;
                    tracing::info!(publication = %name, table = %table, partitioned, "created publication")
                }
                // Another relay instance created it at the same moment.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
                Err(source) => {
                    return Err(SetupError::Query {
                        context: "creating the publication",
                        source,
                    })
                }
            }
        }
    }
    let rowfilter = if server.version_num >= 150000 {
        "rowfilter"
    } else {
        "NULL::text"
    };
    let Some(row) = client
        .query_opt(
            &format!("SELECT {rowfilter} FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"),
            &[name, &table.schema, &table.name],
        )
        .await
        .map_err(q("reading the publication's tables"))?
    else {
        return Err(SetupError::PublicationMissesTable {
            name: name.clone(),
            table: table.clone(),
        });
    };
    check_row_filter(cfg, table, row.get(0))?;
    Ok(created)
}

/// The tables (`schema.table`) a publication publishes; `None` if it does not exist.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<String>>, SetupError> {
    let rows = client
        .query(
            "SELECT t.schemaname::text || '.' || t.tablename::text
             FROM pg_publication p LEFT JOIN pg_publication_tables t ON t.pubname = p.pubname
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(q("reading the publication's tables"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect(),
    ))
}
