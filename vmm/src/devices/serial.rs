//! The console: a 16550 UART at 0x3f8 (IRQ 4) built on `vm_superio::Serial`.
//!
//! Output goes to a host sink the caller gives (any `Write + Send`), through a
//! [`ConsoleWriter`]: the one place the console is cut into lines. Each
//! complete line is checked for boot milestones (`Run /init as init
//! process`, `Kernel panic`) and handed to the caller's line sink, if any
//! ([`ConsoleLines`]), so that no one else splits the same bytes again. Input from the host is queued into the
//! UART's receive FIFO with [`Serial::enqueue_input`]; the UART raises its
//! interrupt through an irqfd (an `EventFd` registered on GSI 4).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::devices::EventFdTrigger;
use crate::metrics::Timeline;
use crate::persist::Persist;

/// The console line that marks the kernel handing over to user space.
pub const INIT_LINE: &str = "Run /init as init process";
/// The console text that marks a kernel panic.
pub const PANIC_LINE: &str = "Kernel panic - not syncing";

/// Told of every complete console line: without its `\n` (and a `\r`
/// before it), invalid UTF-8 replaced. A line longer than
/// [`ConsoleWriter::MAX_LINE`] bytes arrives in pieces of that size, so no
/// byte is lost. Called on the vCPU thread that wrote the line's last byte:
/// it must be short.
pub type ConsoleLines = Box<dyn FnMut(&str) + Send>;

/// The host side of the console output: forwards bytes to a sink, cuts them
/// into lines, marks milestones and hands each line on.
pub struct ConsoleWriter {
    sink: Box<dyn Write + Send>,
    lines: Option<ConsoleLines>,
    timeline: Arc<Timeline>,
    line: Vec<u8>,
}

impl ConsoleWriter {
    /// The longest line handed on whole (bytes).
    pub const MAX_LINE: usize = 4096;

    /// A writer forwarding to `sink`, marking milestones on `timeline`, and
    /// handing complete lines to `lines`.
    pub fn new(
        sink: Box<dyn Write + Send>,
        lines: Option<ConsoleLines>,
        timeline: Arc<Timeline>,
    ) -> Self {
        ConsoleWriter {
            sink,
            lines,
            timeline,
            line: Vec::with_capacity(128),
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else {
                if self.line.len() >= Self::MAX_LINE {
                    self.end_line();
                }
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let raw = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let line = String::from_utf8_lossy(raw);
        if line.contains(INIT_LINE) {
            self.timeline.mark_init_started();
            tracing::info!(us = self.timeline.now_us(), "guest kernel started /init");
        } else if line.contains(PANIC_LINE) {
            self.timeline.mark_kernel_panic();
            tracing::warn!(us = self.timeline.now_us(), "guest kernel panicked");
        }
        if let Some(lines) = self.lines.as_mut() {
            lines(&line);
        }
        self.line.clear();
    }
}

impl Drop for ConsoleWriter {
    /// An unfinished last line is still a line.
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // A sink that fails (closed pipe) must not stop the guest: drop output.
        if let Err(e) = self.sink.write_all(buf) {
            tracing::debug!(%e, "console sink write failed");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Err(e) = self.sink.flush() {
            tracing::debug!(%e, "console sink flush failed");
        }
        Ok(())
    }
}

/// vm-superio's receive FIFO size (private there).
const UART_FIFO_SIZE: usize = 64;

type Uart = vm_superio::Serial<EventFdTrigger, NoEvents, ConsoleWriter>;

/// The UART as a bus device (8 ports).
pub struct Serial {
    uart: Mutex<Uart>,
}

impl Serial {
    /// Ports covered from the base.
    pub const LEN: u64 = 8;

    /// A UART raising `irq_evt` for interrupts and writing to `out`.
    pub fn new(irq_evt: EventFd, out: ConsoleWriter) -> Self {
        Serial {
            uart: Mutex::new(vm_superio::Serial::new(EventFdTrigger(irq_evt), out)),
        }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO
    /// (0 when it is full: try again later).
    pub fn enqueue_input(&self, input: &[u8]) -> usize {
        match self.uart().enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                tracing::debug!(%e, "serial input");
                0
            }
        }
    }
}

/// The 16550 UART's registers and receive FIFO: vm-superio's own
/// `SerialState`, serialised field by field through serde's remote derive
/// (the fields as [`SerialStateDef`] names them), so there is no copy of the
/// type to keep in step with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState(#[serde(with = "SerialStateDef")] pub vm_superio::serial::SerialState);

/// A UART as it powers on (vm-superio's reset values).
impl Default for SerialState {
    fn default() -> Self {
        /// Interrupts to nowhere: the UART is made only to read its state.
        struct NoIrq;
        impl vm_superio::Trigger for NoIrq {
            type E = std::convert::Infallible;
            fn trigger(&self) -> Result<(), Self::E> {
                Ok(())
            }
        }
        SerialState(vm_superio::Serial::new(NoIrq, io::sink()).state())
    }
}

/// vm-superio's `SerialState`, as serde sees it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "vm_superio::serial::SerialState")]
pub struct SerialStateDef {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Receive FIFO (at most 64 bytes).
    pub in_buffer: Vec<u8>,
}

impl Persist for Serial {
    type State = SerialState;
    type Error = io::Error;

    /// The UART's registers and receive FIFO.
    fn save_state(&self) -> SerialState {
        SerialState(self.uart().state())
    }

    /// Replaces the UART's registers and receive FIFO with `state` (a
    /// restore), keeping its interrupt line and console output. A state with
    /// more input than the FIFO holds is refused and nothing changes.
    fn restore_state(&self, state: &SerialState) -> io::Result<()> {
        let state = &state.0;
        if state.in_buffer.len() > UART_FIFO_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} bytes of pending input: the FIFO holds {}",
                    state.in_buffer.len(),
                    UART_FIFO_SIZE
                ),
            ));
        }
        let mut uart = self.uart();
        let irq = uart.interrupt_evt().0.try_clone()?;
        let placeholder = vm_superio::Serial::new(
            EventFdTrigger(irq.try_clone()?),
            ConsoleWriter::new(
                Box::new(io::sink()),
                None,
                Arc::new(Timeline::new(std::time::Instant::now())),
            ),
        );
        let out = std::mem::replace(&mut *uart, placeholder).into_writer();
        *uart = vm_superio::Serial::from_state(state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart().read(off);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart().write(off, *b) {
                tracing::debug!(%e, "serial write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_milestones_are_seen() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let sink = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = Serial::new(
            evt.try_clone().unwrap(),
            ConsoleWriter::new(Box::new(sink.clone()), None, t.clone()),
        );
        for b in b"[ 1.0] Run /init as init process\r\nKernel panic - not syncing: x\n" {
            s.write(0, &[*b]);
        }
        assert!(t.init_started_us().is_some());
        assert!(t.kernel_panic_us().is_some());
        assert!(String::from_utf8_lossy(&sink.0.lock().unwrap()).starts_with("[ 1.0] Run /init"));
    }

    #[test]
    fn the_console_is_cut_into_lines_once_and_nothing_is_lost() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let got = Arc::new(Mutex::new(Vec::<String>::new()));
        let g = got.clone();
        let mut w = ConsoleWriter::new(
            Box::new(io::sink()),
            Some(Box::new(move |l| g.lock().unwrap().push(l.to_string()))),
            t,
        );
        let long = "x".repeat(ConsoleWriter::MAX_LINE + 10);
        // Bytes arrive one at a time from the UART, or in any pieces.
        w.write_all(b"one\r\ntw").unwrap();
        w.write_all(b"o\n\n\xffbad\n").unwrap();
        w.write_all(long.as_bytes()).unwrap();
        w.write_all(b"\nlast, unfinished").unwrap();
        assert_eq!(got.lock().unwrap().len(), 6, "{:?}", got.lock().unwrap());
        drop(w);
        let got = got.lock().unwrap();
        assert_eq!(got[..4], ["one", "two", "", "\u{fffd}bad"]);
        assert_eq!(
            got[4].len(),
            ConsoleWriter::MAX_LINE,
            "a long line in pieces"
        );
        assert_eq!(got[5], "x".repeat(10));
        assert_eq!(got[6], "last, unfinished", "kept when the writer goes");
        assert_eq!(got.len(), 7);
    }

    #[test]
    fn input_raises_interrupt_and_is_read() {
        let t = Arc::new(Timeline::new(Instant::now()));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = Serial::new(
            evt.try_clone().unwrap(),
            ConsoleWriter::new(Box::new(io::sink()), None, t),
        );
        s.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert_eq!(evt.read().unwrap(), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'h');
    }
}
