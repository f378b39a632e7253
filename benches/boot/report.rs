//! The bench's report: figures and notes, the machine description, the
//! Osso/QEMU ratios, the table and the verdicts on the targets.

use osso_sdk::HostKvm;
use osso_testkit::stats;
use serde_json::json;

use crate::qemu::qemu_version;

/// One figure: a set of samples of one metric of one system.
pub(crate) struct Figure {
    pub(crate) system: String,
    pub(crate) metric: String,
    pub(crate) unit: &'static str,
    pub(crate) median: f64,
    pub(crate) p95: f64,
    pub(crate) runs: usize,
    pub(crate) how: String,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) figures: Vec<Figure>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        system: &str,
        metric: &str,
        unit: &'static str,
        samples: &[f64],
        how: &str,
    ) {
        let s = stats::sorted(samples.iter().copied().filter(|v| v.is_finite()));
        let (Some(median), Some(p95)) = (stats::median(&s), stats::percentile(&s, 0.95)) else {
            self.note(format!("{system} {metric}: no samples"));
            return;
        };
        self.figures.push(Figure {
            system: system.into(),
            metric: metric.into(),
            unit,
            median,
            p95,
            runs: s.len(),
            how: how.into(),
        });
    }

    pub(crate) fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("NOTE: {s}");
        self.notes.push(s);
    }

    fn get(&self, system: &str, metric: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.system == system && f.metric == metric)
    }
}

/// The machine, for the report.
pub(crate) fn machine_description(host: HostKvm) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kvm = match host {
        HostKvm::Hardware => "hardware KVM",
        HostKvm::Pvm => "PVM (software KVM, /sys/module/kvm_pvm)",
        HostKvm::Missing => "none (no /dev/kvm)",
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    json!({
        "cpu": model,
        "cores": cores,
        "kvm": kvm,
        "host_kernel": kernel,
        "load_average_at_start": load,
        "qemu": qemu_version(),
    })
}

pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Osso/QEMU ratios for the figures both have, plus the setup-vs-first-byte one.
pub(crate) fn add_ratios(report: &mut Report) {
    let qemu = if report
        .figures
        .iter()
        .any(|f| f.system == "qemu-tcg" && f.metric.starts_with("start to"))
    {
        "qemu-tcg"
    } else {
        "qemu"
    };
    let pairs: Vec<(String, String)> = report
        .figures
        .iter()
        .filter(|f| f.system == "osso")
        .filter_map(|f| {
            report
                .get(qemu, &f.metric)
                .map(|_| (f.metric.clone(), f.metric.clone()))
        })
        .chain(std::iter::once((
            "VMM setup (start to first KVM_RUN)".to_string(),
            "start to first console byte".to_string(),
        )))
        .collect();
    let mut ratios = Vec::new();
    for (om, qm) in pairs {
        let (Some(o), Some(q)) = (report.get("osso", &om), report.get(qemu, &qm)) else {
            continue;
        };
        let metric = if om == qm {
            om.clone()
        } else {
            format!("osso {om} / {qemu} {qm}")
        };
        ratios.push(Figure {
            system: format!("osso/{qemu}"),
            metric,
            unit: "x",
            median: o.median / q.median,
            p95: o.p95 / q.p95,
            runs: o.runs.min(q.runs),
            how: "ratio of the medians (and of the p95s); runs: the fewer of the two".into(),
        });
    }
    report.figures.extend(ratios);
}

pub(crate) fn print_table(report: &Report) {
    println!();
    println!("| system | metric | median | p95 | unit | runs |");
    println!("| --- | --- | ---: | ---: | --- | ---: |");
    for f in &report.figures {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            f.system,
            f.metric,
            fmt_num(f.median),
            fmt_num(f.p95),
            f.unit,
            f.runs
        );
    }
    println!();
    println!("How each figure was measured:");
    let mut seen = Vec::new();
    for f in &report.figures {
        let key = format!("{} / {}", f.system, f.metric);
        if !seen.contains(&key) {
            println!("- {key}: {}", f.how);
            seen.push(key);
        }
    }
}

pub(crate) fn targets(report: &Report) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut t = |name: &str, verdict: String| out.push((name.to_string(), verdict));
    let setup = report.get("osso", "VMM setup (start to first KVM_RUN)");
    match setup {
        Some(s) => t(
            "VMM setup <= 1 ms median (real kernel)",
            format!(
                "{}: {:.2} ms",
                if s.median <= 1.0 { "MET" } else { "NOT MET" },
                s.median
            ),
        ),
        None => t("VMM setup <= 1 ms median", "not measured".into()),
    }
    if let Some(s) = report.get("osso", "tiny guest: VMM setup (spawn to first KVM_RUN)") {
        t(
            "VMM setup <= 1 ms median (tiny guest, no 14 MB kernel to load)",
            format!(
                "{}: {:.2} ms",
                if s.median <= 1.0 { "MET" } else { "NOT MET" },
                s.median
            ),
        );
    }
    let q = report
        .get("qemu", "start to first console byte")
        .or_else(|| report.get("qemu-tcg", "start to first console byte"));
    match (setup, q) {
        (Some(s), Some(q)) => t(
            "VMM setup <= 1/20 of QEMU start-to-first-console-byte",
            format!(
                "{}: {:.2} ms vs {:.2} ms / 20 = {:.2} ms (ratio 1/{:.0})",
                if s.median * 20.0 <= q.median {
                    "MET"
                } else {
                    "NOT MET"
                },
                s.median,
                q.median,
                q.median / 20.0,
                q.median / s.median
            ),
        ),
        _ => t(
            "VMM setup <= 1/20 of QEMU start-to-first-console-byte",
            "not measured (no QEMU figure)".into(),
        ),
    }
    match report.get("osso", "VMM RSS (without guest RAM) at /init") {
        Some(r) => t(
            "VMM RSS <= 2 MiB",
            format!(
                "{}: {:.2} MiB",
                if r.median <= 2.0 { "MET" } else { "NOT MET" },
                r.median
            ),
        ),
        None => t("VMM RSS <= 2 MiB", "not measured".into()),
    }
    let qk = report
        .get("qemu", "first console byte to /init line")
        .or_else(|| report.get("qemu-tcg", "first console byte to /init line"));
    match (report.get("osso", "first console byte to /init line"), qk) {
        (Some(o), Some(q)) => t(
            "Osso kernel-to-/init no slower than QEMU's",
            format!(
                "{}: {:.0} ms vs {:.0} ms (first console byte to /init, medians)",
                if o.median <= q.median {
                    "MET"
                } else {
                    "NOT MET"
                },
                o.median,
                q.median
            ),
        ),
        _ => t(
            "Osso kernel-to-/init no slower than QEMU's",
            "not measured".into(),
        ),
    }
    out
}
