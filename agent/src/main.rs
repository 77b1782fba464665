//! The `mentat-agent` command line.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mentat_agent::{
    cli::{
        alerts, check,
        output::Format,
        pricing,
        record::{self, RecordOptions},
        top::{self, TopOptions},
        usage::{self, UsageFormat, UsageQuery},
    },
    config::{self, Config},
    daemon,
    identity::pods::PodSource,
    probes::{ProbeConfig, ProbeMode, Probes, VMLINUX_BTF, caps},
    report::GroupBy,
};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: span intake allocates a few small
/// strings per span and frees them a window later, from other threads; at
/// 50,000 spans/s glibc's malloc/free (with `malloc_consolidate`) was about
/// a fifth of the daemon's CPU (BENCHMARKS.md "Span intake").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Meters CPU time and syscalls of every process on this node with eBPF,
/// exactly enough to bill.
#[derive(Parser, Debug)]
#[command(name = "mentat-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Meter the node for a while, or one command and all its descendants, then print one record per process.
    Record(RecordArgs),
    /// Run the node daemon: close a usage window every tick and hand it to the sinks.
    Run {
        /// TOML config file (every key optional; see README for the keys and defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Query a running agent's ledger: usage over a time range as a tree, or billing events.
    Usage(UsageArgs),
    /// List a running agent's alerts, or (`alerts test RULE`) replay a rule over the ledger's history.
    Alerts(AlertsArgs),
    /// A live view of what costs money now, per run, agent, flow, container or customer (q quits).
    Top {
        /// The agent's API (local or remote).
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        url: String,
        /// Bearer token file for an API bound off loopback.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// How far back the cost column starts (replayed from the agent's ledger).
        #[arg(long, value_parser = parse_duration, default_value = "5m")]
        since: Duration,
    },
    /// List what the agent needs from the kernel and whether each is present; exit 1 if it cannot run.
    Check {
        /// Where to read kernel BTF from.
        #[arg(long, value_name = "PATH", default_value = VMLINUX_BTF)]
        btf: PathBuf,
    },
    /// Validate a config file (and its price book), or print the full default config.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Make price books.
    #[command(subcommand)]
    Pricing(PricingCmd),
    /// Attach probes and wait, printing their kernel run statistics at the end (benchmarks).
    #[command(hide = true)]
    Attach {
        /// Which programs: the metering ones, or empty ones on the same hooks.
        #[arg(long, value_enum, default_value = "metering")]
        mode: AttachMode,
        /// How long to stay attached.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Check FILE and the price book it names; print line-precise errors and exit 1 if invalid.
    Check {
        /// The config file (TOML).
        file: PathBuf,
    },
    /// Print the full default config, every key documented.
    Default,
}

#[derive(Subcommand, Debug)]
enum PricingCmd {
    /// Convert LiteLLM's model_prices_and_context_window.json into a price book (TOML on stdout).
    Import {
        /// The LiteLLM JSON file.
        file: PathBuf,
        /// The book's version (default: litellm- and a hash of FILE).
        #[arg(long)]
        version: Option<String>,
        /// The currency FILE's prices are in (LiteLLM's are USD); the base book must be in it too.
        #[arg(long, default_value = "USD")]
        currency: String,
        /// The book whose resource prices and discounts the new book keeps (default: the built-in one).
        #[arg(long, value_name = "BOOK")]
        base: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct UsageArgs {
    /// How far back from now (e.g. 15m, 1h, 7d); default 1h. Conflicts with --from.
    #[arg(long, value_parser = parse_duration, conflicts_with = "from")]
    since: Option<Duration>,
    /// Range start, RFC 3339 (e.g. 2026-11-24T00:00:00Z).
    #[arg(long)]
    from: Option<String>,
    /// Range end, RFC 3339 (default now).
    #[arg(long)]
    to: Option<String>,
    /// Comma-separated fields to group by, outermost first (e.g. user_id,project_id,agent_id; `model` splits by token model).
    #[arg(long, value_delimiter = ',')]
    group_by: Vec<String>,
    /// Exact-match filter, field=value (repeatable).
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    filters: Vec<String>,
    /// Output: table (default), json, csv, or jsonl.
    #[arg(long, value_enum, default_value = "table")]
    format: UsageFormat,
    /// Emit every record in the range as a CloudEvent per line (use with --format jsonl).
    #[arg(long)]
    billing: bool,
    /// Show one flow run: its cost by agent and by span, and its critical path.
    #[arg(long, value_name = "RUN_ID")]
    run: Option<String>,
    /// List the records the ledger set aside (quarantined) and the records exporters' receivers refused (dead letters).
    #[arg(long, conflicts_with_all = ["billing", "run"])]
    quarantine: bool,
    /// List, per model, the tokens priced at 0 because the price book had no price for the model.
    #[arg(long, conflicts_with_all = ["billing", "run", "quarantine"])]
    unpriced: bool,
    /// The agent's API.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    api: String,
    /// Bearer token file for an API bound off loopback.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct AlertsArgs {
    #[command(subcommand)]
    cmd: Option<AlertsCmd>,
    /// Only alerts in this state: pending, firing or resolved.
    #[arg(long)]
    state: Option<String>,
    /// Only this rule's alerts.
    #[arg(long)]
    rule: Option<String>,
    /// Output: table (default) or json.
    #[arg(long, value_enum, default_value = "table")]
    format: UsageFormat,
    /// The agent's API.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    api: String,
    /// Bearer token file for an API bound off loopback.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AlertsCmd {
    /// Evaluate one rule over the ledger's history; print when its alerts would have fired and resolved.
    Test {
        /// The rule's name.
        rule: String,
        /// The daemon's config file (its [[alerts]], [alerting] rules_file and ledger_path).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Start (RFC 3339); default: an hour before --to.
        #[arg(long)]
        from: Option<String>,
        /// End (RFC 3339); default: the last committed window's end.
        #[arg(long)]
        to: Option<String>,
        /// One evaluation per step.
        #[arg(long, value_parser = parse_duration, default_value = "1m")]
        step: Duration,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AttachMode {
    Metering,
    Floor,
}

#[derive(clap::Args, Debug)]
struct RecordArgs {
    /// How long to meter the whole node (e.g. 500ms, 10s, 2m). Ignored when a command is given:
    /// then recording lasts until the command and all its descendants have exited.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Output format: table (default on a terminal), jsonl (default otherwise) or csv.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Write records to FILE instead of stdout (the command's own output still goes to the terminal).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// With a command: print every process on the node, not only the command's process tree.
    #[arg(long)]
    all: bool,
    /// Sum records per process, container, pod, cgroup or workload; processes lacking the key
    /// (e.g. in no container) form one group with a null key. Groups plus the buckets equal the node totals.
    #[arg(long, value_enum, value_name = "KEY", value_delimiter = ',')]
    group_by: Vec<GroupBy>,
    /// How often a window is closed while recording; records cover the whole run either way.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    tick: Duration,
    /// How often memory and disk are sampled (memory GB-seconds integrate these samples).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    sample: Duration,
    /// The node name in records (default: $NODE_NAME, else the host name).
    #[arg(long, default_value = "")]
    node: String,
    /// Pod-list URL for pod names and namespaces: the kubelet's /pods, or the API server's
    /// /api/v1/pods?fieldSelector=spec.nodeName={node} ({node} is replaced).
    #[arg(long, value_name = "URL", default_value = "")]
    k8s_pods_url: String,
    /// Bearer token file for the pod list (e.g. the ServiceAccount token).
    #[arg(long, value_name = "FILE")]
    k8s_token_file: Option<PathBuf>,
    /// CA bundle (PEM) that signs the pod-list server's certificate.
    #[arg(long, value_name = "FILE")]
    k8s_ca_file: Option<PathBuf>,
    /// NVML library to meter GPUs with (default: the system's libnvidia-ml.so.1).
    #[arg(long, value_name = "FILE")]
    gpu_library: Option<PathBuf>,
    /// Test-only: shrink the kernel's per-process map to N entries to exercise overflow.
    #[arg(long, hide = true, value_name = "N")]
    proc_map_entries: Option<u32>,
    /// The command to meter, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Durations like "500ms", "10s", "2m" (humantime syntax).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 500ms, 10s, 2m"))?;
    if d.is_zero() {
        return Err(format!("`{s}` is zero; give a positive duration"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Cmd::Run { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a pod's log, a file or a
        // pipe gets plain text (escape codes would garble log collectors).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();

    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("mentat-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Exit code for a missing capability, as for any usage error.
const EXIT_NO_PRIVILEGE: i32 = 2;

/// Refuses to go on without the capabilities the probes need, naming them.
fn require_capabilities() -> Option<i32> {
    let missing = caps::missing_for_probes(caps::effective());
    if missing.is_empty() {
        return None;
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name).collect();
    eprintln!(
        "mentat-agent: missing capability {} (needed to load and attach eBPF programs); \
         run as root, or grant CAP_BPF and CAP_PERFMON",
        names.join(" and ")
    );
    Some(EXIT_NO_PRIVILEGE)
}

fn dispatch(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Record(a) => {
            if let Some(code) = require_capabilities() {
                return Ok(code);
            }
            let opts = RecordOptions {
                duration: a.duration,
                format: a.format,
                output: a.output,
                all: a.all,
                group_by: a.group_by,
                tick: a.tick,
                sample: a.sample,
                probes: ProbeConfig {
                    proc_map_entries: a.proc_map_entries,
                    ..ProbeConfig::default()
                },
                node: config::node_name(&a.node),
                pods: PodSource {
                    url: a.k8s_pods_url,
                    token_file: a.k8s_token_file,
                    ca_file: a.k8s_ca_file,
                },
                gpu_library: a.gpu_library,
                command: a.command,
            };
            Ok(record::run(&opts)?)
        }
        Cmd::Run { config } => {
            if let Some(code) = require_capabilities() {
                return Ok(code);
            }
            for cap in caps::missing_for_other_users(caps::effective()) {
                tracing::warn!(
                    capability = cap.name,
                    "missing; the agent cannot {} (run context and executable paths of \
                     other users' processes go unread)",
                    cap.why
                );
            }
            let resolved = Config::resolve(config.as_deref(), std::env::vars())?;
            if !resolved.overrides.is_empty() {
                eprintln!(
                    "mentat-agent: configuration overridden by {}",
                    resolved.overrides.join(", ")
                );
            }
            let cfg = resolved.config;
            let node = config::node_name(&cfg.node_name);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(cfg, node))?;
            Ok(0)
        }
        Cmd::Config(ConfigCmd::Default) => {
            print!("{}", config::DEFAULT_CONFIG_TOML);
            Ok(0)
        }
        Cmd::Config(ConfigCmd::Check { file }) => {
            // The environment is part of what runs, so it is checked too.
            let (cfg, overrides) = match Config::resolve(Some(&file), std::env::vars()) {
                Ok(r) => (r.config, r.overrides),
                Err(e) => {
                    eprintln!("mentat-agent: {e}");
                    return Ok(1);
                }
            };
            let book = match &cfg.pricing_path {
                Some(p) => mentat_agent::pricing::PriceBook::load(p),
                None => mentat_agent::pricing::PriceBook::parse(
                    mentat_agent::pricing::DEFAULT_BOOK,
                    "built-in deploy/pricing.toml",
                ),
            };
            match book {
                Ok(b) => {
                    println!(
                        "{}: valid; price book version {} ({})",
                        file.display(),
                        b.version(),
                        b.currency()
                    );
                    if !overrides.is_empty() {
                        println!("environment overrides: {}", overrides.join(", "));
                    }
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("mentat-agent: {}: {e}", file.display());
                    Ok(1)
                }
            }
        }
        Cmd::Pricing(PricingCmd::Import {
            file,
            version,
            currency,
            base,
        }) => {
            pricing::import(
                &file,
                base.as_deref(),
                version.as_deref(),
                &currency,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr(),
            )?;
            Ok(0)
        }
        Cmd::Top {
            url,
            token_file,
            since,
        } => {
            top::run(TopOptions {
                api: url,
                token_file,
                since,
            })?;
            Ok(0)
        }
        Cmd::Usage(a) => {
            if a.billing && a.format != UsageFormat::Jsonl {
                anyhow::bail!("--billing emits CloudEvents as JSON lines: add --format jsonl");
            }
            let q = UsageQuery {
                api: a.api,
                token_file: a.token_file,
                since: a.since.or(if a.from.is_none() {
                    Some(Duration::from_secs(3600))
                } else {
                    None
                }),
                from: a.from,
                to: a.to,
                group_by: a.group_by,
                filters: a.filters,
                format: a.format,
                billing: a.billing,
                run: a.run,
                quarantine: a.quarantine,
                unpriced: a.unpriced,
            };
            match q.run(&mut std::io::stdout().lock()) {
                // The reader went away (`| head`): not an error.
                Err(usage::QueryError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    Ok(0)
                }
                r => r.map(|()| 0).map_err(Into::into),
            }
        }
        Cmd::Alerts(a) => match a.cmd {
            Some(AlertsCmd::Test {
                rule,
                config,
                from,
                to,
                step,
            }) => {
                let cfg = match &config {
                    Some(p) => Config::load(p)?,
                    None => Config::default(),
                };
                let rules = alerts::config_rules(&cfg)?;
                let fired = alerts::test(
                    &rules,
                    &rule,
                    &cfg.ledger_path,
                    from.as_deref(),
                    to.as_deref(),
                    step,
                    &mut std::io::stdout().lock(),
                )?;
                Ok(i32::from(fired == 0))
            }
            None => {
                let q = UsageQuery {
                    api: a.api,
                    token_file: a.token_file,
                    since: None,
                    from: None,
                    to: None,
                    group_by: Vec::new(),
                    filters: Vec::new(),
                    format: a.format,
                    billing: false,
                    run: None,
                    quarantine: false,
                    unpriced: false,
                };
                alerts::list(
                    &q,
                    a.state.as_deref(),
                    a.rule.as_deref(),
                    a.format == UsageFormat::Json,
                    &mut std::io::stdout().lock(),
                )?;
                Ok(0)
            }
        },
        Cmd::Check { btf } => {
            let items = check::run(&ProbeConfig {
                btf_path: btf,
                ..ProbeConfig::default()
            });
            let mut fatal = false;
            for i in &items {
                let mark = match (i.ok, i.required) {
                    (true, _) => "ok  ",
                    (false, true) => "FAIL",
                    (false, false) => "warn",
                };
                println!("{mark} {:<44} {}", i.what, i.detail);
                fatal |= i.required && !i.ok;
            }
            if caps::missing_for_probes(caps::effective()).is_empty() {
                if fatal {
                    eprintln!("mentat-agent cannot run on this node: see the FAIL lines above");
                    return Ok(1);
                }
                println!("mentat-agent can run on this node");
                Ok(0)
            } else {
                Ok(require_capabilities().unwrap_or(EXIT_NO_PRIVILEGE))
            }
        }
        Cmd::Attach { mode, duration } => {
            if let Some(code) = require_capabilities() {
                return Ok(code);
            }
            let probes = Probes::load(&ProbeConfig {
                mode: match mode {
                    AttachMode::Metering => ProbeMode::Metering,
                    AttachMode::Floor => ProbeMode::Floor,
                },
                ..ProbeConfig::default()
            })?;
            // The caller (the benchmark) starts measuring once this line is out.
            println!("attached");
            std::thread::sleep(duration);
            for (name, count, time) in probes.program_stats() {
                println!(
                    "{{\"program\":\"{name}\",\"run_count\":{count},\"run_time_ns\":{}}}",
                    time.as_nanos()
                );
            }
            Ok(0)
        }
    }
}
