//! The guest console as the SDK keeps it: every line captured (up to a byte
//! limit, oldest dropped first), a live stream of lines for subscribers, and
//! optional echo to the host's stdout. The lines come cut by the VMM
//! ([`osso_vmm::ConsoleLines`]), which cuts the console once for its own
//! milestones: the SDK does not split the bytes again.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::signal::Signal;

#[derive(Default)]
struct State {
    lines: VecDeque<String>,
    bytes: usize,
    dropped: u64,
    subscribers: Vec<Sender<String>>,
}

/// The console of one VM, shared between the VMM's serial device (which
/// hands it lines) and the [`crate::Vm`] handle (readers).
#[derive(Clone)]
pub struct Console {
    state: Arc<Mutex<State>>,
    limit: usize,
    echo: bool,
    /// Told of every line (readiness waits on it).
    signal: Arc<Signal>,
}

impl Console {
    pub(crate) fn new(limit: usize, echo: bool, signal: Arc<Signal>) -> Self {
        Console {
            state: Arc::default(),
            limit,
            echo,
            signal,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the VMM's serial device hands each console line to.
    pub(crate) fn line_sink(&self) -> osso_vmm::ConsoleLines {
        let me = self.clone();
        Box::new(move |line| me.push_line(line))
    }

    /// Every captured line (within the limit), each ended by a newline. (An
    /// unfinished last line joins them when the VMM's console writer goes,
    /// with the VM.)
    pub fn text(&self) -> String {
        let s = self.lock();
        let mut out = String::with_capacity(s.bytes);
        for l in &s.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Whether a captured line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lock().lines.iter().any(|l| l.contains(needle))
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let s = self.lock();
        let skip = s.lines.len().saturating_sub(n);
        s.lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lines dropped to keep within the limit.
    pub fn dropped_lines(&self) -> u64 {
        self.lock().dropped
    }

    /// A live stream of the lines that arrive from now on. The stream ends
    /// when the VM is gone.
    pub fn subscribe(&self) -> Receiver<String> {
        let (tx, rx) = mpsc::channel();
        self.lock().subscribers.push(tx);
        rx
    }

    /// Ends every live stream (the VM is gone).
    pub(crate) fn close(&self) {
        self.lock().subscribers.clear();
    }

    fn push_line(&self, line: &str) {
        if self.echo {
            println!("{line}");
        }
        // A line longer than the whole limit is cut to fit it (with its
        // newline), at a character boundary.
        let room = self.limit.saturating_sub(1);
        let line = if line.len() > room {
            let mut at = room;
            while !line.is_char_boundary(at) {
                at -= 1;
            }
            &line[..at]
        } else {
            line
        };
        let mut s = self.lock();
        let line = line.to_string();
        s.subscribers.retain(|tx| tx.send(line.clone()).is_ok());
        self.signal.notify();
        s.bytes += line.len() + 1;
        s.lines.push_back(line);
        while s.bytes > self.limit {
            match s.lines.pop_front() {
                Some(old) => {
                    s.bytes -= old.len() + 1;
                    s.dropped += 1;
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::time::Instant;

    use osso_vmm::devices::serial::ConsoleWriter;
    use osso_vmm::metrics::Timeline;

    use super::*;

    /// `text` written into `c` the way a VM's console reaches it: through
    /// the VMM's console writer, which cuts it into lines (an unfinished
    /// last line when the writer goes).
    pub(crate) fn write_console(c: &Console, text: &[u8]) {
        let t = Arc::new(Timeline::new(Instant::now()));
        let mut w = ConsoleWriter::new(Box::new(std::io::sink()), Some(c.line_sink()), t);
        w.write_all(text).unwrap();
    }

    #[test]
    fn lines_are_captured_streamed_and_bounded() {
        let c = Console::new(25, false, Arc::default());
        let rx = c.subscribe();
        write_console(&c, b"hello\r\nworld\nthird line here\n");
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            ["hello", "world", "third line here"]
        );
        // 6 + 6 + 16 bytes > 25: the oldest line went.
        assert_eq!(c.text(), "world\nthird line here\n");
        assert_eq!(c.dropped_lines(), 1);
        assert!(c.contains("third"));
        assert!(!c.contains("hello"));
        write_console(&c, b"partial");
        assert!(c.text().ends_with("partial\n"), "an unfinished last line");
        assert_eq!(rx.recv().as_deref(), Ok("partial"));
        c.close();
        assert!(rx.recv().is_err(), "the stream ends on close");
        // A line longer than the whole limit is cut to fit it.
        write_console(&c, "é".repeat(40).as_bytes());
        assert_eq!(c.text(), format!("{}\n", "é".repeat(12)));
    }
}
