//! The `strom` command: `serve` runs the service; `publish` and `subscribe`
//! are gRPC clients for trying it from a terminal.

mod bench;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use strom::auth::{Auth, AuthSettings, KeySource};
use strom::bus::Retention;
use strom::bus::nats::NatsConfig;
use strom::bus::presence_sync::PresenceTiming;
use strom::capture::postgres::PostgresConfig;
use strom::client::{Client, Update};
use strom::engine::EngineConfig;
use strom::event::{Event, EventType};
use strom::server::{Server, ServerConfig};

#[derive(Parser)]
#[command(
    name = "strom",
    version,
    about = "Realtime service: live data over gRPC, WebSocket and SSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (gRPC, gRPC-Web, WebSocket, SSE and REST on one port).
    Serve(Box<ServeArgs>),
    /// Publish one event through the Publish RPC and print its seq.
    Publish(PublishArgs),
    /// Subscribe through the Subscribe RPC and print events as JSON lines.
    Subscribe(SubscribeArgs),
    /// Mint a development token with the configured JWT key.
    Token(TokenArgs),
    /// Postgres change capture: enable or disable tables, show status.
    #[command(subcommand)]
    Postgres(PostgresCommand),
    /// Load generator for benchmarks against a running server.
    #[command(subcommand)]
    Bench(bench::Bench),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "STROM_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// NATS server URL; unset means the in-memory bus (one node).
    #[arg(long, env = "STROM_NATS_URL")]
    nats_url: Option<String>,
    /// JetStream stream holding the events.
    #[arg(long, env = "STROM_NATS_STREAM", default_value = "STROM_EVENTS")]
    nats_stream: String,
    /// Subject prefix: events travel on `<prefix>.<collection>`.
    #[arg(
        long,
        env = "STROM_NATS_SUBJECT_PREFIX",
        default_value = "strom.events"
    )]
    nats_subject_prefix: String,
    /// History kept for resuming subscribers, by age (e.g. 24h, 30m).
    #[arg(long, env = "STROM_HISTORY_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    history_max_age: Duration,
    /// History kept for resuming subscribers, by count.
    #[arg(long, env = "STROM_HISTORY_MAX_EVENTS", default_value_t = 100_000)]
    history_max_events: usize,
    /// With NATS: how often a node tells the others it is alive.
    #[arg(long, env = "STROM_PRESENCE_HEARTBEAT", default_value = "2s", value_parser = parse_duration)]
    presence_heartbeat: Duration,
    /// With NATS: a node silent this long is gone, and its users leave.
    #[arg(long, env = "STROM_PRESENCE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    presence_timeout: Duration,
    /// Deliveries queued per connection before a slow reader is cut off.
    #[arg(long, env = "STROM_QUEUE_CAPACITY", default_value_t = 4096)]
    queue_capacity: usize,
    /// Subscriptions one connection may hold.
    #[arg(long, env = "STROM_MAX_SUBSCRIPTIONS", default_value_t = 256)]
    max_subscriptions: usize,
    /// Channel messages a client connection may send per second.
    #[arg(long, env = "STROM_CLIENT_PUBLISH_RATE", default_value_t = 20)]
    client_publish_rate: u32,
    /// Largest channel message a client connection may send (bytes of JSON).
    #[arg(long, env = "STROM_CLIENT_MESSAGE_BYTES", default_value_t = 16384)]
    client_message_bytes: usize,
    /// WebSocket heartbeat: the server sends `ping` this often.
    #[arg(long, env = "STROM_WS_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    ws_ping_interval: Duration,
    /// WebSocket connections silent this long are closed.
    #[arg(long, env = "STROM_WS_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    ws_idle_timeout: Duration,
    /// Largest WebSocket frame accepted from a client, in bytes.
    #[arg(long, env = "STROM_WS_MAX_FRAME_BYTES", default_value_t = 65536)]
    ws_max_frame_bytes: usize,
    /// SSE keep-alive comment interval.
    #[arg(long, env = "STROM_SSE_KEEPALIVE", default_value = "15s", value_parser = parse_duration)]
    sse_keepalive: Duration,
    /// Origins allowed by CORS (repeat or comma-separate); none means any.
    #[arg(
        long = "cors-origin",
        env = "STROM_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    #[command(flatten)]
    auth: AuthArgs,
    /// Capture changes of this PostgreSQL database (tables enabled with
    /// `strom postgres enable`).
    #[arg(long, env = "STROM_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// The logical replication slot the capture reads.
    #[arg(long, env = "STROM_POSTGRES_SLOT", default_value = "strom")]
    postgres_slot: String,
}

#[derive(Subcommand)]
enum PostgresCommand {
    /// Capture INSERT, UPDATE and DELETE of a table (installs what is missing).
    Enable {
        /// The table, `schema.table` (schema defaults to public).
        table: String,
        /// The collection its events go to (default `schema.table`).
        #[arg(long = "as")]
        collection: Option<String>,
        #[command(flatten)]
        db: PostgresArgs,
    },
    /// Stop capturing a table.
    Disable {
        table: String,
        #[command(flatten)]
        db: PostgresArgs,
    },
    /// Captured tables, and the capture's lag.
    Status {
        #[command(flatten)]
        db: PostgresArgs,
    },
}

#[derive(Args)]
struct PostgresArgs {
    #[arg(long, env = "STROM_POSTGRES_URL", hide_env_values = true)]
    postgres_url: String,
    #[arg(long, env = "STROM_POSTGRES_SLOT", default_value = "strom")]
    postgres_slot: String,
}

/// Authentication settings; any of them turns off open mode.
#[derive(Args)]
struct AuthArgs {
    /// Policy file (TOML): rules, API keys, JWT settings.
    #[arg(long, env = "STROM_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Shared secret for HS256/384/512 tokens (at least 32 bytes).
    #[arg(long, env = "STROM_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM public key for RS*, PS*, ES256/384 or EdDSA tokens.
    #[arg(long, env = "STROM_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<std::path::PathBuf>,
    /// JWKS file; the token's `kid` picks the key.
    #[arg(long, env = "STROM_JWKS")]
    jwks: Option<std::path::PathBuf>,
    /// The one algorithm accepted (default HS256 with a secret, else RS256).
    #[arg(long, env = "STROM_JWT_ALGORITHM")]
    jwt_algorithm: Option<String>,
    /// Required `iss`.
    #[arg(long, env = "STROM_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud`.
    #[arg(long, env = "STROM_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

impl AuthArgs {
    fn settings(&self) -> AuthSettings {
        AuthSettings {
            config_file: self.config.clone(),
            jwt_secret: self.jwt_secret.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            jwks: self.jwks.clone(),
            jwt_algorithm: self.jwt_algorithm.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_audience: self.jwt_audience.clone(),
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    /// The subject: the user id.
    #[arg(long)]
    sub: String,
    /// More claims, as a JSON object, e.g. '{"strom":{"publish":["*"]}}'.
    #[arg(long, default_value = "{}")]
    claims: String,
    /// Lifetime, e.g. 15m, 1h.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// PEM private key, for algorithms other than HS*.
    #[arg(long)]
    private_key: Option<std::path::PathBuf>,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Args)]
struct PublishArgs {
    /// gRPC address of a strom node.
    #[arg(long, env = "STROM_SERVER", default_value = "http://127.0.0.1:8000")]
    server: String,
    collection: String,
    /// Event type, e.g. record.created.
    #[arg(long = "type", default_value = "record.created")]
    event_type: String,
    #[arg(long)]
    record_id: Option<String>,
    /// The record as a JSON object.
    #[arg(long, default_value = "{}")]
    data: String,
    /// The record before the change, as a JSON object.
    #[arg(long)]
    old_data: Option<String>,
    /// A token or API key, sent as `authorization: Bearer`.
    #[arg(long, env = "STROM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct SubscribeArgs {
    #[arg(long, env = "STROM_SERVER", default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Collection name, or `*` for all.
    collection: String,
    /// Text filter, e.g. 'price > 100 && status = "published"'.
    #[arg(long)]
    filter: Option<String>,
    #[arg(long)]
    record_id: Option<String>,
    /// Resume after this seq.
    #[arg(long)]
    since: Option<u64>,
    /// A token or API key, sent as `authorization: Bearer`.
    #[arg(long, env = "STROM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `250ms`, `30s`, `5m`, `24h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 30s, 5m or 24h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STROM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Publish(args) => publish(args).await,
        Command::Subscribe(args) => subscribe(args).await,
        Command::Bench(bench) => bench::run(bench).await,
        Command::Token(args) => token(args),
        Command::Postgres(command) => postgres(command).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let nats = args.nats_url.map(|url| NatsConfig {
        stream: args.nats_stream,
        subject_prefix: args.nats_subject_prefix,
        presence: PresenceTiming {
            heartbeat: args.presence_heartbeat,
            timeout: args.presence_timeout,
        },
        ..NatsConfig::new(url)
    });
    let config = ServerConfig {
        engine: EngineConfig {
            queue_capacity: args.queue_capacity,
            max_subscriptions: args.max_subscriptions,
            client_publish_rate: args.client_publish_rate,
            client_message_bytes: args.client_message_bytes,
        },
        nats,
        retention: Retention {
            max_age: args.history_max_age,
            max_events: args.history_max_events,
        },
        ws: strom::edge::ws::WsConfig {
            ping_interval: args.ws_ping_interval,
            idle_timeout: args.ws_idle_timeout,
            max_frame_bytes: args.ws_max_frame_bytes,
        },
        sse_keepalive: args.sse_keepalive,
        cors_origins: args.cors_origins,
        auth: args.auth.settings(),
        postgres: args.postgres_url.map(|url| PostgresConfig {
            slot: args.postgres_slot,
            ..PostgresConfig::new(url)
        }),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let backend = if config.nats.is_some() {
        "nats"
    } else {
        "memory"
    };
    let address = listener.local_addr()?;
    tracing::info!(%address, backend, "strom starting");
    let server = Server::start(config).await.context("cannot start strom")?;
    // Announced once the bus is up, so scripts can wait for this line.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{address}")?;
    stdout.flush()?;
    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("strom stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn client(server: &str, token: Option<&str>) -> Result<Client> {
    let client = Client::connect(server).await?;
    Ok(match token {
        Some(token) => client.with_token(token)?,
        None => client,
    })
}

async fn publish(args: PublishArgs) -> Result<()> {
    let parse_object = |name: &str, text: &str| -> Result<serde_json::Value> {
        let value: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("--{name} is not valid JSON"))?;
        if !value.is_object() {
            bail!("--{name} must be a JSON object");
        }
        Ok(value)
    };
    let event = Event {
        event_type: EventType::parse(&args.event_type)?,
        old_data: args
            .old_data
            .map(|text| parse_object("old-data", &text))
            .transpose()?,
        ..strom::client::record(
            &args.collection,
            &args.record_id.unwrap_or_default(),
            parse_object("data", &args.data)?,
        )
    };
    let seq = client(&args.server, args.token.as_deref())
        .await?
        .publish(event)
        .await
        .context("publish failed")?;
    println!("{seq}");
    Ok(())
}

async fn subscribe(args: SubscribeArgs) -> Result<()> {
    let mut subscription = client(&args.server, args.token.as_deref())
        .await?
        .subscribe(&args.collection, args.filter.as_deref(), args.since)
        .await
        .context("subscribe failed")?;
    eprintln!("subscribed");
    let mut stdout = std::io::stdout();
    while let Some(update) = subscription.next().await.context("stream ended")? {
        let line = match update {
            Update::Event(event) => strom::codec::encode_event(&event, false),
            Update::LeftFilter(event) => strom::codec::encode_event(&event, true),
            Update::Reset {
                since,
                first_available,
            } => {
                eprintln!(
                    "reset: events after {since} are no longer retained; replaying from {first_available}"
                );
                continue;
            }
        };
        stdout.write_all(&line)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
}

async fn postgres(command: PostgresCommand) -> Result<()> {
    use strom::capture::postgres;
    match command {
        PostgresCommand::Enable {
            table,
            collection,
            db,
        } => {
            let collection = postgres::enable(
                &db.postgres_url,
                &db.postgres_slot,
                &table,
                collection.as_deref(),
            )
            .await?;
            println!("capturing {table} into collection {collection}");
        }
        PostgresCommand::Disable { table, db } => {
            postgres::disable(&db.postgres_url, &table).await?;
            println!("no longer capturing {table}");
        }
        PostgresCommand::Status { db } => {
            let client = postgres::connect(&db.postgres_url).await?;
            let tables = postgres::captured_tables(&client).await?;
            if tables.is_empty() {
                println!("no table is captured");
            }
            for captured in tables {
                println!("{} -> {}", captured.table, captured.collection);
            }
            match postgres::slot_state(&client, &db.postgres_slot).await? {
                Some(state) => println!(
                    "slot {}: {}, lag {} bytes of WAL",
                    db.postgres_slot, state.wal_status, state.lag_bytes
                ),
                None => println!("slot {} does not exist yet", db.postgres_slot),
            }
        }
    }
    Ok(())
}

fn token(args: TokenArgs) -> Result<()> {
    let auth = Auth::from_settings(&args.auth.settings())?;
    let Some(jwt) = auth.jwt() else {
        bail!("no JWT key configured: pass --jwt-secret (or STROM_JWT_SECRET) or --config");
    };
    let key = match (&jwt.key, &args.private_key) {
        (KeySource::Secret(secret), _) => secret.as_bytes().to_vec(),
        (_, Some(path)) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (_, None) => bail!(
            "{:?} tokens are signed with a private key: pass --private-key",
            jwt.algorithm
        ),
    };
    let claims: serde_json::Value =
        serde_json::from_str(&args.claims).context("--claims is not valid JSON")?;
    let serde_json::Value::Object(mut claims) = claims else {
        bail!("--claims must be a JSON object");
    };
    if let Some(issuer) = &jwt.issuer {
        claims.entry("iss").or_insert_with(|| issuer.clone().into());
    }
    if let Some(audience) = &jwt.audience {
        claims
            .entry("aud")
            .or_insert_with(|| audience.clone().into());
    }
    let token = strom::auth::token::mint(jwt.algorithm, &key, &args.sub, claims, args.ttl)?;
    println!("{token}");
    Ok(())
}
