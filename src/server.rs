//! Runs strom: one listener serving gRPC, gRPC-Web, WebSocket, SSE and REST.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests drive a
//! real server on a free port. Shutdown is a drain: the listener closes,
//! every subscription stream ends with where to resume (WebSocket
//! `reconnect` and close 1012, SSE `reconnect`, gRPC UNAVAILABLE with
//! `strom-resume-since`), in-flight requests such as publishes finish, and
//! whatever is still open after `--drain-timeout` is cut.

use crate::accept::{self, ConnectionLimits};
use crate::auth::{Auth, AuthError, AuthSettings};
use crate::bus::{
    Bus, BusError, Retention,
    memory::MemoryBus,
    nats::{NatsBus, NatsConfig},
};
use crate::capture::postgres::{self, CaptureError, PostgresConfig};
use crate::edge::errors::{ApiError, ErrorKind};
use crate::edge::grpc::{RealtimeService, generated::realtime_server::RealtimeServer};
use crate::edge::{AppState, http_routes, ws::WsConfig};
use crate::engine::{Engine, EngineConfig};
use crate::proto;
use crate::tls::{self, TlsError, TlsFiles};
use crate::write_deadline::WriteDeadline;
use axum::http::HeaderValue;
use axum::response::IntoResponse;
use axum::serve::ListenerExt;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub engine: EngineConfig,
    /// `None`: the in-memory bus.
    pub nats: Option<NatsConfig>,
    /// History kept for resuming subscribers (in memory, or by JetStream).
    pub retention: Retention,
    /// Tokens, API keys and the policy; nothing configured is open mode.
    pub auth: AuthSettings,
    /// Capture changes of this PostgreSQL database.
    pub postgres: Option<PostgresConfig>,
    pub ws: WsConfig,
    pub sse_keepalive: Duration,
    /// Origins allowed by CORS (browsers, gRPC-Web) and for WebSocket
    /// handshakes; empty means any.
    pub cors_origins: Vec<String>,
    /// Caps on connections and the header deadline.
    pub connections: ConnectionLimits,
    /// The bearer credential `/api/v1/stats` and `/metrics` require. Without
    /// it they are open in open mode and need an API key otherwise.
    pub ops_token: Option<String>,
    /// A socket write blocked this long fails, and its connection closes
    /// (see [`crate::write_deadline`]).
    pub write_timeout: Duration,
    /// Serve TLS with this certificate and key (`None`: plain TCP).
    pub tls: Option<TlsFiles>,
    /// How long a drain (SIGTERM) waits for connections to finish and
    /// WebSocket clients to be told where to resume; the rest is cut.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            engine: EngineConfig::default(),
            nats: None,
            retention: Retention::default(),
            auth: AuthSettings::default(),
            postgres: None,
            ws: WsConfig::default(),
            sse_keepalive: Duration::from_secs(15),
            cors_origins: Vec::new(),
            ops_token: None,
            connections: ConnectionLimits::default(),
            write_timeout: Duration::from_secs(5),
            tls: None,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("invalid CORS origin {0:?}")]
    Cors(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A server whose bus is connected, ready to serve.
pub struct Server {
    engine: Engine,
    config: ServerConfig,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// Connects the bus (NATS, when configured).
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let auth = Auth::from_settings(&config.auth)?;
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        if let Some(postgres) = &config.postgres {
            postgres::prepare(postgres).await?;
        }
        if auth.is_open() {
            tracing::warn!(
                "open mode: no JWT key or policy configured, so anyone may subscribe and publish; for development only (see --jwt-secret and --config)"
            );
        }
        let (nats, retention) = (config.nats.clone(), config.retention);
        let engine = Engine::start(config.engine.clone(), auth, |router, presence| async move {
            Ok::<_, BusError>(match nats {
                None => Bus::Memory(MemoryBus::new(router, retention)),
                Some(nats) => Bus::Nats(NatsBus::connect(nats, retention, router, presence).await?),
            })
        })
        .await?;
        Ok(Server {
            engine,
            config,
            tls,
        })
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let tasks = TaskTracker::new();
        let app = app(self.engine.clone(), &self.config, tasks.clone())?;
        let (stop_capture, capture_stop) = tokio::sync::watch::channel(false);
        let capture =
            self.config.postgres.clone().map(|config| {
                tokio::spawn(postgres::run(config, self.engine.clone(), capture_stop))
            });
        let stopping = self.engine.clone();
        // Small frames go out at once: with Nagle's algorithm a frame written
        // while the previous one is unacknowledged waits for the client's
        // delayed ACK (up to 40 ms on Linux).
        let listener = listener.tap_io(|socket| {
            if let Err(error) = socket.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {error}");
            }
        });
        let listener = WriteDeadline::new(listener, self.config.write_timeout);
        let mut limits = self.config.connections.clone();
        let fitted = accept::fit_to_open_file_limit(limits.total);
        if fitted < limits.total {
            tracing::warn!(
                "--max-connections {} is more than the open-file limit leaves room for; accepting {fitted} (raise LimitNOFILE / ulimit -n)",
                limits.total
            );
            limits.total = fitted;
        }
        let drained_by = accept::serve(
            listener,
            app,
            limits,
            self.tls,
            self.config.drain_timeout,
            async move {
                shutdown.await;
                stopping.shutdown();
            },
        )
        .await;
        if let Some(mut capture) = capture {
            // Lets it finish the batch at hand (publish, then advance).
            stop_capture.send_replace(true);
            if tokio::time::timeout(Duration::from_secs(5), &mut capture)
                .await
                .is_err()
            {
                capture.abort();
            }
        }
        tasks.close();
        let _ = tokio::time::timeout_at(drained_by, tasks.wait()).await;
        Ok(())
    }
}

/// Starts a server and serves until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::start(config).await?.serve(listener, shutdown).await
}

fn app(
    engine: Engine,
    config: &ServerConfig,
    tasks: TaskTracker,
) -> Result<axum::Router, ServerError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let realtime = RealtimeServer::new(RealtimeService::new(engine.clone()));
    // Reflection in both versions: grpcurl speaks v1, some clients (Python's
    // grpcio-reflection) only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptors are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptors are valid");
    tokio::spawn(async move {
        health_reporter
            .set_serving::<RealtimeServer<RealtimeService>>()
            .await;
    });
    let grpc = tonic::service::Routes::new(realtime)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router();
    let grpc = tonic_web::GrpcWebLayer::new().layer(grpc);
    // gRPC and gRPC-Web requests go to tonic; any other unknown path is a 404.
    let fallback = move |request: axum::extract::Request| {
        let grpc = grpc.clone();
        async move {
            let is_grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if is_grpc || request.method() == http::Method::OPTIONS {
                grpc.oneshot(request).await.into_response()
            } else {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!("no route for {}", request.uri().path()),
                )
                .into_response()
            }
        }
    };
    let origins: Vec<HeaderValue> = config
        .cors_origins
        .iter()
        .map(|o| o.parse().map_err(|_| ServerError::Cors(o.clone())))
        .collect::<Result<_, _>>()?;
    let cors = cors(&origins, engine.auth().is_open());
    let state = AppState {
        engine,
        ws: config.ws.clone(),
        sse_keepalive: config.sse_keepalive,
        tasks,
        origins: origins.into(),
        ops_token: config.ops_token.as_deref().map(Arc::from),
        census: Arc::default(),
    };
    Ok(http_routes(state).fallback(fallback).layer(cors))
}

/// CORS for browsers: the configured origins; with none configured, any
/// origin in open mode (development) and none once authentication is
/// enforced. The methods and headers strom uses are listed by name, because
/// a `*` does not cover `Authorization` (Fetch standard).
fn cors(origins: &[HeaderValue], open: bool) -> CorsLayer {
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    let allow = match (origins.is_empty(), open) {
        (false, _) => AllowOrigin::list(origins.iter().cloned()),
        (true, true) => AllowOrigin::any(),
        (true, false) => AllowOrigin::list([]),
    };
    let name = http::HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([http::Method::GET, http::Method::POST, http::Method::OPTIONS])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            name("last-event-id"),
            name("x-api-key"),
            name("x-grpc-web"),
            name("x-user-agent"),
            name("grpc-timeout"),
        ])
        .expose_headers([
            name("grpc-status"),
            name("grpc-message"),
            name("grpc-status-details-bin"),
        ])
}
