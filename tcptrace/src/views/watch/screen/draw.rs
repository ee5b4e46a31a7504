//! Drawing one frame: the host header, the sparklines, the process table with the columns the
//! width allows, the footer, and the detail pane or help on top. Every string that came from
//! another process goes through [`escape`] first.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap},
};

use super::{
    app::{App, History},
    detail,
};
use crate::{
    state::snapshot::{ProcessView, Snapshot},
    views::{
        findings::Thresholds,
        format::{clock, escape, escape_cut, fmt_age},
    },
};

/// Colours for what crossed a threshold, or none at all when `NO_COLOR` is set (then bold
/// marks the same cells).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Palette {
    pub color: bool,
}

impl Palette {
    /// <https://no-color.org>: any non-empty `NO_COLOR` turns colours off.
    pub fn from_env() -> Self {
        Self {
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }
    fn colored(self, c: Color) -> Style {
        let s = Style::new().add_modifier(Modifier::BOLD);
        if self.color { s.fg(c) } else { s }
    }
    pub fn bad(self) -> Style {
        self.colored(Color::Red)
    }
    pub fn warn(self) -> Style {
        self.colored(Color::Yellow)
    }
    pub fn churn(self) -> Style {
        self.colored(Color::Magenta)
    }
    pub fn title(self) -> Style {
        self.colored(Color::Cyan)
    }
}

/// What one frame shows.
pub struct View<'a> {
    pub snap: &'a Snapshot,
    pub rows: &'a [&'a ProcessView],
    /// The selected process from a detailed snapshot, when the detail pane is open.
    pub detail: Option<&'a ProcessView>,
    pub leak_after_ns: u64,
    pub thresholds: &'a Thresholds,
    pub palette: Palette,
}

pub fn draw(f: &mut Frame, app: &App, v: &View) {
    let [head, sparks, body, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(3),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header(v)), head);
    sparklines(f, sparks, &app.history, v.palette);
    if app.detail {
        let [top, bottom] =
            Layout::vertical([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(body);
        table(f, top, app, v);
        detail::draw(f, bottom, app, v);
    } else {
        table(f, body, app, v);
    }
    f.render_widget(Paragraph::new(footer(app, v.palette)), foot);
    if app.help {
        help(f, f.area(), v.palette);
    }
}

fn header(v: &View) -> Vec<Line<'static>> {
    let (h, p, th) = (&v.snap.host, v.palette, v.thresholds);
    let mark = |crossed: bool, s: Style| if crossed { s } else { Style::new() };
    let first = Line::from(vec![
        Span::raw(format!(
            "{} {}  ",
            &clock(v.snap.ts)[..8],
            crate::views::format::zone(v.snap.ts)
        )),
        Span::raw(format!("established {}  ", h.established)),
        Span::styled(
            format!("close_wait {}", h.close_wait),
            mark(h.close_wait > th.close_wait, p.bad()),
        ),
        Span::raw("  "),
        Span::styled(
            format!("time_wait {}", h.time_wait),
            mark(h.time_wait > th.time_wait, p.warn()),
        ),
        Span::raw(format!(
            "  fin_wait2 {}  listen {}  total {}",
            h.fin_wait2, h.listen, h.total
        )),
    ]);
    let worst = v
        .snap
        .destinations
        .iter()
        .max_by(|a, b| a.port_share.total_cmp(&b.port_share));
    let dest = match worst {
        Some(d) => Span::styled(
            format!(
                "worst destination {} {} ports, {:.1}% of {}-{}",
                d.remote,
                d.ports_in_use,
                d.port_share * 100.0,
                d.port_range[0],
                d.port_range[1]
            ),
            mark(d.port_share >= th.port_share, p.bad()),
        ),
        None => Span::raw("no destination yet"),
    };
    let second = Line::from(vec![
        Span::styled(
            format!(
                "dropped {}{}",
                v.snap.dropped_events,
                crate::views::report::missed_note(v.snap.missed_events)
            ),
            mark(v.snap.dropped_events + v.snap.missed_events > 0, p.warn()),
        ),
        Span::raw("  "),
        dest,
        Span::raw(format!(
            "  leak after {}s  exited {}",
            v.leak_after_ns as f64 / 1e9,
            v.snap.exited.processes
        )),
    ]);
    vec![first, second]
}

fn sparklines(f: &mut Frame, area: Rect, h: &History, p: Palette) {
    let parts = Layout::horizontal([Constraint::Ratio(1, 3); 3])
        .spacing(1)
        .split(area);
    let series = [
        ("leaked CLOSE_WAIT", &h.leaked, p.bad()),
        ("connect failures/interval", &h.failures, p.warn()),
        ("closes/s", &h.closes, p.churn()),
    ];
    for ((name, data, style), &a) in series.into_iter().zip(parts.iter()) {
        let n = a.width as usize;
        let last: Vec<u64> = data
            .iter()
            .skip(data.len().saturating_sub(n))
            .copied()
            .collect();
        let now = last.last().copied().unwrap_or(0);
        let max = last.iter().max().copied().unwrap_or(0);
        let title = format!("{name} {now} (max {max})");
        let style = if now > 0 { style } else { Style::new() };
        f.render_widget(
            Sparkline::default()
                .block(Block::new().title(Span::styled(title, style)))
                .style(style)
                .data(&last),
            a,
        );
    }
}

/// A table column: its title, width (0: the rest of the line, at least 20), alignment, and
/// priority (lower ones are kept first when the terminal is narrow).
struct Col {
    title: &'static str,
    width: u16,
    right: bool,
    prio: u8,
    text: fn(&ProcessView) -> String,
}

const COMMAND_MIN: u16 = 20;

const COLS: [Col; 13] = [
    Col {
        title: "PID",
        width: 7,
        right: true,
        prio: 0,
        text: |p| p.pid.to_string(),
    },
    Col {
        title: "COMM",
        width: 15,
        right: false,
        prio: 1,
        text: |p| escape_cut(&p.comm, 15),
    },
    Col {
        title: "CLWAIT",
        width: 6,
        right: true,
        prio: 4,
        text: |p| p.close_wait.count.to_string(),
    },
    Col {
        title: "LEAKED",
        width: 6,
        right: true,
        prio: 2,
        text: |p| p.close_wait.leaked.to_string(),
    },
    Col {
        title: "OLDEST",
        width: 6,
        right: true,
        prio: 6,
        text: |p| fmt_age(p.close_wait.oldest_secs),
    },
    Col {
        title: "CONN",
        width: 6,
        right: true,
        prio: 8,
        text: |p| p.connects.ok.to_string(),
    },
    Col {
        title: "FAILED",
        width: 6,
        right: true,
        prio: 3,
        text: |p| p.connects.failed_total().to_string(),
    },
    Col {
        title: "ERROR",
        width: 13,
        right: false,
        prio: 7,
        text: top_error,
    },
    Col {
        title: "CLOSE/s",
        width: 7,
        right: true,
        prio: 5,
        text: |p| format!("{:.1}", p.churn.closed_per_sec),
    },
    Col {
        title: "TW",
        width: 6,
        right: true,
        prio: 9,
        text: |p| p.churn.time_wait.to_string(),
    },
    Col {
        title: "TOP REMOTE",
        width: 22,
        right: false,
        prio: 10,
        text: top_remote,
    },
    Col {
        title: "CONTAINER/POD",
        width: 24,
        right: false,
        prio: 11,
        text: container,
    },
    Col {
        title: "COMMAND",
        width: 0,
        right: false,
        prio: 12,
        text: |p| escape(p.cmdline.as_deref().unwrap_or("")).into_owned(),
    },
];

fn top_error(p: &ProcessView) -> String {
    p.connects
        .failed
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or_else(|| "-".into(), |(e, _)| e.clone())
}

fn top_remote(p: &ProcessView) -> String {
    p.close_wait
        .remotes
        .first()
        .map(|r| r.remote.clone())
        .or_else(|| p.destinations.first().map(|d| d.remote.clone()))
        .unwrap_or_else(|| "-".into())
}

/// The pod as namespace/name, else the first 12 digits of the container id.
pub fn container(p: &ProcessView) -> String {
    match (&p.pod, &p.container_id) {
        (Some(pod), _) => escape(&format!("{}/{}", pod.namespace, pod.name)).into_owned(),
        (None, Some(id)) => escape_cut(id, 12),
        _ => "-".into(),
    }
}

/// The columns that fit `width`, in table order.
fn columns(width: u16) -> Vec<&'static Col> {
    let mut by_prio: Vec<&Col> = COLS.iter().collect();
    by_prio.sort_by_key(|c| c.prio);
    let mut used = 0u16;
    let mut keep = Vec::new();
    for c in by_prio {
        let need = if c.width == 0 { COMMAND_MIN } else { c.width };
        let sep = u16::from(!keep.is_empty());
        if used + sep + need <= width {
            used += sep + need;
            keep.push(c.title);
        }
    }
    COLS.iter().filter(|c| keep.contains(&c.title)).collect()
}

fn row_style(p: &ProcessView, th: &Thresholds, pal: Palette) -> Style {
    if p.close_wait.leaked > 0 || p.close_wait.unaccepted > 0 {
        pal.bad()
    } else if p.connects.failed_total() > 0 {
        pal.warn()
    } else if p.churn.closed_per_sec >= th.churn_per_sec {
        pal.churn()
    } else {
        Style::new()
    }
}

fn table(f: &mut Frame, area: Rect, app: &App, v: &View) {
    let cols = columns(area.width);
    let cell = |c: &Col, s: String| {
        let w = if c.width == 0 {
            s.chars().count()
        } else {
            c.width as usize
        };
        Cell::from(if c.right { format!("{s:>w$}") } else { s })
    };
    let header =
        Row::new(cols.iter().map(|c| cell(c, c.title.to_string()))).style(v.palette.title());
    let rows = v.rows.iter().map(|p| {
        Row::new(cols.iter().map(|c| cell(c, (c.text)(p)))).style(row_style(
            p,
            v.thresholds,
            v.palette,
        ))
    });
    let widths = cols.iter().map(|c| {
        if c.width == 0 {
            Constraint::Min(COMMAND_MIN)
        } else {
            Constraint::Length(c.width)
        }
    });
    let title = if v.rows.is_empty() {
        "(no TCP activity seen yet)".to_string()
    } else {
        format!("processes: {}", v.rows.len())
    };
    let t = Table::new(rows, widths)
        .header(header)
        .column_spacing(1)
        .block(Block::new().borders(Borders::TOP).title(title))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::new().with_selected((!v.rows.is_empty()).then_some(app.selected));
    f.render_stateful_widget(t, area, &mut state);
}

fn footer(app: &App, p: Palette) -> Line<'static> {
    if app.editing {
        return Line::from(format!(
            "filter (name, pid, port, container): {}_",
            escape(&app.filter)
        ));
    }
    let mut spans = vec![Span::raw(format!(
        "q quit  ↑↓/jk move  Enter detail  s sort: {}  / filter{}  p pause  ? help",
        app.sort.label(),
        if app.filter.is_empty() {
            String::new()
        } else {
            format!(": {}", escape(&app.filter))
        }
    ))];
    if app.paused {
        spans.push(Span::styled("  PAUSED", p.warn()));
    }
    Line::from(spans)
}

const HELP: &str = "\
q, Esc        quit (Esc first closes help or the detail pane)
Up/Down, j/k  move the selection (PgUp/PgDn, g/G)
Enter         open or close the detail pane of the selected process
PgUp/PgDn     with the detail pane open: scroll it
s             sort by the next column: worst, LEAKED, FAILED, CLOSE/s, TW, PID
/             filter by command name, pid, port or container id / pod name
              (Enter keeps it, Esc clears it)
p             pause or resume the refresh
?             this help

Red: CLOSE_WAIT leaked or left unaccepted. Yellow: failed connects.
Magenta: closes per second at or above the churn threshold.";

fn help(f: &mut Frame, area: Rect, p: Palette) {
    let w = area.width.min(80);
    let h = area.height.min(17);
    let r = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(HELP)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(Span::styled("tcptrace watch: keys", p.title()))),
        r,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The title row and the text of each row, as the columns that fit `width` show them.
    fn table_text(rows: &[&ProcessView], width: u16) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let cols = columns(width);
        let titles = cols.iter().map(|c| c.title).collect();
        let cells = rows
            .iter()
            .map(|p| cols.iter().map(|c| (c.text)(p)).collect())
            .collect();
        (titles, cells)
    }

    #[test]
    fn columns_follow_the_width() {
        let titles = |w| columns(w).iter().map(|c| c.title).collect::<Vec<_>>();
        assert_eq!(
            titles(80),
            [
                "PID", "COMM", "CLWAIT", "LEAKED", "OLDEST", "CONN", "FAILED", "ERROR", "CLOSE/s"
            ]
        );
        assert_eq!(titles(40), ["PID", "COMM", "LEAKED", "FAILED"]);
        let wide = titles(200);
        assert_eq!(wide.len(), 13);
        assert_eq!(wide[9..], ["TW", "TOP REMOTE", "CONTAINER/POD", "COMMAND"]);
        // 80 + TW + TOP REMOTE + CONTAINER/POD; the command needs 20 more.
        assert_eq!(titles(80 + 7 + 23 + 25).len(), 12);
    }

    #[test]
    fn untrusted_text_is_escaped_in_cells() {
        let p = ProcessView {
            comm: "\x1b[2Jevil".into(),
            cmdline: Some("x\x1b]0;pwned\x07".into()),
            container_id: Some("\u{9b}abc".into()),
            ..Default::default()
        };
        let (_, cells) = table_text(&[&p], 200);
        let all = cells[0].join(" ");
        assert!(!all.chars().any(|c| c.is_control()), "{all:?}");
        assert!(all.contains("\\x1b[2Jevil"), "{all:?}");
        assert!(all.contains("x\\x1b]0;pwned\\x07"), "{all:?}");
    }
}
