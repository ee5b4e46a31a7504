//! The live terminal screen: alternate buffer, redrawn every interval, restored on drop.

use std::io::Write;

use super::text::render;
use crate::state::snapshot::Snapshot;

pub(super) struct Screen;

impl Screen {
    pub(super) fn enter() -> Self {
        let mut out = std::io::stdout();
        let _ = crossterm::execute!(
            out,
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        );
        Screen
    }

    pub(super) fn draw(&mut self, snap: &Snapshot, wide: bool, leak_after_ns: u64) {
        let (cols, rows) = match crossterm::terminal::size() {
            Ok((c, r)) if c > 0 && r > 0 => (c, r),
            _ => (80, 24),
        };
        let lines = render(
            snap,
            wide,
            leak_after_ns,
            cols as usize,
            (rows as usize).saturating_sub(5),
        );
        let mut out = std::io::stdout().lock();
        let _ = crossterm::queue!(
            out,
            crossterm::cursor::MoveTo(0, 0),
            crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
        );
        for (i, l) in lines.iter().enumerate() {
            let _ = crossterm::queue!(out, crossterm::cursor::MoveTo(0, i as u16));
            let _ = write!(out, "{l}");
        }
        let _ = crossterm::queue!(out, crossterm::cursor::MoveTo(0, rows.saturating_sub(1)));
        let _ = write!(out, "tcptrace watch: Ctrl-C to quit");
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
    }
}
