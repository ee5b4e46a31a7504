//! The interactive screen of `watch` (ratatui on crossterm): alternate buffer and raw mode,
//! keys read on a thread and handed over on a channel so that input never holds up the
//! refresh, and the terminal restored on every way out: normal exit, an error, SIGTERM/SIGINT
//! (the loop returns and [`Screen`] is dropped) and a panic (a hook restores it before the
//! message is printed).

mod app;
mod detail;
mod draw;

use std::{
    io::Stdout,
    sync::{
        Arc, Once,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crossterm::event::Event;
use ratatui::{Terminal, TerminalOptions, Viewport, backend::CrosstermBackend, layout::Rect};
use tokio::sync::mpsc;

use self::{
    app::{Action, App},
    draw::{Palette, View},
};
use crate::{
    host::signals::{Received, Signals},
    state::{Filter, SnapshotOptions, snapshot::Snapshot},
    tracer::Tracer,
    views::findings::Thresholds,
};

/// Terminal columns from which every process's command line is fetched for the COMMAND column.
const COMMAND_COLUMNS: u16 = 150;

/// Leaves raw mode and the alternate screen and shows the cursor; safe to call twice.
fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        std::io::stdout(),
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Restores the terminal before a panic message is printed, so that it is readable and the
/// shell usable afterwards.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    input: mpsc::UnboundedReceiver<Event>,
    stop_input: Arc<AtomicBool>,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        install_panic_hook();
        crossterm::terminal::enable_raw_mode()?;
        let entered = crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .and_then(|()| {
            let backend = CrosstermBackend::new(std::io::stdout());
            match crossterm::terminal::size() {
                Ok((c, r)) if c > 0 && r > 0 => Terminal::new(backend),
                // A terminal that does not say its size (a pty nobody sized): 80x24.
                _ => Terminal::with_options(
                    backend,
                    TerminalOptions {
                        viewport: Viewport::Fixed(Rect::new(0, 0, 80, 24)),
                    },
                ),
            }
        });
        let terminal = match entered {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        let (tx, input) = mpsc::unbounded_channel();
        let stop_input = Arc::new(AtomicBool::new(false));
        let stop = stop_input.clone();
        // Polls with a timeout so that it notices `stop` and ends with the screen.
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(false) => {}
                    Ok(true) => match crossterm::event::read() {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    },
                    Err(_) => break,
                }
            }
        });
        Ok(Self {
            terminal,
            input,
            stop_input,
        })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop_input.store(true, Ordering::Relaxed);
        restore();
    }
}

/// What the loop keeps between frames.
struct Frames {
    app: App,
    snap: Snapshot,
    detail: Option<Snapshot>,
    port_pids: Vec<u32>,
    leak_after_ns: u64,
    thresholds: Thresholds,
    palette: Palette,
}

/// Runs the screen until `q`, Esc, Ctrl-C, SIGTERM/SIGINT or the deadline.
pub(super) async fn run(
    tracer: &Tracer,
    signals: &mut Signals,
    mut snap_opts: SnapshotOptions,
    interval: Duration,
    deadline: Option<Instant>,
    leak_after_ns: u64,
) -> std::io::Result<()> {
    let mut screen = Screen::enter()?;
    let wide = snap_opts.detail;
    let mut f = Frames {
        app: App::default(),
        snap: Snapshot::default(),
        detail: None,
        port_pids: Vec::new(),
        leak_after_ns,
        thresholds: Thresholds::default(),
        palette: Palette::from_env(),
    };
    let mut next = Instant::now();
    let mut last = None::<Instant>;
    loop {
        let now = Instant::now();
        if now >= next {
            let cols = screen.terminal.size().map(|s| s.width).unwrap_or(80);
            snap_opts.detail = wide || cols >= COMMAND_COLUMNS;
            if !f.app.paused {
                f.snap = tracer.snapshot(&snap_opts);
                let secs = last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
                f.app.history.push(&f.snap, secs);
                last = Some(now);
            }
            next += interval;
            if next <= now {
                next = now + interval;
            }
        }
        f.refresh_selection(tracer, &snap_opts.filter);
        screen.terminal.draw(|fr| f.draw(fr))?;
        let wake = deadline.map_or(next, |d| d.min(next));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            r = signals.recv() => if r == Received::Terminate { return Ok(()); },
            ev = screen.input.recv() => match ev {
                Some(Event::Key(k)) => if f.app.key(k) == Action::Quit { return Ok(()); },
                // Redrawn at once, at the new size.
                Some(Event::Resize(..)) => screen.terminal.autoresize()?,
                Some(_) => {}
                // The input thread ended: no terminal to read keys from any more.
                None => return Ok(()),
            },
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
    }
}

impl Frames {
    /// The processes on the filter's port, and the detailed snapshot of the selected process
    /// (every CLOSE_WAIT socket, the command line) when the detail pane is open.
    fn refresh_selection(&mut self, tracer: &Tracer, filter: &Filter) {
        self.port_pids = match self.app.filter_port() {
            Some(port) => {
                let opts = SnapshotOptions {
                    filter: Filter {
                        ports: vec![port],
                        ..filter.clone()
                    },
                    ..Default::default()
                };
                tracer
                    .snapshot(&opts)
                    .processes
                    .iter()
                    .map(|p| p.pid)
                    .collect()
            }
            None => Vec::new(),
        };
        let rows = self.app.rows(&self.snap, &self.port_pids);
        let pid = rows.get(self.app.selected).map(|p| p.pid);
        self.detail = match pid {
            Some(pid) if self.app.detail => Some(tracer.snapshot(&SnapshotOptions {
                filter: Filter {
                    pids: vec![pid],
                    ..Default::default()
                },
                detail: true,
                ..Default::default()
            })),
            _ => None,
        };
    }

    fn draw(&mut self, frame: &mut ratatui::Frame) {
        let rows = self.app.rows(&self.snap, &self.port_pids);
        let pid = rows.get(self.app.selected).map(|p| p.pid);
        let detail = self
            .detail
            .as_ref()
            .and_then(|d| d.processes.iter().find(|p| Some(p.pid) == pid));
        let view = View {
            snap: &self.snap,
            rows: &rows,
            detail,
            leak_after_ns: self.leak_after_ns,
            thresholds: &self.thresholds,
            palette: self.palette,
        };
        draw::draw(frame, &self.app, &view);
    }
}
