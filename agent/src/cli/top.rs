//! `mentat-agent top`: a live terminal view of what is costing money now,
//! like `top` for runs, agents, flows, containers or customers.
//!
//! In: a running agent's `/v1/stream` as Server-Sent Events (one message per
//! committed window, grouped by the field shown; on start and on each
//! regrouping it resumes `--since` back, so "cost" covers that much history),
//! its `/metrics` (drops, the agent's own CPU) every two seconds, and
//! `/v1/runs/{id}` when a run is drilled into. Out: the screen. The model
//! ([`Model`]) is updated from those messages and drawn by [`draw`]
//! (`top_draw.rs`), a pure function of it, so both are tested without a terminal.
//!
//! Rates (cost per hour, CPU cores, memory, GPU, network, tokens/s) are the
//! last committed window's totals over its length; "cost" and "CPU·s" are
//! sums over every window received. Money stays `Decimal`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use rust_decimal::Decimal;
use serde_json::Value;

pub use super::top_draw::draw;

/// Where `top` reads from.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// The agent's API base URL.
    pub api: String,
    /// A bearer token file.
    pub token_file: Option<PathBuf>,
    /// How much history "cost" covers at start.
    pub since: Duration,
}

/// What the rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// By `run_id`.
    Run,
    /// By `agent_id`.
    Agent,
    /// By `flow_id`.
    Flow,
    /// By `container_id`.
    Container,
    /// By `customer_id`.
    Customer,
}

impl Grouping {
    /// The stream's `group_by` value.
    pub fn name(self) -> &'static str {
        match self {
            Grouping::Run => "run",
            Grouping::Agent => "agent",
            Grouping::Flow => "flow",
            Grouping::Container => "container",
            Grouping::Customer => "customer",
        }
    }

    fn next(self) -> Grouping {
        match self {
            Grouping::Run => Grouping::Agent,
            Grouping::Agent => Grouping::Flow,
            Grouping::Flow => Grouping::Container,
            Grouping::Container => Grouping::Customer,
            Grouping::Customer => Grouping::Run,
        }
    }
}

/// The column rows are sorted by (descending, but the name ascending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Cost per hour.
    Rate,
    /// Cost so far.
    Cost,
    /// CPU cores.
    Cpu,
    /// Memory.
    Memory,
    /// The key.
    Name,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Rate => SortKey::Cost,
            SortKey::Cost => SortKey::Cpu,
            SortKey::Cpu => SortKey::Memory,
            SortKey::Memory => SortKey::Name,
            SortKey::Name => SortKey::Rate,
        }
    }

    /// The column's name in the header.
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Rate => "cost/h",
            SortKey::Cost => "cost",
            SortKey::Cpu => "cpu",
            SortKey::Memory => "memory",
            SortKey::Name => "name",
        }
    }
}

/// One row: the last window's rates and the sums so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// The group's value ("unattributed" for records without it).
    pub key: String,
    /// Cost per hour over the last window.
    pub rate_per_hour: Decimal,
    /// Σ cost over the windows received.
    pub cost: Decimal,
    /// CPU cores over the last window.
    pub cpu_cores: f64,
    /// Σ CPU core-seconds over the windows received.
    pub cpu_seconds: Decimal,
    /// Average GB of memory over the last window.
    pub memory_gb: f64,
    /// GPUs busy over the last window.
    pub gpus: f64,
    /// Network bytes (rx + tx) per second over the last window.
    pub net_bytes_per_s: f64,
    /// Tokens (in + out) per second over the last window.
    pub tokens_per_s: f64,
}

/// The agent's own counters, from `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentHealth {
    /// `mentat_agent_map_full_drops_total`.
    pub drops: u64,
    /// `mentat_agent_events_lost_total`.
    pub events_lost: u64,
    /// The agent's CPU cores over the last two readings.
    pub own_cpu_cores: Option<f64>,
    /// `mentat_agent_process_cpu_seconds_total` at the last reading.
    pub own_cpu_seconds: f64,
}

/// What a key press asks of the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Leave.
    Quit,
    /// Reconnect the stream with the new grouping.
    Regroup,
    /// Fetch this run's view.
    Drill(String),
}

/// Everything the screen shows.
#[derive(Clone, Debug)]
pub struct Model {
    /// The API shown in the title.
    pub api: String,
    /// The rows' field.
    pub grouping: Grouping,
    /// The sort column.
    pub sort: SortKey,
    /// Rows whose key contains this are shown.
    pub filter: String,
    /// Whether keys go to the filter.
    pub editing_filter: bool,
    /// The highlighted row among those shown.
    pub selected: usize,
    /// Rows by key.
    pub rows: BTreeMap<String, Row>,
    /// The node's totals.
    pub node: Row,
    /// The currency of the costs.
    pub currency: String,
    /// The last window's end.
    pub window_end: String,
    /// Windows received.
    pub windows: u64,
    /// The agent's health.
    pub health: AgentHealth,
    /// A drilled-into run's view.
    pub detail: Option<Value>,
    /// The last problem (connection, gap), shown in the footer.
    pub status: String,
}

impl Model {
    /// An empty model for the API at `api`.
    pub fn new(api: &str) -> Model {
        Model {
            api: api.to_string(),
            grouping: Grouping::Run,
            sort: SortKey::Rate,
            filter: String::new(),
            editing_filter: false,
            selected: 0,
            rows: BTreeMap::new(),
            node: Row::default(),
            currency: String::new(),
            window_end: String::new(),
            windows: 0,
            health: AgentHealth::default(),
            detail: None,
            status: "connecting…".into(),
        }
    }

    /// Takes in one stream message.
    pub fn apply(&mut self, msg: &Value) {
        match msg["type"].as_str() {
            Some("window") => self.apply_window(msg),
            Some("gap")
                if msg["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("rollups")) =>
            {
                self.status =
                    "history before raw_retention is not per window: cost starts later".into();
            }
            Some("alert") => {
                self.status = format!(
                    "alert {} {}",
                    msg["alert"]["rule"].as_str().unwrap_or("?"),
                    msg["alert"]["state"].as_str().unwrap_or("?")
                );
            }
            Some("dropped") => {
                self.status = "the agent dropped this view (it fell behind); reconnecting".into();
            }
            Some("error") => {
                self.status = msg["reason"].as_str().unwrap_or("error").to_string();
            }
            _ => {}
        }
    }

    fn apply_window(&mut self, msg: &Value) {
        let secs = window_seconds(msg);
        let totals = &msg["totals"];
        if let Some(c) = totals["currency"].as_str() {
            self.currency = c.to_string();
        }
        update_row(&mut self.node, totals, secs);
        for row in self.rows.values_mut() {
            update_row(row, &Value::Null, secs);
        }
        for g in msg["groups"].as_array().into_iter().flatten() {
            let key = g["key"].as_str().unwrap_or("").to_string();
            let row = self.rows.entry(key.clone()).or_insert_with(|| Row {
                key,
                ..Row::default()
            });
            update_row(row, &g["totals"], secs);
        }
        self.window_end = msg["window_end"].as_str().unwrap_or("").to_string();
        self.windows += 1;
        if self.status == "connecting…" || self.status.starts_with("stream") {
            self.status.clear();
        }
    }

    /// Starts over (a new grouping: the stream replays its history).
    pub fn reset_rows(&mut self) {
        self.rows.clear();
        self.node = Row::default();
        self.windows = 0;
        self.selected = 0;
    }

    /// The rows shown: filtered, sorted.
    pub fn visible(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self
            .rows
            .values()
            .filter(|r| self.filter.is_empty() || r.key.contains(&self.filter))
            .collect();
        let f = |x: f64| if x.is_finite() { x } else { 0.0 };
        rows.sort_by(|a, b| match self.sort {
            SortKey::Rate => b.rate_per_hour.cmp(&a.rate_per_hour),
            SortKey::Cost => b.cost.cmp(&a.cost),
            SortKey::Cpu => f(b.cpu_cores).total_cmp(&f(a.cpu_cores)),
            SortKey::Memory => f(b.memory_gb).total_cmp(&f(a.memory_gb)),
            SortKey::Name => a.key.cmp(&b.key),
        });
        rows
    }

    /// Applies a key press.
    pub fn key(&mut self, code: KeyCode) -> Action {
        if self.editing_filter {
            match code {
                KeyCode::Enter | KeyCode::Esc => self.editing_filter = false,
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.selected = 0;
            return Action::None;
        }
        if self.detail.is_some() {
            match code {
                KeyCode::Char('q') => return Action::Quit,
                KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => self.detail = None,
                _ => {}
            }
            return Action::None;
        }
        let shown = self.visible().len();
        match code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('g') | KeyCode::Tab => {
                self.grouping = self.grouping.next();
                self.reset_rows();
                return Action::Regroup;
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('/') => self.editing_filter = true,
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(shown.saturating_sub(1));
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Enter | KeyCode::Right if self.grouping == Grouping::Run => {
                if let Some(r) = self.visible().get(self.selected)
                    && r.key != "unattributed"
                {
                    return Action::Drill(r.key.clone());
                }
            }
            _ => {}
        }
        Action::None
    }
}

/// A window's length in seconds (at least a millisecond).
fn window_seconds(msg: &Value) -> f64 {
    let ns = |k: &str| {
        msg[k]
            .as_str()
            .and_then(crate::probes::clock::unix_ns_of)
            .unwrap_or(0)
    };
    ((ns("window_end") - ns("window_start")) as f64 / 1e9).max(0.001)
}

fn dec(v: &Value) -> Decimal {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_default()
}

fn float(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0.0),
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Sets a row's rates from one window's `totals` (Null: nothing this window) and adds its sums.
fn update_row(row: &mut Row, t: &Value, secs: f64) {
    let cost = dec(&t["cost"]["total"]);
    let secs_dec = Decimal::try_from(secs).unwrap_or(Decimal::ONE);
    row.rate_per_hour = if secs_dec.is_zero() {
        Decimal::ZERO
    } else {
        (cost * Decimal::from(3600) / secs_dec).round_dp(6)
    };
    row.cost += cost;
    row.cpu_seconds += dec(&t["cpu_core_seconds"]);
    row.cpu_cores = float(&t["cpu_core_seconds"]) / secs;
    row.memory_gb = float(&t["memory_gb_seconds"]) / secs;
    row.gpus = float(&t["gpu_seconds"]) / secs;
    row.net_bytes_per_s = (float(&t["network_rx_bytes"]) + float(&t["network_tx_bytes"])) / secs;
    row.tokens_per_s = (float(&t["tokens_input"]) + float(&t["tokens_output"])) / secs;
}

/// Reads the agent's counters from a `/metrics` text.
pub fn health_from_metrics(
    text: &str,
    previous: &AgentHealth,
    seconds_between: f64,
) -> AgentHealth {
    let counter = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    let own = counter("mentat_agent_process_cpu_seconds_total").unwrap_or(0.0);
    AgentHealth {
        drops: counter("mentat_agent_map_full_drops_total").unwrap_or(0.0) as u64,
        events_lost: counter("mentat_agent_events_lost_total").unwrap_or(0.0) as u64,
        own_cpu_cores: (previous.own_cpu_seconds > 0.0 && seconds_between > 0.0)
            .then(|| (own - previous.own_cpu_seconds).max(0.0) / seconds_between),
        own_cpu_seconds: own,
    }
}

/// What the reader threads send the screen.
enum Input {
    Stream(u64, Value),
    StreamDown(u64, String),
    Health(String, f64),
    Run(Result<Value, String>),
}

fn request(opts: &TopOptions, path: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
    let url = format!("{}{path}", opts.api.trim_end_matches('/'));
    let mut req = ureq::get(&url);
    if let Some(file) = &opts.token_file {
        let token = std::fs::read_to_string(file)
            .map_err(|e| format!("reading the token file {}: {e}", file.display()))?;
        req = req.header("Authorization", format!("Bearer {}", token.trim()));
    }
    let resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    Ok(resp)
}

/// Follows the stream for `grouping` until `generation` moves on.
fn follow(
    opts: TopOptions,
    grouping: Grouping,
    generation: Arc<AtomicU64>,
    mine: u64,
    tx: mpsc::Sender<Input>,
) {
    let mut after = SystemTime::now()
        .checked_sub(opts.since)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    while generation.load(Ordering::SeqCst) == mine {
        let path = format!("/v1/stream?group_by={}&after={after}", grouping.name());
        match request(&opts, &path) {
            Ok(resp) => {
                let reader = BufReader::new(resp.into_body().into_reader());
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if generation.load(Ordering::SeqCst) != mine {
                        return;
                    }
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    let Ok(msg) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if msg["type"] == "window"
                        && let Some(id) = msg["id"].as_str().and_then(|i| i.parse().ok())
                    {
                        after = id;
                    }
                    if tx.send(Input::Stream(mine, msg)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Input::StreamDown(mine, "stream ended; reconnecting".into()));
            }
            Err(e) => {
                if tx
                    .send(Input::StreamDown(mine, format!("stream: {e}")))
                    .is_err()
                {
                    return;
                }
            }
        }
        thread::sleep(Duration::from_secs(1));
    }
}

fn start_stream(
    opts: &TopOptions,
    grouping: Grouping,
    generation: &Arc<AtomicU64>,
    tx: &mpsc::Sender<Input>,
) {
    let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
    let (opts, generation, tx) = (opts.clone(), generation.clone(), tx.clone());
    thread::spawn(move || follow(opts, grouping, generation, mine, tx));
}

/// Runs the view until `q`; the terminal is restored on exit and on panic.
/// Fails only when the terminal does (the agent being unreachable is shown).
pub fn run(opts: TopOptions) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<Input>();
    let generation = Arc::new(AtomicU64::new(0));
    let mut model = Model::new(&opts.api);
    start_stream(&opts, model.grouping, &generation, &tx);
    {
        let (opts, tx) = (opts.clone(), tx.clone());
        thread::spawn(move || {
            let mut last = std::time::Instant::now();
            loop {
                let text = request(&opts, "/metrics")
                    .and_then(|mut r| r.body_mut().read_to_string().map_err(|e| e.to_string()));
                if let Ok(text) = text
                    && tx
                        .send(Input::Health(text, last.elapsed().as_secs_f64()))
                        .is_err()
                {
                    return;
                }
                last = std::time::Instant::now();
                thread::sleep(Duration::from_secs(2));
            }
        });
    }
    // ratatui's init installs a panic hook that restores the terminal first.
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> std::io::Result<()> {
        loop {
            while let Ok(input) = rx.try_recv() {
                let current = generation.load(Ordering::SeqCst);
                match input {
                    Input::Stream(g, msg) if g == current => model.apply(&msg),
                    Input::StreamDown(g, why) if g == current => model.status = why,
                    Input::Health(text, secs) => {
                        model.health = health_from_metrics(&text, &model.health, secs);
                    }
                    Input::Run(Ok(view)) => model.detail = Some(view),
                    Input::Run(Err(e)) => model.status = e,
                    _ => {}
                }
            }
            terminal.draw(|f| draw(f, &model))?;
            if event::poll(Duration::from_millis(200))?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
            {
                match model.key(k.code) {
                    Action::Quit => return Ok(()),
                    Action::Regroup => start_stream(&opts, model.grouping, &generation, &tx),
                    Action::Drill(run) => {
                        let (opts, tx) = (opts.clone(), tx.clone());
                        thread::spawn(move || {
                            let path = format!("/v1/runs/{run}");
                            let view = request(&opts, &path).and_then(|mut r| {
                                r.body_mut().read_json::<Value>().map_err(|e| e.to_string())
                            });
                            let _ = tx.send(Input::Run(view));
                        });
                    }
                    Action::None => {}
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};
    use serde_json::json;

    use super::*;

    fn window(start: &str, end: &str, groups: Value) -> Value {
        json!({
            "type": "window", "id": "1", "window_start": start, "window_end": end,
            "totals": {"cost": {"total": "0.002"}, "currency": "USD", "cpu_core_seconds": "1.5",
                       "memory_gb_seconds": "0.5", "network_rx_bytes": 1000, "network_tx_bytes": 0,
                       "tokens_input": 10, "tokens_output": 0},
            "groups": groups,
        })
    }

    fn screen(m: &Model) -> String {
        let mut t = Terminal::new(TestBackend::new(140, 20)).expect("terminal");
        t.draw(|f| draw(f, m)).expect("draw");
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn windows_make_rows_with_rates_and_sums_and_the_screen_shows_them() {
        let mut m = Model::new("http://x");
        let g = |cpu: &str, cost: &str| {
            json!([
                {"key": "run-a", "totals": {"cost": {"total": cost}, "cpu_core_seconds": cpu}},
                {"key": "run-b", "totals": {"cost": {"total": "0.0001"}, "cpu_core_seconds": "0.1"}},
            ])
        };
        m.apply(&window(
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:02Z",
            g("1", "0.001"),
        ));
        m.apply(&window(
            "2026-01-01T00:00:02Z",
            "2026-01-01T00:00:04Z",
            g("1.5", "0.002"),
        ));
        let a = &m.rows["run-a"];
        // The last window: 1.5 core-seconds over 2 s; 0.002 over 2 s is 3.6/h.
        assert!((a.cpu_cores - 0.75).abs() < 1e-9);
        assert_eq!(a.rate_per_hour, Decimal::new(36, 1));
        // The sums are exact over both windows.
        assert_eq!(a.cost, Decimal::new(3, 3));
        assert_eq!(a.cpu_seconds, Decimal::new(25, 1));
        assert_eq!(m.visible()[0].key, "run-a");
        let s = screen(&m);
        assert!(s.contains("run-a"), "{s}");
        assert!(s.contains("2.5"), "{s}");
        // A group absent from a window has no rate, but keeps its sums.
        m.apply(&window(
            "2026-01-01T00:00:04Z",
            "2026-01-01T00:00:06Z",
            json!([]),
        ));
        assert_eq!(m.rows["run-a"].cpu_cores, 0.0);
        assert_eq!(m.rows["run-a"].cost, Decimal::new(3, 3));
    }

    #[test]
    fn keys_sort_filter_regroup_drill_and_quit() {
        let mut m = Model::new("http://x");
        m.apply(&window(
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:01Z",
            json!([
                {"key": "alpha", "totals": {"cost": {"total": "1"}}},
                {"key": "beta", "totals": {"cost": {"total": "2"}}},
            ]),
        ));
        assert_eq!(m.visible()[0].key, "beta");
        while m.sort != SortKey::Name {
            m.key(KeyCode::Char('s'));
        }
        assert_eq!(m.visible()[0].key, "alpha");
        m.key(KeyCode::Char('/'));
        for c in "bet".chars() {
            m.key(KeyCode::Char(c));
        }
        m.key(KeyCode::Enter);
        assert_eq!(m.visible().len(), 1);
        assert_eq!(m.key(KeyCode::Enter), Action::Drill("beta".into()));
        m.detail = Some(json!({"run_id": "beta", "totals": {}, "by_agent": [], "spans": []}));
        assert!(screen(&m).contains("run beta"));
        assert_eq!(m.key(KeyCode::Esc), Action::None);
        assert!(m.detail.is_none());
        assert_eq!(m.key(KeyCode::Char('g')), Action::Regroup);
        assert_eq!(m.grouping, Grouping::Agent);
        assert!(m.rows.is_empty());
        assert!(screen(&m).contains("AGENT"));
        assert_eq!(m.key(KeyCode::Char('q')), Action::Quit);
    }

    #[test]
    fn health_reads_drops_and_the_agents_own_cpu() {
        let text =
            "mentat_agent_map_full_drops_total 7\nmentat_agent_process_cpu_seconds_total 10.5\n";
        let first = health_from_metrics(text, &AgentHealth::default(), 2.0);
        assert_eq!(first.drops, 7);
        assert_eq!(first.own_cpu_cores, None);
        let text =
            "mentat_agent_map_full_drops_total 7\nmentat_agent_process_cpu_seconds_total 10.7\n";
        let second = health_from_metrics(text, &first, 2.0);
        assert!(second.own_cpu_cores.is_some_and(|c| (c - 0.1).abs() < 1e-9));
    }
}
