//! `GET /metrics`: Prometheus text exposition format 0.0.4, written by hand.
//!
//! Broker figures are read at scrape time (topic counters, partition logs,
//! subscription stats); HTTP figures are kept here by the [`track`] middleware. Labels
//! are topic, subscription and partition names, the route *template* (never the raw
//! path), the method (a fixed set) and the status: nothing from message contents.
//!
//! Storage figures cover the topics' partition logs (their writer counters), including
//! a histogram of fdatasync latency per partition log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use carebus_core::Broker;

use crate::AppState;

/// Upper bounds (seconds) of the request-latency histogram; long polls go up to 60 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The content type of the text exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Cumulative counts per bucket of [`BUCKETS`].
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (b, le) in self.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= le {
                *b += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// (route template, method)
type RouteKey = (String, &'static str);
/// Request counts by route, method and status.
type RequestCounts = Vec<((RouteKey, u16), u64)>;

#[derive(Debug, Default)]
struct HttpInner {
    requests: BTreeMap<(RouteKey, u16), u64>,
    latency: BTreeMap<RouteKey, Histogram>,
}

/// Request counters and latency histograms, by route template.
#[derive(Debug, Default)]
pub(crate) struct HttpMetrics {
    inner: Mutex<HttpInner>,
}

impl HttpMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, HttpInner> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, route: String, method: &'static str, status: u16, took: Duration) {
        let mut inner = self.lock();
        let key = (route, method);
        *inner.requests.entry((key.clone(), status)).or_default() += 1;
        inner
            .latency
            .entry(key)
            .or_default()
            .observe(took.as_secs_f64());
    }

    fn snapshot(&self) -> (RequestCounts, Vec<(RouteKey, Histogram)>) {
        let inner = self.lock();
        (
            inner
                .requests
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            inner
                .latency
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// A fixed set of method labels (extension methods would be unbounded).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Middleware: counts every request by route template, method and status, and times it.
pub(crate) async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(req.method());
    let start = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .record(route, method, response.status().as_u16(), start.elapsed());
    response
}

pub(crate) async fn endpoint(State(state): State<AppState>) -> Response {
    let text = render(state.slot.get().map(AsRef::as_ref), &state.metrics);
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// Escapes a label value (`\`, `"` and newlines).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Figures of one partition log.
struct PartitionSnap {
    partition: String,
    end_offset: u64,
    size_bytes: u64,
    stats: carebus_log::LogStats,
}

struct SubSnap {
    name: String,
    stats: carebus_core::SubscriptionStats,
}

struct TopicSnap {
    name: String,
    published: u64,
    duplicates: u64,
    conflicts: u64,
    dedup: Option<carebus_core::DedupStats>,
    partitions: Vec<PartitionSnap>,
    subscriptions: Vec<SubSnap>,
}

fn snapshot(broker: &Broker) -> Vec<TopicSnap> {
    broker
        .topics()
        .iter()
        .map(|rt| TopicSnap {
            name: rt.name().to_owned(),
            published: rt.counters.published.load(Relaxed),
            duplicates: rt.counters.duplicates.load(Relaxed),
            conflicts: rt.counters.conflicts.load(Relaxed),
            dedup: rt.dedup_stats().ok(),
            partitions: rt
                .topic()
                .partitions
                .iter()
                .enumerate()
                .map(|(p, log)| PartitionSnap {
                    partition: p.to_string(),
                    end_offset: log.next_offset(),
                    size_bytes: log.size_bytes(),
                    stats: log.stats(),
                })
                .collect(),
            subscriptions: broker
                .subscriptions(rt.name())
                .unwrap_or_default()
                .iter()
                .map(|s| SubSnap {
                    name: s.name().to_owned(),
                    stats: s.stats(),
                })
                .collect(),
        })
        .collect()
}

/// The whole exposition.
fn render(broker: Option<&Broker>, http: &HttpMetrics) -> String {
    let mut w = Writer {
        out: String::with_capacity(4096),
    };
    w.family(
        "carebus_ready",
        "gauge",
        "1 once the store is recovered and the API serves, else 0.",
    );
    w.sample("carebus_ready", &[], u8::from(broker.is_some()));
    let topics = broker.map(snapshot).unwrap_or_default();

    // Per topic; a figure that could not be read (a poisoned dedup lock) is left out.
    type TopicFigure = fn(&TopicSnap) -> Option<u64>;
    let per_topic: [(&str, &str, &str, TopicFigure); 6] = [
        (
            "carebus_topic_published_total",
            "counter",
            "Messages stored in the topic since the broker started.",
            |t| Some(t.published),
        ),
        (
            "carebus_topic_duplicates_total",
            "counter",
            "Publishes answered as duplicates of a stored idempotency key since the broker started.",
            |t| Some(t.duplicates),
        ),
        (
            "carebus_topic_conflicts_total",
            "counter",
            "Duplicates whose body differed from the first copy since the broker started.",
            |t| Some(t.conflicts),
        ),
        (
            "carebus_dedup_keys",
            "gauge",
            "Idempotency keys the topic's deduplication index remembers (memory and disk).",
            |t| t.dedup.map(|d| d.keys),
        ),
        (
            "carebus_dedup_memory_bytes",
            "gauge",
            "Bytes of memory held by the topic's deduplication index.",
            |t| t.dedup.map(|d| d.memory_bytes),
        ),
        (
            "carebus_dedup_disk_runs",
            "gauge",
            "Runs of the topic's deduplication index spilled to disk.",
            |t| t.dedup.map(|d| d.disk_runs),
        ),
    ];
    for (name, kind, help, f) in per_topic {
        w.family(name, kind, help);
        for t in &topics {
            if let Some(v) = f(t) {
                w.sample(name, &[("topic", &t.name)], v);
            }
        }
    }

    type PartitionFigure = fn(&PartitionSnap) -> String;
    let per_partition: [(&str, &str, &str, PartitionFigure); 9] = [
        (
            "carebus_partition_end_offset",
            "gauge",
            "Next offset of the partition (everything below it is stored).",
            |p| p.end_offset.to_string(),
        ),
        (
            "carebus_partition_log_bytes",
            "gauge",
            "Bytes of the partition's segment files on disk.",
            |p| p.size_bytes.to_string(),
        ),
        (
            "carebus_storage_appends_total",
            "counter",
            "Batches appended to the partition log since it was opened.",
            |p| p.stats.batches.to_string(),
        ),
        (
            "carebus_storage_records_total",
            "counter",
            "Records appended to the partition log since it was opened.",
            |p| p.stats.records.to_string(),
        ),
        (
            "carebus_storage_bytes_written_total",
            "counter",
            "Bytes written to the partition log since it was opened.",
            |p| p.stats.bytes_written.to_string(),
        ),
        (
            "carebus_storage_fsyncs_total",
            "counter",
            "fdatasync calls of the partition log since it was opened (group commit shares one among many appends).",
            |p| p.stats.fsyncs.to_string(),
        ),
        (
            "carebus_storage_inline_fsyncs_total",
            "counter",
            "Of the fdatasync calls, those the log's writer thread made itself for a small group at low load (no hand-off to the syncer thread).",
            |p| p.stats.inline_syncs.to_string(),
        ),
        (
            "carebus_storage_fill_fsyncs_total",
            "counter",
            "fdatasync calls of zeros the log's writer filled ahead of the data while idle (not in carebus_storage_fsyncs_total: no append waits for them).",
            |p| p.stats.fill_syncs.to_string(),
        ),
        (
            "carebus_storage_fsync_seconds_total",
            "counter",
            "Time spent in fdatasync by the partition log since it was opened.",
            |p| format!("{:.6}", p.stats.fsync_micros as f64 / 1e6),
        ),
    ];
    for (name, kind, help, f) in per_partition {
        w.family(name, kind, help);
        for t in &topics {
            for p in &t.partitions {
                w.sample(
                    name,
                    &[("topic", &t.name), ("partition", &p.partition)],
                    f(p),
                );
            }
        }
    }

    // fdatasync latency, per partition log, as a Prometheus histogram.
    let name = "carebus_storage_fsync_duration_seconds";
    w.family(
        name,
        "histogram",
        "Latency of the partition log's fdatasync calls.",
    );
    for t in &topics {
        for p in &t.partitions {
            let labels = [
                ("topic", t.name.as_str()),
                ("partition", p.partition.as_str()),
            ];
            let mut cumulative = 0u64;
            for (bound, n) in carebus_log::FSYNC_BUCKETS_MICROS
                .iter()
                .zip(p.stats.fsync_buckets)
            {
                cumulative += n;
                let le = format!("{}", *bound as f64 / 1e6);
                w.sample(
                    &format!("{name}_bucket"),
                    &[labels[0], labels[1], ("le", &le)],
                    cumulative,
                );
            }
            w.sample(
                &format!("{name}_bucket"),
                &[labels[0], labels[1], ("le", "+Inf")],
                p.stats.fsyncs,
            );
            w.sample(
                &format!("{name}_sum"),
                &labels,
                format!("{:.6}", p.stats.fsync_micros as f64 / 1e6),
            );
            w.sample(&format!("{name}_count"), &labels, p.stats.fsyncs);
        }
    }

    type SubFigure = fn(&carebus_core::SubscriptionStats) -> u64;
    let per_sub: [(&str, &str, &str, SubFigure); 8] = [
        (
            "carebus_subscription_delivered_total",
            "counter",
            "Deliveries handed out (first attempts and redeliveries) since the broker started.",
            |s| s.delivered,
        ),
        (
            "carebus_subscription_redelivered_total",
            "counter",
            "Deliveries that were not a message's first attempt since the broker started.",
            |s| s.redelivered,
        ),
        (
            "carebus_subscription_acked_total",
            "counter",
            "Acknowledged deliveries since the broker started.",
            |s| s.acked,
        ),
        (
            "carebus_subscription_nacked_total",
            "counter",
            "Negative acknowledgements since the broker started.",
            |s| s.nacked,
        ),
        (
            "carebus_subscription_expired_total",
            "counter",
            "Delivery leases that ran out since the broker started.",
            |s| s.expired,
        ),
        (
            "carebus_subscription_in_flight",
            "gauge",
            "Deliveries currently unacknowledged.",
            |s| s.in_flight,
        ),
        (
            "carebus_subscription_backlog",
            "gauge",
            "Messages stored but not yet acknowledged or dead-lettered.",
            |s| s.backlog,
        ),
        (
            "carebus_subscription_dead_letters",
            "gauge",
            "Messages in the subscription's dead-letter store.",
            |s| s.dead_letters,
        ),
    ];
    for (name, kind, help, f) in per_sub {
        w.family(name, kind, help);
        for t in &topics {
            for s in &t.subscriptions {
                w.sample(
                    name,
                    &[("topic", &t.name), ("subscription", &s.name)],
                    f(&s.stats),
                );
            }
        }
    }

    let (requests, latency) = http.snapshot();
    w.family(
        "carebus_http_requests_total",
        "counter",
        "HTTP requests answered, by route template, method and status.",
    );
    for (((route, method), status), n) in &requests {
        w.sample(
            "carebus_http_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("status", &status.to_string()),
            ],
            n,
        );
    }
    let name = "carebus_http_request_duration_seconds";
    w.family(
        name,
        "histogram",
        "Time to answer an HTTP request (long polls included), by route template and method.",
    );
    for ((route, method), h) in &latency {
        for (le, n) in BUCKETS.iter().zip(h.buckets) {
            w.sample(
                &format!("{name}_bucket"),
                &[
                    ("route", route),
                    ("method", method),
                    ("le", &le.to_string()),
                ],
                n,
            );
        }
        w.sample(
            &format!("{name}_bucket"),
            &[("route", route), ("method", method), ("le", "+Inf")],
            h.count,
        );
        w.sample(
            &format!("{name}_sum"),
            &[("route", route), ("method", method)],
            format!("{:.6}", h.sum),
        );
        w.sample(
            &format!("{name}_count"),
            &[("route", route), ("method", method)],
            h.count,
        );
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_histograms_are_cumulative() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(100.0);
        assert_eq!(h.buckets[0], 0); // le 0.001
        assert_eq!(h.buckets[1], 1); // le 0.005
        assert_eq!(h.buckets[6], 2); // le 0.25
        assert_eq!(h.buckets[BUCKETS.len() - 1], 2); // le 60
        assert_eq!(h.count, 3);
        let m = HttpMetrics::default();
        m.record("/x".into(), "GET", 200, Duration::from_millis(2));
        let text = render(None, &m);
        assert!(text.contains("carebus_ready 0\n"), "{text}");
        assert!(text.contains(
            "carebus_http_request_duration_seconds_bucket{route=\"/x\",method=\"GET\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains(
            "carebus_http_requests_total{route=\"/x\",method=\"GET\",status=\"200\"} 1\n"
        ));
    }
}
