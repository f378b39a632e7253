//! The guest console as the SDK keeps it: every line captured (up to a byte
//! limit, oldest dropped first), a live stream of lines for subscribers, and
//! optional echo to the host's stdout.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::signal::Signal;

#[derive(Default)]
struct State {
    lines: VecDeque<String>,
    bytes: usize,
    dropped: u64,
    partial: Vec<u8>,
    subscribers: Vec<Sender<String>>,
}

/// The console of one VM, shared between the VMM's serial device (writer)
/// and the [`crate::Vm`] handle (readers).
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

    /// The writer the VMM's serial device writes guest output into.
    pub(crate) fn writer(&self) -> ConsoleWriter {
        ConsoleWriter(self.clone())
    }

    /// Every captured line (within the limit), joined with newlines, plus
    /// any unfinished last line.
    pub fn text(&self) -> String {
        let s = self.lock();
        let mut out = String::with_capacity(s.bytes + s.partial.len());
        for l in &s.lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&String::from_utf8_lossy(&s.partial));
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
        let mut s = self.lock();
        if !s.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut s.partial)).into_owned();
            self.push_line(&mut s, line);
        }
        s.subscribers.clear();
    }

    fn push_line(&self, s: &mut State, line: String) {
        if self.echo {
            println!("{line}");
        }
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

    fn feed(&self, data: &[u8]) {
        let mut s = self.lock();
        for &b in data {
            match b {
                b'\n' => {
                    let raw = std::mem::take(&mut s.partial);
                    let line = String::from_utf8_lossy(&raw)
                        .trim_end_matches('\r')
                        .to_string();
                    self.push_line(&mut s, line);
                }
                // A line longer than the whole limit is cut, not kept whole.
                _ if s.partial.len() >= self.limit.max(1) => {}
                _ => s.partial.push(b),
            }
        }
    }
}

/// `Write` adapter handed to the VMM as the console sink.
pub(crate) struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_captured_streamed_and_bounded() {
        let c = Console::new(25, false, Arc::default());
        let rx = c.subscribe();
        let mut w = c.writer();
        w.write_all(b"hello\r\nwor").unwrap();
        w.write_all(b"ld\nthird line here\n").unwrap();
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            ["hello", "world", "third line here"]
        );
        // 6 + 6 + 16 bytes > 25: the oldest line went.
        assert_eq!(c.text(), "world\nthird line here\n");
        assert_eq!(c.dropped_lines(), 1);
        assert!(c.contains("third"));
        assert!(!c.contains("hello"));
        w.write_all(b"partial").unwrap();
        c.close();
        assert!(c.text().ends_with("partial\n"));
        assert!(rx.recv().is_ok(), "the partial line is delivered on close");
        assert!(rx.recv().is_err(), "the stream ends on close");
    }
}
