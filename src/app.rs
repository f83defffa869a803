//! Whole nodes: a pipe plus its HTTP front door, built from [`Settings`], started, and shut
//! down gracefully. The `restpipe` binary and the integration tests both start nodes here.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use restpipe_handler::{NodeFacts, Plugin, PluginSetup, Side};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{ClientNode, ClientOptions};
use crate::config::Settings;
use crate::http::{self, HttpGauge, HttpListen, HttpOptions, Listener, Pipe, ServeOptions};
use crate::metrics::Metrics;
use crate::node::{NodeOptions, ReloadRecord};
use crate::policy::Policy;
use crate::queue::Queue;
use crate::server::{ServerNode, ServerOptions};
use crate::tls::TlsMaterial;

/// The plug-ins named in `settings.handlers`, each built by its constructor from the values
/// given to its settings, for a node of `side`. A name this build does not register is refused
/// with the list of those it does ([`crate::plugins::REGISTERED`]).
pub fn plugins(settings: &Settings, side: Side) -> anyhow::Result<Vec<Arc<dyn Plugin>>> {
    let node = NodeFacts::new(side, settings.pipe.max_frame);
    settings
        .handlers
        .iter()
        .map(|name| {
            let Some(spec) = crate::plugins::find(name) else {
                bail!(
                    "unknown handler set {name:?}; this build has: {}",
                    crate::plugins::names()
                );
            };
            let setup = PluginSetup::new(spec, settings.plugins.of(name), node);
            spec.build(&setup).map_err(anyhow::Error::msg)
        })
        .collect()
}

/// Metrics as the settings say: off with an empty host; a host that does not resolve is
/// reported once and metrics are off.
pub fn metrics(settings: &Settings) -> Metrics {
    let Some(host) = &settings.statsd.host else {
        return Metrics::disabled();
    };
    match Metrics::statsd(host, settings.statsd.port, &settings.statsd.prefix) {
        Ok(metrics) => {
            info!(
                statsd_host = %host,
                statsd_port = settings.statsd.port,
                prefix = %settings.statsd.prefix,
                "metrics go to statsd"
            );
            metrics
        }
        Err(e) => {
            warn!(cause = %e, "metrics are off");
            Metrics::disabled()
        }
    }
}

/// A running node: its pipe and its HTTP front door.
pub struct RunningNode {
    /// The pipe.
    pub pipe: Pipe,
    /// Where the HTTP front door listens, on TCP; `0.0.0.0:0` when it listens on a Unix
    /// socket (see [`RunningNode::http_listen`]).
    pub http_addr: SocketAddr,
    /// Where the HTTP front door listens: the TCP address (its port chosen) or the socket.
    pub http_listen: HttpListen,
    stop_http: CancellationToken,
    http_task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
    queue: Option<Queue>,
}

impl RunningNode {
    /// Stop taking HTTP requests, let those in flight finish for at most `grace`, then close
    /// the pipe.
    pub async fn shutdown(self, grace: Duration) {
        self.stop_http.cancel();
        // What the queue was sending stays pending, and goes again after a restart.
        if let Some(queue) = &self.queue {
            queue.shutdown();
        }
        if let Some(pubsub) = self.pipe.core().pubsub.get() {
            pubsub.shutdown();
        }
        let mut http_task = self.http_task;
        if tokio::time::timeout(grace, &mut http_task).await.is_err() {
            warn!("HTTP requests still in flight after the grace period");
            http_task.abort();
        }
        match &self.pipe {
            Pipe::Server(server) => server.shutdown(grace).await,
            Pipe::Client(client) => client.shutdown(grace).await,
        }
        // Send the last metrics (the final gauge, say) now rather than at the next flush.
        self.metrics.flush();
    }
}

/// Serve the front door of `pipe` on the TCP address `http` until stopped, with the default
/// guard (loopback hosts only), timeouts and connection cap.
pub async fn start_http(
    pipe: Pipe,
    options: HttpOptions,
    http: SocketAddr,
) -> anyhow::Result<RunningNode> {
    start_http_on(
        pipe,
        options,
        &ServeOptions::default(),
        &HttpListen::Tcp(http),
    )
    .await
}

/// Serve the front door of `pipe` on `listen` (TCP or a Unix socket) until stopped, guarded,
/// timed and capped as `serve` says.
pub async fn start_http_on(
    pipe: Pipe,
    options: HttpOptions,
    serve: &ServeOptions,
    listen: &HttpListen,
) -> anyhow::Result<RunningNode> {
    let (listener, http_addr, http_listen) = match listen {
        HttpListen::Tcp(addr) => {
            let tcp = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
            let bound = tcp.local_addr()?;
            (Listener::Tcp(tcp), bound, HttpListen::Tcp(bound))
        }
        HttpListen::Unix(path) => (
            http::bind_unix(path, serve.socket_mode)?,
            SocketAddr::from(([0, 0, 0, 0], 0)),
            listen.clone(),
        ),
    };
    let metrics = options.metrics.clone();
    let queue = options.queue.clone();
    let gauge = Arc::new(HttpGauge::default());
    let door = http::front_door(pipe.clone(), options, serve, gauge.clone());
    let stop_http = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        door,
        serve.limits,
        gauge,
        stop_http.clone(),
    ));
    Ok(RunningNode {
        pipe,
        http_addr,
        http_listen,
        stop_http,
        http_task,
        metrics,
        queue,
    })
}

fn node_options(
    side: Side,
    settings: &Settings,
    tls: TlsMaterial,
    metrics: Metrics,
) -> anyhow::Result<NodeOptions> {
    let mut node = NodeOptions::new(tls);
    node.pipe = settings.pipe.clone();
    node.plugins = plugins(settings, side)?;
    node.metrics = metrics;
    node.policy = policy(settings, &node.handler_names(side)?)?;
    Ok(node)
}

/// The policy of `--policy`, checked against the node's `handler_names`, and the one line that
/// says what is in force. Without a policy, a non-loopback front door still needs a token
/// (or `--http-insecure`); with one, its tokens count as one.
fn policy(settings: &Settings, handler_names: &[String]) -> anyhow::Result<Policy> {
    let Some(path) = &settings.policy else {
        info!("no --policy: every authenticated peer may call every handler");
        return Ok(Policy::open());
    };
    let policy = Policy::load(path, handler_names).map_err(anyhow::Error::msg)?;
    if let Some(token) = &settings.http_token {
        if let Some(same) = policy.token_for(token.as_bytes()) {
            bail!(
                "policy {}: token {:?} has the secret of --http-token, which has every scope; give it its own",
                path.display(),
                same.name()
            );
        }
    }
    if let HttpListen::Tcp(addr) = settings.http_listen() {
        if !addr.ip().is_loopback()
            && settings.http_token.is_none()
            && policy.tokens().is_empty()
            && !settings.http_insecure
        {
            bail!(
                "the HTTP endpoint {addr} is not on loopback: give --http-token or tokens in the policy {} (every request must then carry one), or --http-insecure",
                path.display()
            );
        }
    }
    info!(
        "policy {}: {} rules, {} tokens",
        path.display(),
        policy.rule_count(),
        policy.tokens().len()
    );
    Ok(policy)
}

fn http_options(settings: &Settings, metrics: Metrics, queue: Queue) -> HttpOptions {
    HttpOptions {
        max_body: settings.pipe.max_body,
        token: settings.http_token.clone(),
        metrics,
        queue: Some(queue),
    }
}

/// Start a node of `side` from settings.
pub async fn start(side: Side, settings: &Settings) -> anyhow::Result<RunningNode> {
    let tls = TlsMaterial::from_files(&settings.tls)?;
    start_with_tls(side, settings, tls).await
}

/// Start a node of `side` from settings, with TLS material already loaded.
pub async fn start_with_tls(
    side: Side,
    settings: &Settings,
    tls: TlsMaterial,
) -> anyhow::Result<RunningNode> {
    let metrics = metrics(settings);
    let node = node_options(side, settings, tls, metrics.clone())?;
    let pipe = match side {
        Side::Server => {
            let mut options = ServerOptions::new(node, settings.bind);
            options.max_connections = settings.max_connections;
            options.max_handshakes = settings.max_handshakes;
            options.max_handshakes_per_source = settings.max_handshakes_per_source;
            let server = ServerNode::start(options).await?;
            if let Some(cluster) = &settings.cluster {
                let options = crate::cluster::ClusterOptions {
                    urls: cluster.urls.clone(),
                    name: cluster.name.clone(),
                    replica: cluster.replica.clone().unwrap_or_else(|| {
                        crate::cluster::default_replica_name(server.local_addr().port())
                    }),
                    creds: cluster.creds.clone(),
                    tls_ca: cluster.tls_ca.clone(),
                };
                server.join_cluster(options).await?;
            }
            Pipe::Server(server)
        }
        Side::Client => {
            let mut options = ClientOptions::new(node, settings.server.clone());
            options.server_name = settings.server_name.clone();
            options.reconnect_max = settings.reconnect_max;
            Pipe::Client(ClientNode::start(options)?)
        }
    };
    // The cluster is joined first: a replica whose store another replica adopted while it
    // was away is then heard on NATS, and that replica hands the store back.
    let shared = match (&pipe, &settings.cluster) {
        (Pipe::Server(server), Some(c)) => {
            c.queue_shared_dir.as_ref().zip(server.cluster().cloned())
        }
        _ => None,
    };
    let queue = match shared {
        Some((dir, cluster)) => {
            Queue::start_shared(pipe.clone(), settings.queue.clone(), dir, cluster).await
        }
        None => Queue::start(pipe.clone(), settings.queue.clone()).await,
    }
    .map_err(|e| anyhow::anyhow!("the queue: {e}"))?;
    let pubsub = crate::pubsub::Pubsub::start(&pipe, settings.pubsub.clone())
        .map_err(|e| anyhow::anyhow!("publish/subscribe: {e}"))?;
    if let Pipe::Server(server) = &pipe {
        if let Some(cluster) = server.cluster() {
            cluster.carry_pubsub(&pubsub);
        }
    }
    let listen = settings.http_listen();
    if let HttpListen::Tcp(addr) = &listen {
        let ip = addr.ip();
        if !ip.is_loopback() && !settings.http_serve.allowed_hosts.contains(&ip.to_string()) {
            warn!(
                http = %addr,
                "the HTTP endpoint is not on loopback and --http-allowed-hosts does not name it: requests must carry a Host that it names"
            );
        }
    }
    let running = start_http_on(
        pipe,
        http_options(settings, metrics, queue),
        &settings.http_serve,
        &listen,
    )
    .await?;
    // The addresses actually bound (a port of 0 was chosen by the system), for whoever
    // started the node with port 0, and the open-files limit raised at start.
    let open_files = crate::util::open_files_limit().unwrap_or(0);
    match &running.pipe {
        Pipe::Server(server) => info!(
            role = %side,
            http = %running.http_listen,
            pipe = %server.local_addr(),
            open_files,
            "HTTP endpoint ready"
        ),
        Pipe::Client(_) => {
            info!(role = %side, http = %running.http_listen, open_files, "HTTP endpoint ready")
        }
    }
    Ok(running)
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Run a node until `stop` resolves, then shut it down gracefully.
pub async fn run(
    side: Side,
    settings: Settings,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(side, &settings).await?;
    let upkeep = tokio::spawn(upkeep(running.pipe.clone(), settings.clone()));
    stop.await;
    upkeep.abort();
    info!("shutting down");
    running.shutdown(settings.grace).await;
    Ok(())
}

/// How often a node checks how long its own certificate has left.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// From how many days before its certificate expires a node warns.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// A running node's upkeep: reload on SIGHUP, and watch the node's own certificate expiry
/// (a gauge of the days left, and a warning from [`EXPIRY_WARNING_DAYS`] before).
async fn upkeep(pipe: Pipe, settings: Settings) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut every = tokio::time::interval(EXPIRY_CHECK_EVERY);
    loop {
        #[cfg(unix)]
        let reload_asked = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let reload_asked = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = every.tick() => {}
            Some(()) = reload_asked => {
                info!("SIGHUP: reloading the node's files");
                reload(&pipe, &settings);
            }
        }
        check_expiry(&pipe);
    }
}

/// Send the gauge of the days left on this node's certificate, and warn when few are.
fn check_expiry(pipe: &Pipe) {
    let core = pipe.core();
    let own = core.own_cert.load();
    let summary = own.summary();
    core.metrics.gauge(
        "tls.certificate.days_left",
        u64::try_from(summary.days_left).unwrap_or(0),
    );
    if summary.days_left <= EXPIRY_WARNING_DAYS {
        warn!(
            days_left = summary.days_left,
            fingerprint = %summary.fingerprint,
            "this node's certificate expires soon: issue a new one and send SIGHUP (docs/CERTS.md)"
        );
    }
}

/// Re-read the node's files (CA, certificate and key, client CA, CRLs, the policy and its
/// tokens) and use them, without a restart: new handshakes use the new material; peers whose
/// certificate it no longer accepts are closed; calls from now on are judged by the new
/// policy. Everything is read and checked before anything is used: when any file cannot be
/// read or used, nothing changes and the reason is logged. The outcome is kept for
/// `/status`.
pub fn reload(pipe: &Pipe, settings: &Settings) -> ReloadRecord {
    let core = pipe.core();
    let outcome = TlsMaterial::from_files(&settings.tls)
        .map_err(|e| e.to_string())
        .and_then(|material| {
            let policy = policy(settings, &core.handler_names()).map_err(|e| format!("{e:#}"))?;
            let closed = pipe.reload_tls(&material).map_err(|e| e.to_string())?;
            core.policy.store(Arc::new(policy));
            Ok(closed)
        });
    let record = ReloadRecord {
        at: crate::util::epoch_secs(std::time::SystemTime::now()),
        ok: outcome.is_ok(),
        error: outcome.as_ref().err().cloned(),
        closed: outcome.unwrap_or_default(),
    };
    core.record_reload(record.clone());
    record
}

/// `restpipe demo`: a server and a client in this process, with throwaway certificates in a
/// temporary directory, until `stop` resolves.
pub async fn demo(
    args: crate::config::DemoArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use restpipe_certs::{CertificateAuthority, IssueOptions, DEV_CLIENT_IDENTITY};

    let ca = CertificateAuthority::generate("restpipe demo CA", &IssueOptions::ca_default())?;
    let leaf = IssueOptions::default();
    let server_cert = ca.issue_server("localhost", &["127.0.0.1".into()], &leaf)?;
    let client_cert = ca.issue_client(DEV_CLIENT_IDENTITY, &leaf)?;
    let server_tls =
        TlsMaterial::from_pem(ca.cert_pem(), &server_cert.cert_pem, &server_cert.key_pem)?;
    let client_tls =
        TlsMaterial::from_pem(ca.cert_pem(), &client_cert.cert_pem, &client_cert.key_pem)?;

    // The files handlers serve a small directory made for the demo.
    let files = tempfile_dir()?;
    std::fs::write(
        files.join("hello.txt"),
        "hello from the client node's files\n",
    )?;
    std::fs::create_dir_all(files.join("reports"))?;
    std::fs::write(
        files.join("reports").join("q3.csv"),
        "quarter,revenue\nq3,42\n",
    )?;

    let plugin_values = crate::plugins::demo_values(&files).map_err(anyhow::Error::msg)?;
    // The queue and the topic log live in a directory of the demo's own (not the one the files
    // handlers serve), removed when it stops: a demo leaves no state in the user's home, and
    // two demos never share a store.
    let data = std::env::temp_dir().join(format!("restpipe-demo-{}-data", std::process::id()));
    let base = |side: Side, http: SocketAddr| -> anyhow::Result<Settings> {
        // Metrics and logs as the flags and environment say (RP_STATSD_*, DEBUG), like a node.
        let mut s = Settings::resolve(args.node_args(), side).map_err(anyhow::Error::msg)?;
        s.http = http;
        s.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        s.handlers = args.handlers.clone();
        s.plugins = plugin_values.clone();
        s.grace = Duration::from_secs(2);
        s.queue.data_dir = data.join(side.as_str());
        if s.pubsub.data_dir.is_some() {
            s.pubsub.data_dir = Some(s.queue.data_dir.clone());
        }
        Ok(s)
    };
    let server_settings = base(Side::Server, args.server_http)?;
    let server = start_with_tls(Side::Server, &server_settings, server_tls).await?;
    let Pipe::Server(server_pipe) = &server.pipe else {
        bail!("the demo's server node did not start as a server");
    };
    let mut client_settings = base(Side::Client, args.client_http)?;
    // The demo's client subscribes to `news/**` (docs/PUBSUB.md).
    client_settings.pubsub.subscribe = vec!["news/**".into()];
    client_settings.server = server_pipe.local_addr().to_string();
    client_settings.server_name = Some("localhost".into());
    let client = start_with_tls(Side::Client, &client_settings, client_tls).await?;
    if let Pipe::Client(c) = &client.pipe {
        c.wait_connected(Duration::from_secs(10))
            .await
            .context("the demo client did not connect to the demo server")?;
    }

    let c = client.http_addr;
    let s = server.http_addr;
    let statsd = &server_settings.statsd;
    let metrics = match &statsd.host {
        Some(host) if server.pipe.core().metrics.is_enabled() => format!(
            "both nodes send statsd metrics to {host}:{port}, names prefixed {prefix:?} (RP_STATSD_HOST= turns them off)",
            port = statsd.port,
            prefix = statsd.prefix,
        ),
        Some(host) => {
            format!("off: the statsd host {host:?} cannot be used (see the warning above)")
        }
        None => "off (RP_STATSD_HOST is empty; set it and RP_STATSD_PORT to send them)".into(),
    };
    println!(
        "\nrestpipe demo: a server node and a client node ({DEV_CLIENT_IDENTITY}) are connected over mutual TLS on {pipe}.\n\
         \n\
         Client node calls the server (HTTP on {c}):\n\
         \x20 curl http://{c}/server/time\n\
         \x20 curl http://{c}/server/cat//hello%20/world\n\
         \n\
         Server node calls the client (HTTP on {s}):\n\
         \x20 curl http://{s}/client/{DEV_CLIENT_IDENTITY}/time\n\
         \x20 curl http://{s}/client/{DEV_CLIENT_IDENTITY}/files//\n\
         \x20 curl http://{s}/client/{DEV_CLIENT_IDENTITY}/file//reports/q3.csv\n\
         \n\
         Publish/subscribe (the client subscribes to news/**):\n\
         \x20 curl -N http://{c}/events/news/**     # Server-Sent Events, in another terminal\n\
         \x20 curl -d 'hello' http://{s}/publish/news/today\n\
         \n\
         Status and errors:\n\
         \x20 curl http://{s}/clients\n\
         \x20 curl http://{c}/status\n\
         \x20 curl -i http://{c}/server/nope        # 404, X-Event-Return-Code: 255\n\
         \x20 curl -i http://{c}/server/bad..noun%20  # 400\n\
         \n\
         Metrics: {metrics}\n\
         \n\
         Ctrl-C stops both.\n",
        pipe = server_pipe.local_addr(),
    );

    stop.await;
    info!("shutting down the demo");
    client.shutdown(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(&files);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// A fresh private directory for the demo's files.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("restpipe-demo-{}", std::process::id()));
    if Path::new(&dir).exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
