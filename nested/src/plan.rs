//! What level 1 runs: a plan of checks (a program, its arguments, environment,
//! working directory and time limit each), written into the level-1 image as
//! JSON and read back there by `/init`; and the line protocol by which `/init`
//! reports back over the serial console.

use serde::{Deserialize, Serialize};

/// Where the plan lives inside level 1.
pub const PLAN_PATH: &str = "/osso-nested/plan.json";

/// Every protocol line starts with this, at the start of a line.
pub const MARK: &str = "@@osso-nested@@";

/// One program to run in level 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The check's name, as reported (`target/layer5.json`).
    pub name: String,
    /// Program and arguments; the program is an absolute path or found on `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, on top of the plan's.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Killed (with its process group) after this many seconds.
    pub timeout_s: u64,
}

/// Everything level 1 runs, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Environment for every check.
    pub env: Vec<(String, String)>,
    /// Kernel modules to load first, in order, as (path, parameters).
    pub modules: Vec<(String, String)>,
    /// Seconds between "alive" lines while a check runs (the host's hang
    /// detector counts on them).
    pub heartbeat_s: u64,
    pub checks: Vec<Check>,
}

/// A line of the protocol, as `/init` prints it and the host parses it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Level 1 is up: modules loaded, `/dev/kvm` present or not.
    Up { kvm: bool, detail: String },
    /// Check `index` started.
    Begin { index: usize },
    /// Check `index` is still running after `seconds`.
    Alive { index: usize, seconds: u64 },
    /// Check `index` ended.
    End {
        index: usize,
        outcome: Outcome,
        millis: u64,
    },
    /// Every check ran; level 1 powers off.
    Done,
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exit(i32),
    Signal(i32),
    TimedOut,
    /// The program could not be started.
    NotStarted,
}

impl Outcome {
    pub fn passed(self) -> bool {
        self == Outcome::Exit(0)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exit(c) => write!(f, "exit {c}"),
            Outcome::Signal(s) => write!(f, "signal {s}"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::NotStarted => write!(f, "could not start"),
        }
    }
}

impl Event {
    /// The protocol line (without the newline).
    pub fn line(&self) -> String {
        let body = match self {
            Event::Up { kvm, detail } => format!("up kvm={} {}", u8::from(*kvm), detail),
            Event::Begin { index } => format!("begin {index}"),
            Event::Alive { index, seconds } => format!("alive {index} {seconds}"),
            Event::End {
                index,
                outcome,
                millis,
            } => {
                let o = match outcome {
                    Outcome::Exit(c) => format!("exit:{c}"),
                    Outcome::Signal(s) => format!("signal:{s}"),
                    Outcome::TimedOut => "timeout".to_string(),
                    Outcome::NotStarted => "notstarted".to_string(),
                };
                format!("end {index} {o} {millis}")
            }
            Event::Done => "done".to_string(),
        };
        format!("{MARK} {body}")
    }

    /// Parses a console line; None for anything that is not a protocol line.
    pub fn parse(line: &str) -> Option<Event> {
        let rest = line.trim_end().strip_prefix(MARK)?.strip_prefix(' ')?;
        let mut words = rest.split(' ');
        let num = |w: Option<&str>| w.and_then(|w| w.parse::<u64>().ok());
        match words.next()? {
            "up" => {
                let kvm = words.next()?.strip_prefix("kvm=")? == "1";
                let detail = words.collect::<Vec<_>>().join(" ");
                Some(Event::Up { kvm, detail })
            }
            "begin" => Some(Event::Begin {
                index: num(words.next())? as usize,
            }),
            "alive" => Some(Event::Alive {
                index: num(words.next())? as usize,
                seconds: num(words.next())?,
            }),
            "end" => {
                let index = num(words.next())? as usize;
                let o = words.next()?;
                let outcome = if let Some(c) = o.strip_prefix("exit:") {
                    Outcome::Exit(c.parse().ok()?)
                } else if let Some(s) = o.strip_prefix("signal:") {
                    Outcome::Signal(s.parse().ok()?)
                } else if o == "timeout" {
                    Outcome::TimedOut
                } else if o == "notstarted" {
                    Outcome::NotStarted
                } else {
                    return None;
                };
                Some(Event::End {
                    index,
                    outcome,
                    millis: num(words.next())?,
                })
            }
            "done" => Some(Event::Done),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_survives_its_line() {
        let events = [
            Event::Up {
                kvm: true,
                detail: "kvm_amd nested=1".into(),
            },
            Event::Up {
                kvm: false,
                detail: String::new(),
            },
            Event::Begin { index: 3 },
            Event::Alive {
                index: 3,
                seconds: 90,
            },
            Event::End {
                index: 3,
                outcome: Outcome::Exit(101),
                millis: 1234,
            },
            Event::End {
                index: 0,
                outcome: Outcome::Signal(9),
                millis: 1,
            },
            Event::End {
                index: 7,
                outcome: Outcome::TimedOut,
                millis: 600_000,
            },
            Event::End {
                index: 7,
                outcome: Outcome::NotStarted,
                millis: 0,
            },
            Event::Done,
        ];
        for e in events {
            assert_eq!(Event::parse(&e.line()), Some(e.clone()), "{}", e.line());
            assert_eq!(Event::parse(&format!("{}\r", e.line())), Some(e));
        }
    }

    #[test]
    fn other_lines_are_not_events() {
        for l in [
            "",
            "test foo ... ok",
            "@@osso-nested@@",
            "@@osso-nested@@ end x exit:0 1",
            "@@osso-nested@@ end 1 exit:zero 1",
            "@@osso-nested@@ bogus 1",
            " @@osso-nested@@ done",
        ] {
            assert_eq!(Event::parse(l), None, "{l:?}");
        }
    }

    #[test]
    fn only_exit_zero_passes() {
        assert!(Outcome::Exit(0).passed());
        for o in [
            Outcome::Exit(1),
            Outcome::Signal(9),
            Outcome::TimedOut,
            Outcome::NotStarted,
        ] {
            assert!(!o.passed());
        }
    }
}
