//! Database change capture: table changes become events, none lost.
//!
//! Postgres (the only source so far): a row trigger on each enabled table
//! calls `pg_logical_emit_message(true, 'strom', <json of the change>)`, so
//! the change enters the WAL inside its own transaction: a rollback emits
//! nothing, rows of any size arrive whole, UPDATE and DELETE carry the
//! complete old row. A persistent logical replication slot keeps every
//! message until strom has read it, also while strom is stopped. The
//! capture reads the slot with plain SQL (`pg_logical_slot_peek_binary_changes`,
//! pgoutput with messages on), publishes the events in commit order, and only
//! then advances the slot (`pg_replication_slot_advance`). A crash between
//! the two re-reads the same changes; each event carries the stable id
//! `pg:<lsn>`, which JetStream uses to store it once.
//!
//! Several nodes may run the capture against one database: a Postgres
//! advisory lock, held by the reading session, lets exactly one read at a
//! time; when that node dies its session ends, the lock is released, and
//! another node takes over within a poll interval.

pub mod pgoutput;
pub mod postgres;
