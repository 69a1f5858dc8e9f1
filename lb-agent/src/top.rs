//! `lb-agent top`: a full-screen view of the running agent, refreshed every
//! `--interval`: services, instances, each scaled service's metric against
//! its target over the last minutes, and the latest decisions.
//!
//! It reads the same `Snapshot` as `lb-agent status`. What is drawn is a
//! pure function of a `Top` (the last snapshot, or why there is none, and
//! the metric history), so tests render it on ratatui's `TestBackend`; only
//! `run` touches the terminal.

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    symbols::Marker,
    text::Line,
    widgets::{Axis, Block, Borders, Cell, Chart, Dataset, GraphType, Paragraph, Row, Table},
    Frame,
};

use crate::status::{
    human_duration, human_rate, now_unix, render_metrics, ScalingMetric, ScalingStatus, ServiceStatus, Snapshot,
};

/// How far back the charts reach.
pub const HISTORY: Duration = Duration::from_secs(300);
/// Below this the screen shows a one-line summary per service only.
const MIN_WIDTH: u16 = 60;
const MIN_HEIGHT: u16 = 16;

/// What `top` knows: the latest answer and the metric history.
#[derive(Debug, Default)]
pub struct Top {
    /// The last snapshot the agent gave (kept, dimmed, while it does not
    /// answer).
    pub snapshot: Option<Snapshot>,
    /// Why the last ask failed, while the agent does not answer.
    pub error: Option<String>,
    /// Per scaled service: (Unix time, value, target) of the metric charted.
    pub history: BTreeMap<String, VecDeque<(f64, f64, f64)>>,
    pub interval: Duration,
}

impl Top {
    pub fn new(interval: Duration) -> Top {
        Top { interval, ..Top::default() }
    }

    /// Take an answer (or a failure) at `now` (Unix seconds).
    pub fn update(&mut self, answer: Result<Snapshot, String>, now: f64) {
        match answer {
            Ok(s) => {
                for sc in &s.scaling {
                    let Some(m) = charted(sc) else { continue };
                    let points = self.history.entry(sc.service.clone()).or_default();
                    if let Some(v) = m.value {
                        points.push_back((now, v, m.target));
                    }
                }
                self.history.retain(|name, _| s.scaling.iter().any(|sc| &sc.service == name));
                self.snapshot = Some(s);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
        for points in self.history.values_mut() {
            while points.front().is_some_and(|p| now - p.0 > HISTORY.as_secs_f64()) {
                points.pop_front();
            }
        }
    }
}

/// The metric a scaled service's chart follows: its target-tracking rule's,
/// else its first.
fn charted(sc: &ScalingStatus) -> Option<&ScalingMetric> {
    sc.metrics.iter().find(|m| m.rule == "target").or(sc.metrics.first())
}

/// Draw the whole screen for `top` at `now` (Unix seconds).
pub fn draw(f: &mut Frame, top: &Top, now: f64) {
    let area = f.area();
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    f.render_widget(Paragraph::new(header(top)), head);
    let Some(s) = &top.snapshot else {
        let text = "waiting for the agent's first answer";
        f.render_widget(Paragraph::new(text), body);
        return;
    };
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let mut lines: Vec<Line> = s.services.iter().map(|sv| Line::from(service_line(sv))).collect();
        lines.push(Line::from(format!("(a {MIN_WIDTH}x{MIN_HEIGHT} terminal shows more)")));
        f.render_widget(Paragraph::new(lines), body);
        return;
    }
    let replicas: usize = s.scaling.iter().map(|sc| sc.replicas.len()).sum();
    // The chart takes what the tables leave, at least 8 lines.
    let chart_h = if s.scaling.is_empty() { 0 } else { 8 };
    let decisions: usize = s.scaling.iter().map(|sc| sc.decisions.len()).sum();
    let decisions_h = if s.scaling.is_empty() { 0 } else { decisions.clamp(1, 8) as u16 + 3 };
    let [services, instances, charts, decisions] = Layout::vertical([
        Constraint::Length(s.services.len().max(1) as u16 + 3),
        Constraint::Length(if s.scaling.is_empty() { 0 } else { replicas.max(1) as u16 + 3 }),
        Constraint::Min(chart_h),
        Constraint::Length(decisions_h),
    ])
    .areas(body);
    draw_services(f, s, services);
    if !s.scaling.is_empty() {
        draw_instances(f, s, instances);
        draw_charts(f, top, s, charts, now);
        draw_decisions(f, s, decisions, now);
    }
}

fn header(top: &Top) -> Line<'static> {
    let every = match top.interval.as_millis() {
        ms @ 0..1000 => format!("{ms}ms"),
        _ => human_duration(top.interval.as_secs_f64()),
    };
    match (&top.error, &top.snapshot) {
        (Some(e), _) => Line::styled(
            format!("lb-agent top: agent not answering ({e}); asking again every {every}; q quits"),
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        (None, Some(s)) => Line::from(format!(
            "lb-agent {}  pid {}  up {}  errors {}  every {every}; q quits",
            s.agent.version,
            s.agent.pid,
            human_duration(s.agent.uptime_seconds),
            s.agent.errors_total
        )),
        (None, None) => Line::from(format!("lb-agent top: every {every}; q quits")),
    }
}

fn service_line(s: &ServiceStatus) -> String {
    format!(
        "{} {}/{} {} pkt/s {} new/s {}/{} backends",
        s.name,
        s.endpoint(),
        s.protocol,
        human_rate(s.counters.packets_per_second),
        human_rate(s.counters.new_flows_per_second),
        s.usable_backends,
        s.backends.len()
    )
}

fn block(title: &str) -> Block<'_> {
    Block::default().borders(Borders::ALL).title(title)
}

/// A table under `title` with `columns` (heading, width).
fn table<'a>(title: &'a str, columns: &[(&'a str, Constraint)], rows: Vec<Row<'a>>) -> Table<'a> {
    Table::new(rows, columns.iter().map(|c| c.1))
        .header(Row::new(columns.iter().map(|c| c.0)).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(block(title))
}

fn draw_services(f: &mut Frame, s: &Snapshot, area: Rect) {
    let rows = s.services.iter().map(|sv| {
        let usable = format!("{}/{}", sv.usable_backends, sv.backends.len());
        let style = if sv.usable_backends == 0 { Style::default().fg(Color::Red) } else { Style::default() };
        Row::new(vec![
            Cell::from(sv.name.clone()),
            Cell::from(format!("{}/{}", sv.endpoint(), sv.protocol)),
            Cell::from(sv.mode.clone()),
            Cell::from(human_rate(sv.counters.packets_per_second)),
            Cell::from(human_rate(sv.counters.new_flows_per_second)),
            Cell::from(usable).style(style),
        ])
    });
    use Constraint::{Length, Min};
    let (number, text) = (Length(8), Min(10));
    let columns = [
        ("SERVICE", text),
        ("VIP", Min(22)),
        ("MODE", Length(9)),
        ("PKT/S", number),
        ("NEW/S", number),
        ("USABLE", number),
    ];
    f.render_widget(table("services", &columns, rows.collect()), area);
}

fn draw_instances(f: &mut Frame, s: &Snapshot, area: Rect) {
    let rows = s.scaling.iter().flat_map(|sc| {
        sc.replicas.iter().map(move |r| {
            let mut cells = r.cells();
            cells.insert(0, sc.service.clone());
            Row::new(cells)
        })
    });
    use Constraint::{Length, Min};
    let (number, text) = (Length(7), Min(8));
    let columns = [
        ("SERVICE", text),
        ("INSTANCE", text),
        ("ADDRESS", Min(18)),
        ("PHASE", Length(9)),
        ("CPU", number),
        ("REQ/S", number),
        ("UP", number),
    ];
    f.render_widget(table("instances", &columns, rows.collect()), area);
}

/// One chart per scaled service (side by side): its metric and target over
/// the last `HISTORY`.
fn draw_charts(f: &mut Frame, top: &Top, s: &Snapshot, area: Rect, now: f64) {
    let shown: Vec<&ScalingStatus> = s.scaling.iter().take(3).collect();
    let areas = Layout::horizontal(shown.iter().map(|_| Constraint::Fill(1))).split(area);
    for (sc, area) in shown.into_iter().zip(areas.iter()) {
        let points = top.history.get(&sc.service);
        let values: Vec<(f64, f64)> = points.into_iter().flatten().map(|p| (p.0 - now, p.1)).collect();
        let targets: Vec<(f64, f64)> = points.into_iter().flatten().map(|p| (p.0 - now, p.2)).collect();
        let label = charted(sc).map_or("-", |m| m.label.as_str());
        let top_y = values.iter().chain(&targets).map(|p| p.1).fold(1.0_f64, f64::max) * 1.2;
        let title =
            format!("{} {} (last {})", sc.service, render_metrics(&sc.metrics), human_duration(HISTORY.as_secs_f64()));
        let line = |name: String, color: Color, data| {
            let style = Style::default().fg(color);
            Dataset::default().name(name).marker(Marker::Braille).graph_type(GraphType::Line).style(style).data(data)
        };
        let datasets =
            vec![line(label.to_owned(), Color::Cyan, &values), line("target".into(), Color::Yellow, &targets)];
        let chart = Chart::new(datasets)
            .block(block(&title))
            .x_axis(
                Axis::default()
                    .bounds([-HISTORY.as_secs_f64(), 0.0])
                    .labels([Line::from(format!("-{}", human_duration(HISTORY.as_secs_f64()))), Line::from("now")]),
            )
            .y_axis(Axis::default().bounds([0.0, top_y]).labels([Line::from("0"), Line::from(format!("{top_y:.0}"))]));
        f.render_widget(chart, *area);
    }
}

fn draw_decisions(f: &mut Frame, s: &Snapshot, area: Rect, now: f64) {
    let mut all: Vec<(&str, &crate::status::DecisionSummary)> =
        s.scaling.iter().flat_map(|sc| sc.decisions.iter().map(move |d| (sc.service.as_str(), d))).collect();
    all.sort_by(|a, b| b.1.latest().total_cmp(&a.1.latest()));
    let rows = all.into_iter().map(|(service, d)| {
        let mut cells = d.cells(now);
        cells.insert(1, service.to_owned());
        Row::new(cells)
    });
    use Constraint::{Fill, Length, Min};
    let columns =
        [("WHEN", Length(10)), ("SERVICE", Min(8)), ("CHANGE", Length(10)), ("RULE", Length(12)), ("REASON", Fill(1))];
    f.render_widget(table("decisions", &columns, rows.collect()), area);
}

/// Run `top` on this terminal until q, Esc or Ctrl-C; asks `socket` every
/// `interval`. Not a terminal: an error that points elsewhere.
pub fn run(socket: &Path, interval: Duration) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "top needs a terminal (stdin and stdout); for a pipe or a script use `lb-agent status --watch` or \
             `lb-agent status --json`"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut terminal = ratatui::try_init()?;
    let result = watch(&mut terminal, &rt, socket, interval);
    ratatui::restore();
    result
}

fn watch(
    terminal: &mut ratatui::DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    interval: Duration,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let mut top = Top::new(interval);
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            // The timer is made inside the runtime, which drives it.
            let limit = interval.max(Duration::from_secs(1));
            let asked = rt.block_on(async { tokio::time::timeout(limit, crate::serve::api::status(socket)).await });
            let answer = match asked {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("no answer in time".to_owned()),
            };
            top.update(answer, now_unix());
            next = Instant::now() + interval;
            terminal.draw(|f| draw(f, &top, now_unix()))?;
        }
        if event::poll(next.saturating_duration_since(Instant::now()))? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let ctrl_c = k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => {
                    terminal.autoresize()?;
                    terminal.draw(|f| draw(f, &top, now_unix()))?;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::status::{web_service, DecisionSummary, ReplicaStatus, Traffic};

    const NOW: f64 = 1_000_000.0;

    fn snapshot(cpu: f64) -> Snapshot {
        Snapshot {
            services: vec![ServiceStatus {
                usable_backends: 2,
                ..web_service(Traffic { packets_per_second: 1500.0, new_flows_per_second: 42.0, ..Traffic::default() })
            }],
            scaling: vec![ScalingStatus {
                service: "web".into(),
                min_replicas: 1,
                max_replicas: 4,
                desired: 2,
                replicas: vec![ReplicaStatus {
                    id: "1".into(),
                    name: "web-1".into(),
                    address: "10.212.0.2:8080".into(),
                    phase: "ready".into(),
                    cpu_percent: Some(cpu),
                    requests_per_second: Some(120.0),
                    age_seconds: 75.0,
                }],
                decisions: vec![DecisionSummary {
                    unix_time: NOW - 30.0,
                    last_unix_time: NOW - 30.0,
                    replicas: 2,
                    current: 1,
                    previous: 1,
                    rule: "target cpu".into(),
                    reason: "cpu 80% above 50%".into(),
                    repeats: 1,
                }],
                metrics: vec![ScalingMetric {
                    metric: "cpu".into(),
                    label: "cpu".into(),
                    rule: "target".into(),
                    value: Some(cpu),
                    target: 50.0,
                    unit: "%".into(),
                }],
                ..ScalingStatus::default()
            }],
            ..Snapshot::default()
        }
    }

    fn screen(top: &Top, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, top, NOW)).unwrap();
        let buf = t.backend().buffer();
        (0..h).map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>() + "\n").collect()
    }

    fn fed() -> Top {
        let mut top = Top::new(Duration::from_secs(1));
        for (i, cpu) in [20.0, 40.0, 80.0, 60.0].into_iter().enumerate() {
            top.update(Ok(snapshot(cpu)), NOW - 3.0 + i as f64);
        }
        top
    }

    #[test]
    fn the_screen_shows_services_instances_the_chart_and_decisions() {
        let s = screen(&fed(), 120, 40);
        assert!(s.contains("every 1s; q quits"), "{s}");
        let line = |needle: &str| s.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}:\n{s}"));
        let web = line("10.0.0.100:80/tcp");
        for cell in ["web", "dnat", "1.5k", "42", "2/0"] {
            assert!(web.contains(cell), "{cell} in {web}");
        }
        let inst = line("web-1");
        for cell in ["10.212.0.2:8080", "ready", "60%", "120", "1m15s"] {
            assert!(inst.contains(cell), "{cell} in {inst}");
        }
        assert!(line("web cpu 60%/50% (last 5m00s)").contains('┌'), "{s}");
        assert!(s.chars().any(|c| ('\u{2801}'..='\u{28ff}').contains(&c)), "the chart draws its lines:\n{s}");
        let d = line("target cpu");
        for cell in ["30s ago", "1 -> 2", "cpu 80% above 50%"] {
            assert!(d.contains(cell), "{cell} in {d}");
        }
    }

    #[test]
    fn an_agent_that_does_not_answer_is_said_so_and_its_last_view_stays() {
        let mut top = fed();
        top.update(Err("connect /run/x.sock: no such file".into()), NOW + 1.0);
        let s = screen(&top, 120, 40);
        assert!(s.lines().next().unwrap().contains("agent not answering (connect /run/x.sock: no such file)"), "{s}");
        assert!(s.contains("10.0.0.100:80/tcp"), "{s}");
        top.update(Ok(snapshot(50.0)), NOW + 2.0);
        let s = screen(&top, 120, 40);
        assert!(!s.contains("not answering"), "{s}");
        assert_eq!(top.history["web"].len(), 5);
    }

    #[test]
    fn a_small_terminal_gets_a_line_per_service() {
        let mut top = fed();
        top.interval = Duration::from_millis(250);
        let s = screen(&top, 50, 8);
        assert!(s.contains("every 250ms"), "{s}");
        assert!(s.contains("web 10.0.0.100:80/tcp 1.5k pkt/s 42 new/s"), "{s}");
        assert!(s.contains("(a 60x16 terminal shows more)"), "{s}");
    }

    #[test]
    fn the_history_keeps_the_last_minutes() {
        let mut top = Top::new(Duration::from_secs(1));
        top.update(Ok(snapshot(10.0)), NOW);
        top.update(Ok(snapshot(20.0)), NOW + HISTORY.as_secs_f64() + 1.0);
        let kept: Vec<f64> = top.history["web"].iter().map(|p| p.1).collect();
        assert_eq!(kept, [20.0]);
        top.update(Ok(Snapshot::default()), NOW + HISTORY.as_secs_f64() + 2.0);
        assert!(top.history.is_empty(), "a service no longer scaled leaves");
    }
}
