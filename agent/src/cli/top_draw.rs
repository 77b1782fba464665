//! How `mentat-agent top` draws its [`Model`]: a pure function of the model
//! (the same model draws the same screen), so it is tested with ratatui's
//! `TestBackend` (`top.rs`'s tests).

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row as TableRow, Table},
};
use serde_json::Value;

use super::top::Model;

fn human_bytes(b: f64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1}{}", units[u])
}

/// Draws the model (pure: the same model draws the same screen).
pub fn draw(f: &mut Frame, m: &Model) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let n = &m.node;
    let own = m
        .health
        .own_cpu_cores
        .map_or("-".to_string(), |c| format!("{:.1}%", c * 100.0));
    let header = vec![
        Line::from(format!(
            "mentat-agent top  {}  window ending {}  ({} windows)",
            m.api, m.window_end, m.windows
        )),
        Line::from(format!(
            "node: {} {}/h  cost {} {}  CPU {:.2} cores  mem {:.2} GB  GPU {:.2}  net {}/s  tokens {:.1}/s",
            n.rate_per_hour.round_dp(4),
            m.currency,
            n.cost.round_dp(6),
            m.currency,
            n.cpu_cores,
            n.memory_gb,
            n.gpus,
            human_bytes(n.net_bytes_per_s),
            n.tokens_per_s
        )),
        Line::from(format!(
            "agent: drops {}  events lost {}  own CPU {own}   by: {} (g)  sort: {} (s)  filter: {}{}",
            m.health.drops,
            m.health.events_lost,
            m.grouping.name(),
            m.sort.name(),
            m.filter,
            if m.editing_filter { "▏" } else { "" }
        )),
    ];
    f.render_widget(
        Paragraph::new(header).block(Block::default().borders(Borders::BOTTOM)),
        head,
    );
    match &m.detail {
        Some(view) => draw_run(f, body, view, &m.currency),
        None => {
            let rows: Vec<TableRow> = m
                .visible()
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let row = TableRow::new(vec![
                        r.key.clone(),
                        r.rate_per_hour.round_dp(4).to_string(),
                        r.cost.round_dp(6).to_string(),
                        format!("{:.2}", r.cpu_cores),
                        r.cpu_seconds.round_dp(3).to_string(),
                        format!("{:.3}", r.memory_gb),
                        format!("{:.2}", r.gpus),
                        format!("{}/s", human_bytes(r.net_bytes_per_s)),
                        format!("{:.1}", r.tokens_per_s),
                    ]);
                    if i == m.selected {
                        row.style(Style::default().add_modifier(Modifier::REVERSED))
                    } else {
                        row
                    }
                })
                .collect();
            let widths = [
                Constraint::Min(24),
                Constraint::Length(10),
                Constraint::Length(12),
                Constraint::Length(6),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(5),
                Constraint::Length(10),
                Constraint::Length(8),
            ];
            let title = m.grouping.name().to_uppercase();
            let table = Table::new(rows, widths).header(
                TableRow::new(vec![
                    title.as_str(),
                    "COST/H",
                    "COST",
                    "CPU",
                    "CPU·S",
                    "MEM GB",
                    "GPU",
                    "NET",
                    "TOK/S",
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            );
            f.render_widget(table, body);
        }
    }
    let help = if m.detail.is_some() {
        "esc back  q quit".to_string()
    } else {
        "q quit  g group  s sort  / filter  ↑↓ select  enter run detail".to_string()
    };
    let footer = if m.status.is_empty() {
        help
    } else {
        format!("{help}   {}", m.status)
    };
    f.render_widget(Paragraph::new(footer), foot);
}

fn draw_run(f: &mut Frame, area: ratatui::layout::Rect, view: &Value, currency: &str) {
    let t = &view["totals"];
    let mut lines = vec![
        Line::from(format!(
            "run {}   cost {} {currency}   CPU·s {}   tokens in {} out {}{}",
            view["run_id"].as_str().unwrap_or("?"),
            t["cost"]["total"].as_str().unwrap_or("0"),
            t["cpu_core_seconds"].as_str().unwrap_or("0"),
            t["tokens_input"],
            t["tokens_output"],
            if view["pending"] == true {
                "   (pending: windows still inside span_lag)"
            } else {
                ""
            }
        )),
        Line::from(""),
        Line::from("AGENT                          COST            CPU·S"),
    ];
    for a in view["by_agent"].as_array().into_iter().flatten() {
        lines.push(Line::from(format!(
            "{:<30} {:<15} {}",
            a["agent_id"].as_str().unwrap_or("unattributed"),
            a["totals"]["cost"]["total"].as_str().unwrap_or("0"),
            a["totals"]["cpu_core_seconds"].as_str().unwrap_or("0"),
        )));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(
        "SPAN                           AGENT           DURATION    COST   (* critical path)",
    ));
    for s in view["spans"].as_array().into_iter().flatten() {
        lines.push(Line::from(format!(
            "{}{:<29} {:<15} {:>8.3}s  {}",
            if s["on_critical_path"] == true {
                "*"
            } else {
                " "
            },
            s["name"].as_str().unwrap_or("?"),
            s["agent_id"].as_str().unwrap_or("-"),
            s["duration_ns"].as_f64().unwrap_or(0.0) / 1e9,
            s["cost"].as_str().unwrap_or("0"),
        )));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::NONE)),
        area,
    );
}
