//! Reading the guest kernel's log as its console prints it: printk
//! timestamps (`printk.time=1`) and `initcall_debug`'s report of each
//! initcall, for the kernel boot profile (`cargo bench --bench
//! kernel_profile`).

/// A timestamped kernel line (`[    0.123456] text`): seconds since the
/// kernel started, and the text.
pub fn stamped(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (t, text) = rest.split_once(']')?;
    Some((t.trim().parse().ok()?, text.trim()))
}

/// An `initcall_debug` report (`initcall NAME+0x0/0x80 returned R after N
/// usecs`): the initcall's name and N, the time the call took.
pub fn initcall(text: &str) -> Option<(&str, u64)> {
    let rest = text.strip_prefix("initcall ")?;
    let (name, rest) = rest.split_once(' ')?;
    let us = rest.split_once(" after ")?.1.strip_suffix(" usecs")?;
    let name = name.split('+').next().unwrap_or(name);
    Some((name, us.trim().parse().ok()?))
}

/// A gap between two consecutive timestamped kernel lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Silence {
    /// How long, seconds.
    pub seconds: f64,
    /// When it ended (kernel clock, seconds).
    pub at: f64,
    /// The line before it.
    pub after: String,
    /// The line that ends it.
    pub before: String,
}

/// What a boot's log says: initcalls by time taken (slowest first), and the
/// silences between consecutive timestamped lines (longest first), each
/// named by the line that ends it, with when it ended (kernel seconds).
#[derive(Debug, Default)]
pub struct BootProfile {
    /// `(microseconds, initcall)`, slowest first.
    pub initcalls: Vec<(u64, String)>,
    /// The silences, longest first.
    pub silences: Vec<Silence>,
    /// The kernel clock at the line containing `marker`, if one came.
    pub marker_at: Option<f64>,
}

impl BootProfile {
    /// Reads `lines` (the console, in order); `marker` is a line to time
    /// (e.g. `Run /init as init process`).
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>, marker: &str) -> Self {
        let mut p = BootProfile::default();
        let mut prev: Option<(f64, String)> = None;
        for l in lines {
            let Some((t, text)) = stamped(l) else {
                continue;
            };
            if let Some((name, us)) = initcall(text) {
                p.initcalls.push((us, name.to_string()));
            }
            if let Some((then, after)) = prev.take() {
                p.silences.push(Silence {
                    seconds: t - then,
                    at: t,
                    after,
                    before: text.to_string(),
                });
            }
            prev = Some((t, text.to_string()));
            if p.marker_at.is_none() && text.contains(marker) {
                p.marker_at = Some(t);
            }
        }
        p.initcalls.sort_by_key(|c| std::cmp::Reverse(c.0));
        p.silences.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines_are_read() {
        assert_eq!(
            stamped("[    0.123456] Run /init as init process"),
            Some((0.123456, "Run /init as init process"))
        );
        assert_eq!(stamped("no stamp"), None);
        assert_eq!(stamped("[ garbage ] x"), None);
        assert_eq!(
            initcall("initcall pci_subsys_init+0x0/0x80 returned 0 after 1234 usecs"),
            Some(("pci_subsys_init", 1234))
        );
        assert_eq!(initcall("calling  pci_subsys_init+0x0/0x80 @ 1"), None);
        assert_eq!(initcall("initcall x returned 0 after many usecs"), None);
    }

    #[test]
    fn a_log_gives_the_slowest_initcalls_and_silences() {
        let log = [
            "[    0.000000] Linux version 6.12",
            "noise without a stamp",
            "[    0.100000] calling  a+0x0/0x10 @ 1",
            "[    0.150000] initcall a+0x0/0x10 returned 0 after 50000 usecs",
            "[    0.150100] calling  b+0x0/0x10 @ 1",
            "[    0.150200] initcall b+0x0/0x10 returned 0 after 100 usecs",
            "[    0.900000] Run /init as init process",
        ];
        let p = BootProfile::from_lines(log, "Run /init");
        assert_eq!(
            p.initcalls,
            [(50000, "a".to_string()), (100, "b".to_string())]
        );
        let s = &p.silences[0];
        assert!((s.seconds - 0.7498).abs() < 1e-9, "{s:?}");
        assert_eq!(s.at, 0.9);
        assert_eq!(s.before, "Run /init as init process");
        assert_eq!(s.after, "initcall b+0x0/0x10 returned 0 after 100 usecs");
        assert_eq!(p.silences.len(), 5);
        assert_eq!(p.marker_at, Some(0.9));
    }
}
