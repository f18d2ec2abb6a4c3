//! Counters and gauges the operations listener renders in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    uploads_by_status: Mutex<BTreeMap<u16, u64>>,
    pub stored_bytes_total: AtomicU64,
    pub uploads_in_flight: AtomicI64,
    /// Request body bytes pulled off the wire, all routes: lets tests prove an early answer
    /// read nothing.
    pub body_bytes_read_total: AtomicU64,
    pub quarantine_bytes: AtomicU64,
    /// Connections open on the API listener.
    pub connections_open: AtomicI64,
    /// Connections closed at accept because `max_connections` were open.
    pub connections_refused_total: AtomicU64,
    /// Connections closed for idling past `idle_timeout_s`.
    pub connections_idle_closed_total: AtomicU64,
}

impl Metrics {
    pub fn count_upload(&self, status: u16) {
        // Invariant: the map is never left half-updated, so a poisoned lock still holds good data.
        let mut m = self
            .uploads_by_status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(status).or_default() += 1;
    }

    pub fn uploads(&self, status: u16) -> u64 {
        let m = self
            .uploads_by_status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.get(&status).copied().unwrap_or(0)
    }

    /// Renders the receiver's own series; the gate appends its own block.
    pub fn render(&self, out: &mut String) {
        let m = self
            .uploads_by_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _ = writeln!(
            out,
            "# HELP cis490_receiver_uploads_total Upload requests (PUT) answered, by status.\n# TYPE cis490_receiver_uploads_total counter"
        );
        for (status, n) in &m {
            let _ = writeln!(
                out,
                "cis490_receiver_uploads_total{{status=\"{status}\"}} {n}"
            );
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            out,
            "cis490_receiver_stored_bytes_total",
            "counter",
            "Compressed bytes stored under episodes/.",
            self.stored_bytes_total.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            out,
            "cis490_receiver_uploads_in_flight",
            "gauge",
            "Uploads whose body is being received.",
            self.uploads_in_flight.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            out,
            "cis490_receiver_body_bytes_read_total",
            "counter",
            "Request body bytes read from clients.",
            self.body_bytes_read_total
                .load(Ordering::Relaxed)
                .to_string(),
        );
        gauge(
            out,
            "cis490_receiver_quarantine_bytes",
            "gauge",
            "Bytes held in the receiver's quarantine.",
            self.quarantine_bytes.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            out,
            "cis490_receiver_connections_open",
            "gauge",
            "Connections open on the API listener.",
            self.connections_open.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            out,
            "cis490_receiver_connections_refused_total",
            "counter",
            "Connections closed before the TLS handshake because limits.max_connections were open.",
            self.connections_refused_total
                .load(Ordering::Relaxed)
                .to_string(),
        );
        gauge(
            out,
            "cis490_receiver_connections_idle_closed_total",
            "counter",
            "Connections closed after limits.idle_timeout_s without a request.",
            self.connections_idle_closed_total
                .load(Ordering::Relaxed)
                .to_string(),
        );
    }
}
