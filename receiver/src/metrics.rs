//! `/metrics` of the receiver: each series declared once, typed, in one registry that the
//! `prometheus-client` crate encodes (so HELP/TYPE cannot drift and label values are escaped).
//! Counters and gauges the request path moves live in [`Metrics`]; values read at scrape time
//! (gate, store, fleet, limits) come from the collectors registered beside them.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::state::AppState;

/// The version this binary was built as.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

/// What the request path counts. Counter names are given without `_total`: the encoder adds it.
#[derive(Debug)]
pub struct Metrics {
    uploads: Family<StatusLabel, Counter>,
    /// Compressed bytes stored (201 answers).
    pub stored_bytes: Counter,
    pub uploads_in_flight: Gauge,
    /// Request body bytes pulled off the wire, all routes: lets tests prove an early answer
    /// read nothing.
    pub body_bytes_read: Counter,
    pub quarantine_bytes: Gauge,
    /// Connections open on the API listener.
    pub connections_open: Gauge,
    /// Connections closed at accept because `max_connections` were open.
    pub connections_refused: Counter,
    /// Connections closed for idling past `idle_timeout_s`.
    pub connections_idle_closed: Counter,
    /// Store-writability probes actually run for `/healthz` (each writes a file or object).
    pub store_probes: Counter,
    /// 1 once this process's executable has been replaced on disk (SPEC §12).
    pub binary_stale: Gauge,
    /// Episodes the background scrub has checked, and what it found (SPEC §15).
    pub scrub_checked: Counter,
    scrub_problems: Family<ProblemLabel, Counter>,
    pub scrub_last_completed: Gauge,
    /// Bytes the zstd decoders hold under `[limits] decoder_memory_bytes`, and the uploads
    /// answered 503 because none came free in time.
    pub decoder_memory: Gauge,
    pub decoder_memory_refused: Counter,
    pub decoder_memory_spooled: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabel {
    problem: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            uploads: Family::default(),
            stored_bytes: Counter::default(),
            uploads_in_flight: Gauge::default(),
            body_bytes_read: Counter::default(),
            quarantine_bytes: Gauge::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            connections_idle_closed: Counter::default(),
            store_probes: Counter::default(),
            binary_stale: Gauge::default(),
            scrub_checked: Counter::default(),
            scrub_problems: Family::default(),
            scrub_last_completed: Gauge::default(),
            decoder_memory: Gauge::default(),
            decoder_memory_refused: Counter::default(),
            decoder_memory_spooled: Counter::default(),
        };
        for problem in ["missing", "truncated", "corrupt"] {
            drop(m.scrub_problems.get_or_create(&ProblemLabel { problem }));
        }
        // The encoder leaves out a family without series; the two success statuses are listed
        // from the start so the series exists (at 0) before the first upload.
        for status in [200, 201] {
            drop(m.uploads.get_or_create(&StatusLabel { status }));
        }
        m
    }
}

impl Metrics {
    pub fn count_upload(&self, status: u16) {
        self.uploads.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn count_scrub_problem(&self, problem: &'static str) {
        self.scrub_problems
            .get_or_create(&ProblemLabel { problem })
            .inc();
    }

    /// Sets a byte gauge from an unsigned count (saturating at `i64::MAX`).
    pub fn set_bytes(gauge: &Gauge, bytes: u64) {
        gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "cis490_receiver_uploads",
            "Upload requests (PUT) answered, by status",
            self.uploads.clone(),
        );
        r.register(
            "cis490_receiver_stored_bytes",
            "Compressed bytes stored under episodes/",
            self.stored_bytes.clone(),
        );
        r.register(
            "cis490_receiver_uploads_in_flight",
            "Uploads whose body is being received",
            self.uploads_in_flight.clone(),
        );
        r.register(
            "cis490_receiver_decoder_memory_bytes",
            "Bytes the uploads' zstd decoders hold under limits.decoder_memory_bytes",
            self.decoder_memory.clone(),
        );
        r.register(
            "cis490_receiver_decoder_memory_refused",
            "Uploads answered 503 because limits.decoder_memory_bytes stayed full for 10 s",
            self.decoder_memory_refused.clone(),
        );
        r.register(
            "cis490_receiver_decoder_memory_spooled",
            "Uploads written whole before validation because limits.decoder_memory_bytes was full",
            self.decoder_memory_spooled.clone(),
        );
        r.register(
            "cis490_receiver_body_bytes_read",
            "Request body bytes read from clients",
            self.body_bytes_read.clone(),
        );
        r.register(
            "cis490_receiver_quarantine_bytes",
            "Bytes held in the receiver's quarantine",
            self.quarantine_bytes.clone(),
        );
        r.register(
            "cis490_receiver_connections_open",
            "Connections open on the API listener",
            self.connections_open.clone(),
        );
        r.register(
            "cis490_receiver_connections_refused",
            "Connections closed before the TLS handshake because limits.max_connections were open",
            self.connections_refused.clone(),
        );
        r.register(
            "cis490_receiver_connections_idle_closed",
            "Connections closed after limits.idle_timeout_s without a request",
            self.connections_idle_closed.clone(),
        );
        r.register(
            "cis490_receiver_store_probes",
            "Store writability probes run for /healthz (at most one a second)",
            self.store_probes.clone(),
        );
        r.register(
            "cis490_receiver_scrub_checked",
            "Stored episodes the background scrub has checked",
            self.scrub_checked.clone(),
        );
        r.register(
            "cis490_receiver_scrub_problems",
            "Bad stored episodes the background scrub found, by problem",
            self.scrub_problems.clone(),
        );
        r.register(
            "cis490_receiver_scrub_last_completed_timestamp_seconds",
            "When the last background scrub finished (0: none yet)",
            self.scrub_last_completed.clone(),
        );
        r.register(
            "cis490_receiver_binary_stale",
            "1 when the executable this receiver was started from has been replaced on disk",
            self.binary_stale.clone(),
        );
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The registry `/metrics` encodes, built once when the operations listener starts.
pub(crate) fn registry(state: &Arc<AppState>) -> Registry {
    let mut r = Registry::default();
    state.metrics.register(&mut r);
    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel { version: VERSION })
        .set(1);
    r.register(
        "cis490_receiver_build_info",
        "The receiver's version (value 1)",
        build,
    );
    r.register_collector(Box::new(crate::gate::Collector(state.gate.clone())));
    r.register_collector(Box::new(crate::store::Collector(state.store.clone())));
    r.register_collector(Box::new(crate::fleet::Collector {
        fleet: state.fleet.clone(),
        gate: state.gate.clone(),
    }));
    r.register_collector(Box::new(Limits {
        handshakes: state.handshakes.clone(),
        max_handshakes: state.cfg.limits.max_handshakes,
    }));
    r.register_collector(Box::new(Certificates {
        server: state.cfg.tls.cert_file.clone(),
        client_ca: state.cfg.tls.client_ca_file.clone(),
    }));
    r
}

/// The receiver's own certificates' expiry (SPEC §14), read from the files at scrape time so a
/// renewal shows without a restart.
#[derive(Debug)]
struct Certificates {
    server: std::path::PathBuf,
    client_ca: std::path::PathBuf,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    cert: &'static str,
}

impl Collector for Certificates {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = enc.encode_descriptor(
            "cis490_receiver_cert_not_after_timestamp_seconds",
            "When the receiver's server certificate and the client CA expire (first certificate of each file)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (cert, path) in [("server", &self.server), ("client_ca", &self.client_ca)] {
            // A file that cannot be read now is left out; /healthz and the next reload say why.
            let Ok(s) = cis490_common::tls::summarize(path) else {
                continue;
            };
            let secs = s
                .not_after
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            ConstGauge::new(i64::try_from(secs).unwrap_or(i64::MAX))
                .encode(family.encode_family(&CertLabel { cert })?)?;
        }
        Ok(())
    }
}

/// The registry as Prometheus text.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Limits whose use is read at scrape time.
#[derive(Debug)]
struct Limits {
    handshakes: Arc<tokio::sync::Semaphore>,
    max_handshakes: usize,
}

impl Collector for Limits {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let running = self
            .max_handshakes
            .saturating_sub(self.handshakes.available_permits());
        gauge(
            &mut enc,
            "cis490_receiver_handshakes_in_progress",
            "TLS handshakes running (at most limits.max_handshakes)",
            running as i64,
        )
    }
}

/// One unlabelled gauge read at scrape time.
pub(crate) fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One unlabelled float gauge read at scrape time.
pub(crate) fn gauge_f64(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One unlabelled counter read at scrape time (`name` without `_total`).
pub(crate) fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exposed_with_total_and_help() {
        let m = Metrics::default();
        m.count_upload(201);
        m.count_upload(201);
        m.stored_bytes.inc_by(42);
        let mut r = Registry::default();
        m.register(&mut r);
        let text = encode(&r);
        assert!(
            text.contains("cis490_receiver_uploads_total{status=\"201\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE cis490_receiver_stored_bytes counter\n"),
            "{text}"
        );
        assert!(
            text.contains("cis490_receiver_stored_bytes_total 42\n"),
            "{text}"
        );
        assert!(text.contains("cis490_receiver_binary_stale 0\n"), "{text}");
    }
}
