//! The `nimbus` binary.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use http::Method;
use nimbus_api::{
    Change, DeployResponse, FunctionDetail, FunctionSummary, InvokeRequest, InvokeResponse,
    NodeStatus, RollbackRequest,
};
use nimbus_cli::client::Admin;
use nimbus_cli::output::{Format, human_ms, table};
use nimbus_manifest::Manifest;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

/// jemalloc rather than the system allocator: the node allocates and frees
/// across its worker threads on every request and message, where glibc's
/// arenas contend (docs/performance.md, "Design choices").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "nimbus",
    version,
    about = "Serverless WebAssembly functions on one machine"
)]
struct Cli {
    /// Data directory of the local node (state, artifacts, admin token).
    #[arg(
        long,
        global = true,
        env = "NIMBUS_DATA_DIR",
        default_value = ".nimbus"
    )]
    data_dir: PathBuf,
    /// Admin API URL; found in the data directory when absent.
    #[arg(long, global = true, env = "NIMBUS_URL")]
    url: Option<String>,
    /// Admin API token; read from the data directory when absent.
    #[arg(long, global = true, env = "NIMBUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output of listings.
    #[arg(long, short, global = true, value_enum, default_value = "text")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a node: the gateway and the admin API.
    Up {
        /// Address of the gateway, which serves functions.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin API.
        #[arg(long, default_value = "127.0.0.1:8081")]
        admin_listen: SocketAddr,
        /// Deploy this manifest once the node is up.
        #[arg(long, value_name = "MANIFEST", num_args = 0..=1, default_missing_value = "nimbus.toml")]
        deploy: Option<PathBuf>,
        /// Run the manifest's build commands before deploying it.
        #[arg(long, requires = "deploy")]
        build: bool,
        /// Log format: JSON lines, or text; default text on a terminal.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// How long function output is kept for `nimbus logs`.
        #[arg(long, default_value = "7d")]
        log_retention: String,
        /// Most function output kept, in MiB; the oldest goes first.
        #[arg(long, default_value_t = 256)]
        log_max_mb: u64,
        /// Where buckets keep their objects: `local` (under the data
        /// directory) or `s3://BUCKET[/PREFIX]` on an S3-compatible service
        /// configured by AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
        /// AWS_REGION, AWS_ENDPOINT_URL and AWS_ALLOW_HTTP.
        #[arg(long, env = "NIMBUS_OBJECT_STORE", default_value = "local")]
        object_store: String,
        /// Record nothing for /metrics, `nimbus top`, the dashboard and
        /// alerts: no counters, no kept spans (to measure what recording
        /// costs).
        #[arg(long)]
        no_metrics: bool,
        /// Scale a function to zero after this long without a request: its
        /// instances and code leave memory, its compiled artifact stays on
        /// disk and the next request maps it again. `never` keeps every
        /// function loaded.
        #[arg(long, env = "NIMBUS_SCALE_TO_ZERO_AFTER", default_value = "10m")]
        scale_to_zero_after: String,
        /// How long idle code stays in memory: `adaptive` learns each
        /// function's idle times and, once they are predictable, unloads its
        /// code soon after a call and loads it again ahead of the next one
        /// (`--scale-to-zero-after` applies until then); `fixed` applies
        /// `--scale-to-zero-after` to every function.
        #[arg(long, env = "NIMBUS_KEEP_ALIVE", value_enum, default_value_t = KeepAlive::Adaptive)]
        keep_alive: KeepAlive,
        /// The bin width of the idle times `--keep-alive adaptive` learns:
        /// 240 bins cover four hours at the default.
        #[arg(long, env = "NIMBUS_KEEP_ALIVE_RESOLUTION", default_value = "1m")]
        keep_alive_resolution: String,
        /// Export spans over OTLP to this collector, e.g.
        /// http://127.0.0.1:4318 (http) or http://127.0.0.1:4317 (grpc).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// How spans travel: http (protobuf over HTTP) or grpc.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "http")]
        otlp_protocol: String,
    },
    /// A live view of every function: requests/s, errors, latency,
    /// in-flight, queued, cold starts.
    Top {
        /// Seconds between samples.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one sample and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show a function's output (stdout and stderr), oldest first.
    Logs {
        name: String,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// Only lines this recent: `10m`, `2h`, `1d`.
        #[arg(long)]
        since: Option<String>,
        /// Only lines of this invocation.
        #[arg(long)]
        invocation: Option<String>,
        /// Only lines containing this text.
        #[arg(long)]
        grep: Option<String>,
        /// At most this many past lines.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Deploy the functions of a manifest.
    Deploy {
        /// The manifest.
        #[arg(default_value = "nimbus.toml")]
        manifest: PathBuf,
        /// Run each function's build command first.
        #[arg(long)]
        build: bool,
    },
    /// List deployed functions.
    #[command(alias = "list")]
    Ls,
    /// Show the node's status, or one function's with its versions.
    Status { name: Option<String> },
    /// Invoke a function through the admin API and print its response.
    Invoke {
        name: String,
        /// HTTP method (default GET, or POST with --data).
        #[arg(long, short = 'X')]
        method: Option<String>,
        /// Path and query the function sees.
        #[arg(long, default_value = "/")]
        path: String,
        /// A header, `Name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Request body; `@file` reads it from a file, `@-` from stdin.
        #[arg(long, short = 'd')]
        data: Option<String>,
        /// Queue the invocation and print its id instead of waiting.
        #[arg(long = "async")]
        asynchronous: bool,
        /// With --async: submissions with the same key run once.
        #[arg(long, requires = "asynchronous")]
        idempotency_key: Option<String>,
    },
    /// List a function's asynchronous invocations, newest first.
    Invocations {
        name: String,
        /// Only those in this state: queued, running, succeeded or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show one asynchronous invocation with its attempts and result.
    Invocation { id: String },
    /// The dead-letter queue of a function.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// List cron schedules with their next fire times.
    Schedules,
    /// Objects of the node's buckets.
    Objects {
        #[command(subcommand)]
        command: ObjectsCommand,
    },
    /// Remove a function.
    Rm { name: String },
    /// Activate an earlier version of a function.
    Rollback {
        name: String,
        /// Version to activate (default: the one before the active one).
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ObjectsCommand {
    /// Store a file (`-` for stdin) as BUCKET/KEY; functions watching the
    /// bucket get an object.created event.
    Put {
        target: String,
        file: String,
        /// Content type stored with the object and served back.
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Write BUCKET/KEY to a file, or to stdout.
    Get { target: String, out: Option<String> },
    /// List the objects of BUCKET, or those under BUCKET/PREFIX.
    Ls { target: String },
    /// Delete BUCKET/KEY; functions watching the bucket get an
    /// object.deleted event.
    Rm { target: String },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered invocations.
    Ls {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Queue dead-lettered invocations again with a fresh attempt budget.
    Redrive {
        name: String,
        /// An invocation to redrive; repeatable.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Redrive every dead-lettered invocation of the function.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete every dead-lettered invocation of the function.
    Purge { name: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// `--keep-alive`: how long idle code stays in memory.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KeepAlive {
    /// Learnt from each function's idle times.
    Adaptive,
    /// `--scale-to-zero-after` for every function.
    Fixed,
}

/// Installs the node's log formatter, writing to stdout through a thread
/// of its own; the guard writes what is left when dropped.
fn init_logging(
    format: Option<LogFormat>,
) -> anyhow::Result<nimbus_telemetry::console::Flusher<std::io::Stdout>> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")
    });
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stdout().is_terminal(),
    };
    let (lines, flusher) = nimbus_telemetry::console::spawn(std::io::stdout())
        .context("cannot start the log writer thread")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogOutput(lines));
    if json {
        builder.event_format(nimbus_cli::logfmt::JsonLines).init();
    } else {
        builder.init();
    }
    Ok(flusher)
}

/// Where the formatter writes each line: the log writer thread's buffer.
struct LogOutput(nimbus_telemetry::console::Lines<std::io::Stdout>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogOutput {
    type Writer = nimbus_telemetry::console::LineWriter<'a, std::io::Stdout>;

    fn make_writer(&'a self) -> Self::Writer {
        self.0.writer()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        if *meta.level() <= tracing::Level::WARN {
            self.0.urgent_writer()
        } else {
            self.0.writer()
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let admin = || Admin::discover(cli.url.clone(), cli.token.clone(), &cli.data_dir);
    match &cli.command {
        Command::Up {
            listen,
            admin_listen,
            deploy,
            build,
            log_format,
            log_retention,
            log_max_mb,
            object_store,
            no_metrics,
            scale_to_zero_after,
            keep_alive,
            keep_alive_resolution,
            otlp_endpoint,
            otlp_protocol,
        } => {
            let _log = init_logging(*log_format)?;
            // Config errors surface before any port is bound.
            let manifest = match deploy {
                Some(path) => {
                    let m = Manifest::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                    if *build {
                        nimbus_cli::deploy::build(&m)?;
                    }
                    Some(m)
                }
                None => None,
            };
            let config = nimbus_node::NodeConfig {
                listen: *listen,
                admin_listen: *admin_listen,
                data_dir: cli.data_dir.clone(),
                log_retention: nimbus_telemetry::logs::Retention {
                    max_age: nimbus_manifest::limits::parse_duration(
                        log_retention,
                        "--log-retention",
                    )
                    .map_err(|e| anyhow::anyhow!(e))?,
                    max_bytes: log_max_mb.saturating_mul(1 << 20),
                },
                metrics: !*no_metrics,
                scale_to_zero_after: match scale_to_zero_after.as_str() {
                    "never" => None,
                    text => Some(
                        nimbus_manifest::limits::parse_duration(text, "--scale-to-zero-after")
                            .map_err(|e| anyhow::anyhow!(e))?,
                    ),
                },
                adaptive_keep_alive: match keep_alive {
                    KeepAlive::Fixed => None,
                    KeepAlive::Adaptive => {
                        let bin = nimbus_manifest::limits::parse_duration(
                            keep_alive_resolution,
                            "--keep-alive-resolution",
                        )
                        .map_err(|e| anyhow::anyhow!(e))?;
                        if bin.is_zero() {
                            anyhow::bail!(
                                "--keep-alive-resolution must be longer than zero, e.g. \"1m\""
                            );
                        }
                        Some(bin)
                    }
                },
                otlp: match otlp_endpoint {
                    Some(endpoint) => Some((endpoint.clone(), otlp_protocol.parse()?)),
                    None => None,
                },
                objects: match object_store.as_str() {
                    "local" => nimbus_node::ObjectStorage::Local,
                    url if url.starts_with("s3://") => {
                        nimbus_node::ObjectStorage::S3(url.to_owned())
                    }
                    other => anyhow::bail!(
                        "invalid --object-store `{other}`: write local or s3://BUCKET[/PREFIX]"
                    ),
                },
            };
            let node = nimbus_node::start(config).await?;
            if let Some(m) = manifest {
                let admin = Admin::discover(
                    Some(format!("http://{}", node.admin_addr)),
                    None,
                    &cli.data_dir,
                )?;
                match nimbus_cli::deploy::deploy(&admin, &m).await {
                    Ok(resp) => {
                        print_deploy(&resp, &format!("http://{}", node.gateway_addr), cli.output)?
                    }
                    Err(e) => {
                        node.shutdown();
                        node.wait().await;
                        return Err(e);
                    }
                }
            }
            eprintln!(
                "nimbus is up: functions on http://{}, admin API on http://{} (Ctrl-C to stop)",
                node.gateway_addr, node.admin_addr
            );
            nimbus_node::wait_for_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
            node.shutdown();
            node.wait().await;
            Ok(())
        }
        Command::Deploy { manifest, build } => {
            let m = Manifest::load(manifest).map_err(|e| anyhow::anyhow!("{e}"))?;
            if *build {
                nimbus_cli::deploy::build(&m)?;
            }
            let admin = admin()?;
            let resp = nimbus_cli::deploy::deploy(&admin, &m).await?;
            let status: NodeStatus = admin.call(Method::GET, "/v1/status", None::<&()>).await?;
            print_deploy(&resp, &status.gateway_url, cli.output)
        }
        Command::Ls => {
            let list: Vec<FunctionSummary> = admin()?
                .call(Method::GET, "/v1/functions", None::<&()>)
                .await?;
            if cli.output == Format::Json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|f| {
                    vec![
                        f.name.to_string(),
                        f.app.to_string(),
                        format!("v{}", f.version),
                        if !f.ready {
                            "failed".into()
                        } else if f.loaded {
                            "loaded".into()
                        } else {
                            // Scaled to zero, or not called since the start:
                            // the next request loads it.
                            "on disk".into()
                        },
                        f.in_flight.to_string(),
                        f.idle_instances.to_string(),
                        f.routes.join(" "),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NAME",
                        "APP",
                        "VERSION",
                        "STATE",
                        "IN-FLIGHT",
                        "IDLE",
                        "ROUTES"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        Command::Status { name: None } => {
            let s: NodeStatus = admin()?
                .call(Method::GET, "/v1/status", None::<&()>)
                .await?;
            if cli.output == Format::Json {
                return print_json(&s);
            }
            println!(
                "node        nimbus {} (pid {}), up {}s",
                s.version, s.pid, s.uptime_secs
            );
            println!("gateway     {}", s.gateway_url);
            println!("admin       {}", s.admin_url);
            println!("data        {}", s.data_dir);
            println!(
                "functions   {} serving, {} failed to load",
                s.functions, s.functions_failed
            );
            println!(
                "requests    {} in flight, {} since start",
                s.in_flight, s.invocations
            );
            println!(
                "async       {} queued, {} running, {} dead-lettered",
                s.async_queued, s.async_running, s.dead_lettered
            );
            for src in &s.sources {
                println!("source      {} {}", src.function, source_line(src));
            }
            println!(
                "engine      {} compiled, {} optimised, {} loaded from the artifact cache (fingerprint {})",
                s.engine.compiled,
                s.engine.optimized,
                s.engine.loaded_from_cache,
                s.engine_fingerprint
            );
            Ok(())
        }
        Command::Status { name: Some(name) } => {
            let d: FunctionDetail = admin()?
                .call(Method::GET, &format!("/v1/functions/{name}"), None::<&()>)
                .await?;
            if cli.output == Format::Json {
                return print_json(&d);
            }
            let s = &d.summary;
            println!("function    {} (app {})", s.name, s.app);
            println!(
                "version     v{}  {}",
                s.version,
                if s.ready { "ready" } else { "failed" }
            );
            if let Some(e) = &s.error {
                println!("error       {e}");
            }
            println!("component   sha256:{}", s.digest);
            println!(
                "state       {}, {} in flight, {} idle instance{}",
                if s.loaded {
                    "loaded"
                } else {
                    "on disk (the next request loads it)"
                },
                s.in_flight,
                s.idle_instances,
                if s.idle_instances == 1 { "" } else { "s" }
            );
            if let Some(w) = s.keep_alive {
                let kept = if w.load_at_ms == 0 {
                    format!("kept until {} after each call", human_ms(w.unload_at_ms))
                } else {
                    format!(
                        "unloaded after each call, loaded again from {} to {}",
                        human_ms(w.load_at_ms),
                        human_ms(w.unload_at_ms)
                    )
                };
                println!("keep-alive  {kept} (learnt from its idle times)");
            }
            println!("routes      {}", s.routes.join(" "));
            println!(
                "limits      memory {} MiB, timeout {}, max_concurrency {}, max_body {} MiB",
                s.config.limits.memory.get(),
                s.config.limits.timeout,
                s.config.limits.max_concurrency.get(),
                s.config.limits.max_body.get()
            );
            if !s.config.reuse.is_fresh() {
                println!(
                    "reuse       an instance serves up to {} requests",
                    s.config.reuse.get()
                );
            }
            if !s.config.prewarm.is_none() {
                let n = s.config.prewarm.get();
                println!(
                    "prewarm     {n} instance{} kept ready; never scales to zero",
                    if n == 1 { "" } else { "s" }
                );
            }
            for src in &d.sources {
                println!("source      {}", source_line(src));
            }
            for sched in &s.config.schedules {
                println!("schedule    {} ({})", sched.cron, sched.timezone);
            }
            for b in &s.config.buckets {
                let events: Vec<&str> = b.events.iter().map(|e| e.ce_type()).collect();
                println!(
                    "bucket      {}{} on {}",
                    b.bucket,
                    if b.prefix.is_empty() {
                        String::new()
                    } else {
                        format!(" (keys starting {:?})", b.prefix)
                    },
                    events.join(", ")
                );
            }
            let rows: Vec<Vec<String>> = d
                .versions
                .iter()
                .map(|v| {
                    vec![
                        format!("v{}", v.version),
                        if v.active {
                            "active".into()
                        } else {
                            String::new()
                        },
                        v.digest.chars().take(12).collect(),
                        nimbus_cli::invocations::when(v.created_at),
                    ]
                })
                .collect();
            println!();
            print!("{}", table(&["VERSION", "", "DIGEST", "CREATED"], &rows));
            Ok(())
        }
        Command::Invoke {
            name,
            method,
            path,
            headers,
            data,
            asynchronous,
            idempotency_key,
        } => {
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                        .with_context(|| format!("header `{h}` must look like `Name: value`"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let body = match data.as_deref() {
                Some("@-") => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    Some(s)
                }
                Some(d) if d.starts_with('@') => Some(
                    std::fs::read_to_string(&d[1..])
                        .with_context(|| format!("cannot read {}", &d[1..]))?,
                ),
                Some(d) => Some(d.to_owned()),
                None => None,
            };
            if *asynchronous {
                let mut headers = headers;
                if let Some(key) = idempotency_key {
                    headers.push(("idempotency-key".into(), key.clone()));
                }
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "text/plain".into()));
                }
                let body = bytes::Bytes::from(body.unwrap_or_default());
                return nimbus_cli::invocations::submit(
                    &admin()?,
                    name,
                    path,
                    &headers,
                    body,
                    cli.output,
                )
                .await;
            }
            let request = InvokeRequest {
                method: method.clone(),
                path: Some(path.clone()),
                headers,
                body,
            };
            let r: InvokeResponse = admin()?
                .call(
                    Method::POST,
                    &format!("/v1/functions/{name}/invoke"),
                    Some(&request),
                )
                .await?;
            if cli.output == Format::Json {
                return print_json(&r);
            }
            eprintln!(
                "{} ({:.1} ms, invocation {})",
                r.status, r.duration_ms, r.invocation_id
            );
            print!("{}", r.body);
            if !r.body.ends_with('\n') && std::io::stdout().is_terminal() {
                println!();
            }
            if r.status >= 400 {
                std::process::exit(22);
            }
            Ok(())
        }
        Command::Invocations { name, state, limit } => {
            nimbus_cli::invocations::list(
                &admin()?,
                name,
                state.as_deref(),
                *limit,
                false,
                cli.output,
            )
            .await
        }
        Command::Invocation { id } => {
            nimbus_cli::invocations::show(&admin()?, id, cli.output).await
        }
        Command::Dlq { command } => match command {
            DlqCommand::Ls { name, limit } => {
                nimbus_cli::invocations::list(&admin()?, name, None, *limit, true, cli.output).await
            }
            DlqCommand::Redrive { name, ids, all } => {
                nimbus_cli::invocations::redrive(&admin()?, name, ids, *all, cli.output).await
            }
            DlqCommand::Purge { name } => {
                nimbus_cli::invocations::purge(&admin()?, name, cli.output).await
            }
        },
        Command::Schedules => nimbus_cli::invocations::schedules(&admin()?, cli.output).await,
        Command::Objects { command } => match command {
            ObjectsCommand::Put {
                target,
                file,
                content_type,
            } => {
                nimbus_cli::objects::put(
                    &admin()?,
                    target,
                    file,
                    content_type.as_deref(),
                    cli.output,
                )
                .await
            }
            ObjectsCommand::Get { target, out } => {
                nimbus_cli::objects::get(&admin()?, target, out.as_deref()).await
            }
            ObjectsCommand::Ls { target } => {
                nimbus_cli::objects::ls(&admin()?, target, cli.output).await
            }
            ObjectsCommand::Rm { target } => {
                nimbus_cli::objects::rm(&admin()?, target, cli.output).await
            }
        },
        Command::Top { interval, once } => {
            if !(0.1..=3600.0).contains(interval) {
                anyhow::bail!("--interval must be between 0.1 and 3600 seconds");
            }
            nimbus_cli::top::run(
                &admin()?,
                std::time::Duration::from_secs_f64(*interval),
                *once,
                cli.output,
            )
            .await
        }
        Command::Logs {
            name,
            follow,
            since,
            invocation,
            grep,
            limit,
        } => {
            let query = nimbus_cli::logs::Query {
                since: since.clone(),
                invocation: invocation.clone(),
                grep: grep.clone(),
                limit: *limit,
            };
            nimbus_cli::logs::show(&admin()?, name, &query, *follow, cli.output).await
        }
        Command::Rm { name } => {
            let _: serde_json::Value = admin()?
                .call(
                    Method::DELETE,
                    &format!("/v1/functions/{name}"),
                    None::<&()>,
                )
                .await?;
            if cli.output == Format::Json {
                return print_json(&serde_json::json!({ "removed": name }));
            }
            println!("removed {name}");
            Ok(())
        }
        Command::Rollback { name, to } => {
            let s: FunctionSummary = admin()?
                .call(
                    Method::POST,
                    &format!("/v1/functions/{name}/rollback"),
                    Some(&RollbackRequest { to: *to }),
                )
                .await?;
            if cli.output == Format::Json {
                return print_json(&s);
            }
            println!("{} now serves v{}", s.name, s.version);
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_deploy(resp: &DeployResponse, gateway: &str, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return print_json(resp);
    }
    let rows: Vec<Vec<String>> = resp
        .functions
        .iter()
        .map(|f| {
            let change = match f.change {
                Change::Created => "created",
                Change::Updated => "updated",
                Change::Unchanged => "unchanged",
                Change::Removed => "removed",
            };
            let routes = if f.change == Change::Removed {
                String::new()
            } else {
                f.routes
                    .iter()
                    .map(|r| match r.split_once(' ') {
                        Some((methods, path)) => format!("{methods} {gateway}{path}"),
                        None => format!("{gateway}{r}"),
                    })
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            let version = if f.version == 0 {
                "-".into()
            } else {
                format!("v{}", f.version)
            };
            vec![f.name.to_string(), version, change.into(), routes]
        })
        .collect();
    print!(
        "{}",
        table(&["FUNCTION", "VERSION", "CHANGE", "ROUTES"], &rows)
    );
    if resp.functions.iter().all(|f| f.change == Change::Unchanged) {
        println!("app {} is up to date: nothing changed", resp.app);
    }
    Ok(())
}

/// A source's key, health and counters, as `nimbus status` shows them.
fn source_line(src: &nimbus_api::SourceHealth) -> String {
    format!(
        "{} {}: {} delivered, {} dead-lettered{}",
        src.source,
        if src.healthy { "healthy" } else { "UNHEALTHY" },
        src.delivered,
        src.dead_lettered,
        src.last_error
            .as_ref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    )
}
