//! Counters and gauges, rendered in the Prometheus text format for `GET /metrics`.
//!
//! A handful of named values behind one lock: the service updates them a few times per
//! batch or query, far too rarely for contention to matter.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Metric {
    help: &'static str,
    kind: Kind,
    value: f64,
}

/// The process's metrics, by name.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<&'static str, Metric>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to counter `name` (created at 0).
    pub fn add(&self, name: &'static str, help: &'static str, by: f64) {
        self.update(name, help, Kind::Counter, |v| *v += by);
    }

    /// Sets gauge `name`.
    pub fn gauge(&self, name: &'static str, help: &'static str, value: f64) {
        self.update(name, help, Kind::Gauge, |v| *v = value);
    }

    /// The current value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.lock().get(name).map(|m| m.value)
    }

    fn update(&self, name: &'static str, help: &'static str, kind: Kind, f: impl FnOnce(&mut f64)) {
        let mut values = self.lock();
        let m = values.entry(name).or_insert(Metric {
            help,
            kind,
            value: 0.0,
        });
        f(&mut m.value);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Metric>> {
        // A panic while holding the lock leaves plain numbers: still usable.
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, m) in self.lock().iter() {
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", m.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", m.value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.add("x_total", "Things.", 2.0);
        m.add("x_total", "Things.", 3.0);
        m.gauge("y", "Level.", 0.5);
        assert_eq!(m.get("x_total"), Some(5.0));
        assert_eq!(
            m.render(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 5\n\
             # HELP y Level.\n# TYPE y gauge\ny 0.5\n"
        );
    }
}
