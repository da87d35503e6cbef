//! Postgres change capture: installation (`strom postgres enable`,
//! `disable`, `status`, or SQL `strom.enable_realtime`), the start-up
//! checks, and the loop that turns the slot's messages into events.

use super::pgoutput::{self, Message};
use crate::auth::Principal;
use crate::engine::Engine;
use crate::event::{Event, EventType, check_not_reserved, validate_collection};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};
use thiserror::Error;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("cannot connect to PostgreSQL: {}", describe(.0))]
    Connect(tokio_postgres::Error),
    #[error("PostgreSQL: {}", describe(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("PostgreSQL is not ready for change capture: {0}")]
    Requirement(String),
    #[error("{0}")]
    Invalid(String),
}

/// The server's own message when there is one ("db error" says nothing).
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => error.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: String,
    /// The logical replication slot (and the prefix of the lock key).
    pub slot: String,
    /// How often an idle capture looks for new changes.
    pub poll_interval: Duration,
    /// Changes read per round.
    pub batch: i32,
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            slot: "strom".into(),
            poll_interval: Duration::from_millis(100),
            batch: 1000,
        }
    }
}

const PUBLICATION: &str = "strom_messages";

/// The trigger function and the `strom.enable_realtime` /
/// `strom.disable_realtime` functions users may call from SQL.
const INSTALL_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS strom;

CREATE OR REPLACE FUNCTION strom.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  row_new jsonb;
  row_old jsonb;
  record_id text;
BEGIN
  IF TG_OP <> 'DELETE' THEN row_new := to_jsonb(NEW); END IF;
  IF TG_OP <> 'INSERT' THEN row_old := to_jsonb(OLD); END IF;
  SELECT string_agg(coalesce(row_new, row_old) ->> key, ',')
    INTO record_id FROM unnest(TG_ARGV[1:]) AS key;
  PERFORM pg_logical_emit_message(true, 'strom', jsonb_build_object(
    'op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
    'collection', TG_ARGV[0], 'id', record_id,
    'new', row_new, 'old', row_old)::text);
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION strom.enable_realtime(
  schema_name text, table_name text, collection text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  keys text;
BEGIN
  SELECT string_agg(quote_literal(a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))
    INTO keys
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
   WHERE i.indrelid = format('%I.%I', schema_name, table_name)::regclass AND i.indisprimary;
  IF keys IS NULL THEN
    RAISE EXCEPTION 'table %.% has no primary key: strom needs one for record_id', schema_name, table_name;
  END IF;
  EXECUTE format('DROP TRIGGER IF EXISTS strom_capture ON %I.%I', schema_name, table_name);
  EXECUTE format(
    'CREATE TRIGGER strom_capture AFTER INSERT OR UPDATE OR DELETE ON %I.%I '
    'FOR EACH ROW EXECUTE FUNCTION strom.capture(%L, %s)',
    schema_name, table_name, coalesce(collection, schema_name || '.' || table_name), keys);
END $$;

CREATE OR REPLACE FUNCTION strom.disable_realtime(schema_name text, table_name text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('DROP TRIGGER IF EXISTS strom_capture ON %I.%I', schema_name, table_name);
END $$;

-- Fluxbase's names (seed 002), for its users' SQL: `SELECT
-- enable_realtime('public', 'products')`.
CREATE OR REPLACE FUNCTION public.enable_realtime(schema_name text, table_name text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM strom.enable_realtime(schema_name, table_name);
END $$;

CREATE OR REPLACE FUNCTION public.disable_realtime(schema_name text, table_name text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM strom.disable_realtime(schema_name, table_name);
END $$;
"#;

pub async fn connect(url: &str) -> Result<Client, CaptureError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(CaptureError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}

/// Fails with a clear message unless the database can feed a slot: logical
/// WAL, and a role allowed to use replication slots.
pub async fn check_requirements(client: &Client) -> Result<(), CaptureError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(CaptureError::Requirement(format!(
            "wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, allowed): (String, bool) = (row.get(0), row.get(1));
    if !allowed {
        return Err(CaptureError::Requirement(format!(
            "role {role} may not use replication slots; run ALTER ROLE {role} WITH REPLICATION"
        )));
    }
    let keep: String = client
        .query_one("SHOW max_slot_wal_keep_size", &[])
        .await?
        .get(0);
    if keep == "-1" {
        tracing::warn!(
            "max_slot_wal_keep_size is unlimited: while strom is stopped, WAL kept for its slot grows without bound; set a limit (strom reports a lost slot with a resync event)"
        );
    }
    Ok(())
}

/// Creates the slot, the publication and the functions, if missing.
pub async fn install(client: &Client, slot: &str) -> Result<(), CaptureError> {
    // A slot cannot be created in a transaction that has written, so first.
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE PUBLICATION {PUBLICATION}"))
            .await?;
    }
    client.batch_execute(INSTALL_SQL).await?;
    Ok(())
}

/// `public.products` → (`public`, `products`); no schema means `public`.
pub fn split_table(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((schema, table)) => (schema.to_owned(), table.to_owned()),
        None => ("public".to_owned(), name.to_owned()),
    }
}

/// Installs what is missing and turns capture on for `table`, as
/// `collection` (default `schema.table`).
pub async fn enable(
    url: &str,
    slot: &str,
    table: &str,
    collection: Option<&str>,
) -> Result<String, CaptureError> {
    let (schema, name) = split_table(table);
    let collection = collection.map_or_else(|| format!("{schema}.{name}"), str::to_owned);
    validate_collection(&collection)
        .and_then(|()| check_not_reserved(&collection))
        .map_err(|e| CaptureError::Invalid(e.to_string()))?;
    let client = connect(url).await?;
    check_requirements(&client).await?;
    install(&client, slot).await?;
    client
        .execute(
            "SELECT strom.enable_realtime($1, $2, $3)",
            &[&schema, &name, &collection],
        )
        .await?;
    Ok(collection)
}

pub async fn disable(url: &str, table: &str) -> Result<(), CaptureError> {
    let (schema, name) = split_table(table);
    let client = connect(url).await?;
    client
        .execute("SELECT strom.disable_realtime($1, $2)", &[&schema, &name])
        .await?;
    Ok(())
}

/// A table with capture on.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub table: String,
    pub collection: String,
}

/// The slot's state: `wal_status` and how many bytes of WAL strom has yet
/// to read.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    pub wal_status: String,
    pub lag_bytes: i64,
}

pub async fn captured_tables(client: &Client) -> Result<Vec<Captured>, CaptureError> {
    let rows = client
        .query(
            "SELECT n.nspname::text || '.' || c.relname::text, t.tgargs \
               FROM pg_trigger t \
               JOIN pg_class c ON c.oid = t.tgrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE t.tgname = 'strom_capture' AND NOT t.tgisinternal \
              ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let args: Vec<u8> = row.get(1);
            let collection = args.split(|b| *b == 0).next().unwrap_or_default();
            Captured {
                table: row.get(0),
                collection: String::from_utf8_lossy(collection).into_owned(),
            }
        })
        .collect())
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, CaptureError> {
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, 'unknown'), \
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotState {
        wal_status: row.get(0),
        lag_bytes: row.get(1),
    }))
}

/// What the capture trigger emits.
#[derive(Deserialize)]
struct Change {
    op: String,
    collection: String,
    id: Option<String>,
    new: Option<Value>,
    old: Option<Value>,
}

fn change_event(content: &[u8], lsn: u64, commit_time: SystemTime) -> Result<Event, String> {
    let change: Change =
        serde_json::from_slice(content).map_err(|e| format!("unreadable change: {e}"))?;
    let (event_type, data, old_data) = match change.op.as_str() {
        "INSERT" => (EventType::RecordCreated, change.new, None),
        "UPDATE" => (EventType::RecordUpdated, change.new, change.old),
        "DELETE" => (EventType::RecordDeleted, change.old.clone(), change.old),
        other => return Err(format!("unknown operation {other:?}")),
    };
    let event = Event {
        event_type,
        collection: change.collection,
        record_id: change.id.unwrap_or_default(),
        data: data.unwrap_or_else(Event::empty_data),
        old_data,
        timestamp: commit_time,
        seq: 0,
        sender: None,
        origin: None,
        id: Some(format!("pg:{}", pgoutput::format_lsn(lsn))),
    };
    event.validate().map_err(|e| e.to_string())?;
    Ok(event)
}

/// Connects, checks the database and installs what capture needs. Called
/// at start-up, so a misconfigured database stops strom with a clear error.
pub async fn prepare(config: &PostgresConfig) -> Result<(), CaptureError> {
    let client = connect(&config.url).await?;
    check_requirements(&client).await?;
    install(&client, &config.slot).await
}

/// Runs the capture until `stop` turns true: waits for the lock, then
/// reads, publishes and advances; starts over after any error. It stops
/// only between batches, so a batch it published is also advanced past
/// and a restart does not publish it again.
pub async fn run(config: PostgresConfig, engine: Engine, mut stop: watch::Receiver<bool>) {
    loop {
        match capture(&config, &engine, &mut stop).await {
            Ok(()) => return,
            Err(e) => tracing::warn!("Postgres capture: {e}; retrying"),
        }
        if stopped_during(&mut stop, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// Waits `pause`; `true` if `stop` turned true first.
async fn stopped_during(stop: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    let stopped = tokio::time::timeout(pause, stop.wait_for(|stop| *stop)).await;
    stopped.is_ok()
}

/// Captures until stopped (`Ok`) or an error.
async fn capture(
    config: &PostgresConfig,
    engine: &Engine,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), CaptureError> {
    let client = connect(&config.url).await?;
    let lock_key = format!("strom.capture:{}", config.slot);
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key])
            .await?
            .get(0);
        if locked {
            break;
        }
        if stopped_during(stop, config.poll_interval.max(Duration::from_millis(500))).await {
            return Ok(());
        }
    }
    tracing::info!(slot = %config.slot, "Postgres capture: this node reads the slot");
    let principal = Principal::System("postgres");
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if let Some(state) = slot_state(&client, &config.slot).await?
            && state.wal_status == "lost"
        {
            resync(&client, config, engine, &principal).await?;
            continue;
        }
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
                &[&config.slot, &config.batch, &PUBLICATION],
            )
            .await?;
        if rows.is_empty() {
            if stopped_during(stop, config.poll_interval).await {
                return Ok(());
            }
            continue;
        }
        let mut events = Vec::new();
        let mut commit_time = SystemTime::now();
        let mut advance_to = None;
        for row in &rows {
            let data: Vec<u8> = row.get(0);
            match pgoutput::parse(&data) {
                Some(Message::Begin { commit_time: at }) => commit_time = at,
                Some(Message::Logical {
                    lsn,
                    prefix,
                    content,
                }) if prefix == "strom" => match change_event(&content, lsn, commit_time) {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::error!(lsn = %pgoutput::format_lsn(lsn), "skipping a change: {e}")
                    }
                },
                Some(Message::Commit { end_lsn }) => advance_to = Some(end_lsn),
                _ => {}
            }
        }
        if !events.is_empty() {
            engine
                .publish(&principal, events)
                .await
                .map_err(|e| CaptureError::Invalid(format!("publishing changes: {e}")))?;
        }
        if let Some(lsn) = advance_to {
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&config.slot, &pgoutput::format_lsn(lsn)],
                )
                .await?;
        }
    }
}

/// The slot was lost (WAL it needed was removed): changes are gone. Say so
/// with a `collection.updated` `{"resync": true}` on every captured
/// collection, so subscribers reload, and start a fresh slot.
async fn resync(
    client: &Client,
    config: &PostgresConfig,
    engine: &Engine,
    principal: &Principal,
) -> Result<(), CaptureError> {
    tracing::error!(slot = %config.slot, "the replication slot was lost; changes were missed; announcing a resync");
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
        .await?;
    install(client, &config.slot).await?;
    let events: Vec<Event> = captured_tables(client)
        .await?
        .into_iter()
        .map(|captured| {
            let reason = "change capture lost its replication slot; reload this collection";
            let data = json!({"resync": true, "reason": reason});
            Event::new(EventType::CollectionUpdated, captured.collection, "", data)
        })
        .collect();
    if !events.is_empty() {
        engine
            .publish(principal, events)
            .await
            .map_err(|e| CaptureError::Invalid(format!("publishing the resync: {e}")))?;
    }
    Ok(())
}
