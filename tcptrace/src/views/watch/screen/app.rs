//! What the screen shows and how keys change it: the selected process, the sort column, the
//! filter, pause, the detail pane and help; and the history behind the sparklines. Pure
//! logic, no terminal: unit-tested without one.

use std::collections::VecDeque;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::state::snapshot::{ProcessView, Snapshot};

/// The column the process table is sorted by, `s` cycles through them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortBy {
    /// The snapshot's own order: leaked, then failures, then churn.
    #[default]
    Worst,
    Leaked,
    Failed,
    Churn,
    TimeWait,
    Pid,
}

impl SortBy {
    pub fn next(self) -> Self {
        match self {
            Self::Worst => Self::Leaked,
            Self::Leaked => Self::Failed,
            Self::Failed => Self::Churn,
            Self::Churn => Self::TimeWait,
            Self::TimeWait => Self::Pid,
            Self::Pid => Self::Worst,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Worst => "worst",
            Self::Leaked => "LEAKED",
            Self::Failed => "FAILED",
            Self::Churn => "CLOSE/s",
            Self::TimeWait => "TW",
            Self::Pid => "PID",
        }
    }

    fn sort(self, rows: &mut [&ProcessView]) {
        match self {
            Self::Worst => {}
            Self::Leaked => rows.sort_by_key(|p| std::cmp::Reverse(p.close_wait.leaked)),
            Self::Failed => rows.sort_by_key(|p| std::cmp::Reverse(p.connects.failed_total())),
            Self::Churn => {
                rows.sort_by(|a, b| b.churn.closed_per_sec.total_cmp(&a.churn.closed_per_sec))
            }
            Self::TimeWait => rows.sort_by_key(|p| std::cmp::Reverse(p.churn.time_wait)),
            Self::Pid => rows.sort_by_key(|p| p.pid),
        }
    }
}

/// What a key asks of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
}

/// The longest filter text kept.
const MAX_FILTER: usize = 64;
/// Lines PgDn / PgUp scroll the detail pane by.
const DETAIL_PAGE: u16 = 10;

#[derive(Debug, Default)]
pub struct App {
    /// Row of the selection in the visible (filtered, sorted) table.
    pub selected: usize,
    /// The selected process, followed across refreshes as rows move.
    pub selected_pid: Option<u32>,
    pub sort: SortBy,
    /// `/` filter: a name (substring), pid, port or container id prefix / pod name.
    pub filter: String,
    /// Typing the filter.
    pub editing: bool,
    pub paused: bool,
    pub help: bool,
    pub detail: bool,
    /// Lines the detail pane is scrolled down by (PgDn / PgUp while it is open).
    pub detail_scroll: u16,
    pub history: History,
}

impl App {
    pub fn key(&mut self, k: KeyEvent) -> Action {
        if k.kind == KeyEventKind::Release {
            return Action::Nothing;
        }
        // Raw mode: Ctrl-C arrives as a key, not as SIGINT.
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.editing {
            match k.code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if !c.is_control() && self.filter.chars().count() < MAX_FILTER => {
                    self.filter.push(c)
                }
                _ => return Action::Nothing,
            }
            self.selected = 0;
            self.selected_pid = None;
            return Action::Redraw;
        }
        match k.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.help => self.help = false,
            KeyCode::Esc if self.detail => self.detail = false,
            KeyCode::Esc => return Action::Quit,
            KeyCode::Char('?') => self.help = !self.help,
            KeyCode::Up | KeyCode::Char('k') => self.move_by(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_by(1),
            KeyCode::PageUp if self.detail => {
                self.detail_scroll = self.detail_scroll.saturating_sub(DETAIL_PAGE)
            }
            KeyCode::PageDown if self.detail => {
                self.detail_scroll = self.detail_scroll.saturating_add(DETAIL_PAGE)
            }
            KeyCode::PageUp => self.move_by(-10),
            KeyCode::PageDown => self.move_by(10),
            KeyCode::Home | KeyCode::Char('g') => self.move_by(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_by(isize::MAX / 2),
            KeyCode::Enter => {
                self.detail = !self.detail;
                self.detail_scroll = 0;
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char('/') => self.editing = true,
            _ => return Action::Nothing,
        }
        Action::Redraw
    }

    fn move_by(&mut self, d: isize) {
        self.selected = self.selected.saturating_add_signed(d);
        self.detail_scroll = 0;
        // Re-pick the pid at the new row on the next `rows`.
        self.selected_pid = None;
    }

    /// The table's rows: `snap`'s processes that pass the filter, sorted; the selection
    /// follows its pid (or stays on its row when that pid is gone). `port_pids`: the processes
    /// with a socket on the port the filter names, when it names one.
    pub fn rows<'a>(&mut self, snap: &'a Snapshot, port_pids: &[u32]) -> Vec<&'a ProcessView> {
        let mut rows: Vec<&ProcessView> = snap
            .processes
            .iter()
            .filter(|p| matches(p, &self.filter, port_pids))
            .collect();
        self.sort.sort(&mut rows);
        if let Some(i) = self
            .selected_pid
            .and_then(|pid| rows.iter().position(|p| p.pid == pid))
        {
            self.selected = i;
        } else {
            self.selected = self.selected.min(rows.len().saturating_sub(1));
            self.selected_pid = rows.get(self.selected).map(|p| p.pid);
        }
        rows
    }

    /// The port the filter names (a number that fits one), for the loop to ask the tracer
    /// which processes have a socket on it.
    pub fn filter_port(&self) -> Option<u16> {
        self.filter.trim().parse().ok().filter(|&p| p > 0)
    }
}

/// Whether `p` passes the `/` filter: command name (substring, any case), pid, a port
/// (`port_pids`), a container id prefix or a pod name (substring).
pub fn matches(p: &ProcessView, filter: &str, port_pids: &[u32]) -> bool {
    let f = filter.trim().to_lowercase();
    if f.is_empty() {
        return true;
    }
    p.comm.to_lowercase().contains(&f)
        || p.pid.to_string() == f
        || port_pids.contains(&p.pid)
        || p.container_id.as_deref().is_some_and(|c| c.starts_with(&f))
        || p.pod.as_ref().is_some_and(|pod| pod.name.contains(&f))
}

/// Samples kept per series: ten minutes at the default interval.
pub const HISTORY: usize = 600;
/// Samples kept per process (closes/s, for the detail pane): two minutes at the default
/// interval, so that thousands of processes stay cheap.
pub const PROCESS_HISTORY: usize = 120;

/// The last minutes of the host, one sample per refresh, for the sparklines.
#[derive(Debug, Default)]
pub struct History {
    /// Leaked CLOSE_WAIT sockets of the processes shown.
    pub leaked: VecDeque<u64>,
    /// Failed connects during the interval.
    pub failures: VecDeque<u64>,
    /// Closes per second during the interval.
    pub closes: VecDeque<u64>,
    /// Closes per second of each process shown, by pid (processes no longer shown are
    /// forgotten).
    pub closes_by_pid: std::collections::HashMap<u32, VecDeque<u64>>,
    last: Option<(u64, u64)>,
}

impl History {
    /// Adds the sample of `snap`, `secs` after the previous one.
    pub fn push(&mut self, snap: &Snapshot, secs: f64) {
        let leaked = snap.processes.iter().map(|p| p.close_wait.leaked).sum();
        let failed = snap.exited.connects_failed
            + snap
                .processes
                .iter()
                .map(|p| p.connects.failed_total())
                .sum::<u64>();
        let closed = snap.exited.closed_total
            + snap
                .processes
                .iter()
                .map(|p| p.churn.closed_total)
                .sum::<u64>();
        let (df, dc) = match self.last {
            Some((f, c)) => (failed.saturating_sub(f), closed.saturating_sub(c)),
            None => (0, 0),
        };
        self.last = Some((failed, closed));
        let per_sec = if secs > 0.0 {
            (dc as f64 / secs).round() as u64
        } else {
            0
        };
        for (q, v) in [
            (&mut self.leaked, leaked),
            (&mut self.failures, df),
            (&mut self.closes, per_sec),
        ] {
            if q.len() == HISTORY {
                q.pop_front();
            }
            q.push_back(v);
        }
        let shown: std::collections::HashSet<u32> = snap.processes.iter().map(|p| p.pid).collect();
        self.closes_by_pid.retain(|pid, _| shown.contains(pid));
        for p in &snap.processes {
            let q = self.closes_by_pid.entry(p.pid).or_default();
            if q.len() == PROCESS_HISTORY {
                q.pop_front();
            }
            q.push_back(p.churn.closed_per_sec.round() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::snapshot::{ChurnView, CloseWaitView, ConnectsView, PodView};

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn proc(pid: u32, comm: &str, leaked: u64, failed: u64) -> ProcessView {
        ProcessView {
            pid,
            comm: comm.into(),
            close_wait: CloseWaitView {
                leaked,
                ..Default::default()
            },
            connects: ConnectsView {
                ok: 0,
                failed: [("ECONNREFUSED".to_string(), failed)].into(),
            },
            ..Default::default()
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            processes: vec![
                proc(10, "leaker", 5, 0),
                proc(20, "failer", 0, 9),
                ProcessView {
                    container_id: Some("abcdef0123".into()),
                    pod: Some(PodView {
                        name: "web-7f9".into(),
                        ..Default::default()
                    }),
                    ..proc(30, "nginx", 0, 1)
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn keys_move_sort_filter_and_quit() {
        let s = snap();
        let mut app = App::default();
        let pids = |app: &mut App| app.rows(&s, &[]).iter().map(|p| p.pid).collect::<Vec<_>>();
        assert_eq!(pids(&mut app), [10, 20, 30]);
        assert_eq!(app.key(key(KeyCode::Down)), Action::Redraw);
        app.key(key(KeyCode::Char('j')));
        app.key(key(KeyCode::Char('j'))); // stops at the last row
        pids(&mut app);
        assert_eq!((app.selected, app.selected_pid), (2, Some(30)));
        app.key(key(KeyCode::Char('k')));
        pids(&mut app);
        assert_eq!(app.selected_pid, Some(20));
        // The selection follows its pid when the order changes.
        app.key(key(KeyCode::Char('s')));
        app.key(key(KeyCode::Char('s')));
        assert_eq!(app.sort, SortBy::Failed);
        assert_eq!(pids(&mut app), [20, 30, 10]);
        assert_eq!(app.selected, 0);
        // Filter by name, pid, container prefix, pod name; Esc while typing clears it.
        for (text, want) in [
            ("LEAK", vec![10]),
            ("30", vec![30]),
            ("abcd", vec![30]),
            ("web", vec![30]),
        ] {
            app.key(key(KeyCode::Char('/')));
            for c in text.chars() {
                app.key(key(KeyCode::Char(c)));
            }
            app.key(key(KeyCode::Enter));
            assert_eq!(pids(&mut app), want, "filter {text}");
            app.key(key(KeyCode::Char('/')));
            app.key(key(KeyCode::Esc));
            assert!(app.filter.is_empty() && !app.editing);
        }
        assert_eq!(app.rows(&s, &[20]).len(), 3);
        app.filter = "8080".into();
        assert_eq!(app.filter_port(), Some(8080));
        assert_eq!(app.rows(&s, &[20])[0].pid, 20);
        // Enter opens the detail pane, Esc closes it, a second Esc quits; q always quits.
        assert_eq!(app.key(key(KeyCode::Enter)), Action::Redraw);
        assert!(app.detail);
        assert_eq!(app.key(key(KeyCode::Esc)), Action::Redraw);
        assert!(!app.detail);
        assert_eq!(app.key(key(KeyCode::Esc)), Action::Quit);
        assert_eq!(app.key(key(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(
            app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        app.key(key(KeyCode::Char('p')));
        assert!(app.paused);
    }

    #[test]
    fn history_keeps_deltas_in_a_ring() {
        let mut h = History::default();
        let mut s = snap();
        h.push(&s, 1.0);
        s.processes[1]
            .connects
            .failed
            .insert("ECONNREFUSED".into(), 12);
        s.processes[0].churn = ChurnView {
            closed_total: 20,
            ..Default::default()
        };
        h.push(&s, 2.0);
        assert_eq!(h.leaked, [5, 5]);
        assert_eq!(h.failures, [0, 3]);
        assert_eq!(h.closes, [0, 10]);
        for _ in 0..HISTORY {
            h.push(&s, 1.0);
        }
        assert_eq!(h.leaked.len(), HISTORY);
        assert_eq!(h.failures.back(), Some(&0));
    }

    #[test]
    fn each_process_keeps_its_churn_and_gone_ones_are_forgotten() {
        let mut h = History::default();
        let mut s = snap();
        let pid0 = s.processes[0].pid;
        let pid1 = s.processes[1].pid;
        s.processes[0].churn.closed_per_sec = 7.4;
        h.push(&s, 1.0);
        s.processes[0].churn.closed_per_sec = 12.6;
        h.push(&s, 1.0);
        assert_eq!(h.closes_by_pid[&pid0], [7, 13]);
        assert_eq!(h.closes_by_pid[&pid1], [0, 0]);
        s.processes.remove(1);
        for _ in 0..PROCESS_HISTORY {
            h.push(&s, 1.0);
        }
        assert!(!h.closes_by_pid.contains_key(&pid1));
        assert_eq!(h.closes_by_pid[&pid0].len(), PROCESS_HISTORY);
    }

    #[test]
    fn page_keys_scroll_the_open_detail_pane() {
        let mut app = App::default();
        app.key(key(KeyCode::PageDown));
        assert_eq!(
            (app.detail_scroll, app.selected),
            (0, 10),
            "moves the selection"
        );
        app.key(key(KeyCode::Enter));
        app.key(key(KeyCode::PageDown));
        app.key(key(KeyCode::PageDown));
        app.key(key(KeyCode::PageUp));
        assert_eq!((app.detail_scroll, app.selected), (10, 10));
        app.key(key(KeyCode::Down));
        assert_eq!(app.detail_scroll, 0, "another process starts at the top");
    }
}
