//! What the server counts, in Prometheus' text format (prometheus-client, the Prometheus
//! project's Rust client): connections by port, users, messages and deliveries by kind,
//! file bytes each way, drops by reason, and hook calls, failures and latency by kind.
//!
//! Every counter the hot paths touch is created once at start and kept as a handle, so
//! counting is one atomic add; `--metrics-port` serves [`Metrics::encode`] over HTTP, and
//! `Server.stats()` returns the same figures.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hooks::MessageKind;

type Labels = Vec<(&'static str, &'static str)>;

/// One sample: its metric's name, its labels (name, value), and its value.
pub type Figure = (String, Vec<(String, String)>, f64);

/// Why something was dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dropped {
    /// A chat client that read nothing for `send_timeout` was disconnected.
    SlowConsumer,
    /// A connection refused at the door (full, or too many from one address).
    Refused,
}

/// A kind of hook question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookKind {
    Message,
    Login,
    Upload,
    Command,
}

/// The server's counters.
pub struct Metrics {
    registry: Registry,
    connections: [Gauge; 2],
    users: Gauge,
    messages: [Counter; 3],
    deliveries: [Counter; 3],
    bytes_in: Counter,
    bytes_out: Counter,
    drops: [Counter; 2],
    inbox_delivered: [Counter; 2],
    hook_calls: [Counter; 4],
    hook_failures: [Counter; 4],
    hook_latency: [Histogram; 4],
}

fn kind_index(kind: MessageKind) -> usize {
    match kind {
        MessageKind::Private => 0,
        MessageKind::Group => 1,
        MessageKind::Broadcast => 2,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("relaychat");
        let connections = Family::<Labels, Gauge>::default();
        let messages = Family::<Labels, Counter>::default();
        let deliveries = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let drops = Family::<Labels, Counter>::default();
        let inbox = Family::<Labels, Counter>::default();
        let calls = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 50 µs to about 3.3 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 17,
            ))
        });
        let users = Gauge::default();
        let label = |k: &'static str, v: &'static str| vec![(k, v)];
        let kinds = ["private", "group", "broadcast"];
        let hooks = ["message", "login", "upload", "command"];
        let m = Metrics {
            connections: ["chat", "file"]
                .map(|p| connections.get_or_create_owned(&label("port", p))),
            users: users.clone(),
            messages: kinds.map(|k| messages.get_or_create_owned(&label("kind", k))),
            deliveries: kinds.map(|k| deliveries.get_or_create_owned(&label("kind", k))),
            bytes_in: bytes.get_or_create_owned(&label("direction", "in")),
            bytes_out: bytes.get_or_create_owned(&label("direction", "out")),
            drops: ["slow_consumer", "refused"]
                .map(|r| drops.get_or_create_owned(&label("reason", r))),
            inbox_delivered: ["confirmed", "session_went_on"]
                .map(|h| inbox.get_or_create_owned(&label("known_by", h))),
            hook_calls: hooks.map(|k| calls.get_or_create_owned(&label("kind", k))),
            hook_failures: hooks.map(|k| failures.get_or_create_owned(&label("kind", k))),
            hook_latency: hooks.map(|k| latency.get_or_create_owned(&label("kind", k))),
            registry: Registry::default(),
        };
        registry.register("connections", "Open connections, by port", connections);
        registry.register("users", "Users logged in on the chat port", users);
        registry.register("messages", "Messages sent, by kind", messages);
        registry.register(
            "deliveries",
            "Message lines delivered to recipients, by kind",
            deliveries,
        );
        registry.register(
            "file_bytes",
            "File body bytes received from uploaders (in) and sent to recipients (out)",
            bytes,
        );
        registry.register("drops", "Connections dropped, by reason", drops);
        registry.register(
            "inbox_delivered",
            "Queued messages forgotten once delivered: confirmed by our client, or written to a \
             client that cannot confirm and whose session went on",
            inbox,
        );
        registry.register(
            "hook_calls",
            "Questions asked of the Python hooks, by kind",
            calls,
        );
        registry.register(
            "hook_failures",
            "Hook questions that failed or ran out of time, by kind",
            failures,
        );
        registry.register(
            "hook_latency_seconds",
            "How long hook questions took, by kind",
            latency,
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn connection(&self, chat: bool, open: bool) {
        let gauge = &self.connections[usize::from(!chat)];
        match open {
            true => gauge.inc(),
            false => gauge.dec(),
        };
    }

    pub(crate) fn user(&self, in_: bool) {
        match in_ {
            true => self.users.inc(),
            false => self.users.dec(),
        };
    }

    /// One message of `kind`, delivered to `recipients` users.
    pub(crate) fn message(&self, kind: MessageKind, recipients: u64) {
        self.messages[kind_index(kind)].inc();
        self.deliveries[kind_index(kind)].inc_by(recipients);
    }

    pub(crate) fn file_bytes(&self, incoming: bool, n: u64) {
        match incoming {
            true => self.bytes_in.inc_by(n),
            false => self.bytes_out.inc_by(n),
        };
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        self.drops[why as usize].inc();
    }

    /// `n` queued messages forgotten once delivered (`confirmed` by our client, else
    /// written to a lab client whose session went on).
    pub(crate) fn inbox_delivered(&self, confirmed: bool, n: u64) {
        self.inbox_delivered[usize::from(!confirmed)].inc_by(n);
    }

    pub(crate) fn hook(&self, kind: HookKind, took: Duration, failed: bool) {
        let i = kind as usize;
        self.hook_calls[i].inc();
        if failed {
            self.hook_failures[i].inc();
        }
        self.hook_latency[i].observe(took.as_secs_f64());
    }

    /// Every metric in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Every figure as `(name, labels, value)`: what `Server.stats()` returns.
    pub fn figures(&self) -> Vec<Figure> {
        parse_text(&self.encode())
    }
}

/// The samples of a text exposition, without comments: `name{k="v",...} value`.
fn parse_text(text: &str) -> Vec<Figure> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        out.push((name.to_owned(), labels, value));
    }
    out
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until `stop`: the text format,
/// one response per connection.
pub(crate) async fn serve(metrics: Arc<Metrics>, listener: TcpListener, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!("[METRICS] Prometheus text format on http://{addr}/metrics");
    }
    loop {
        let (mut stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("[METRICS] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // The request itself does not matter; read its head (a little, briefly).
            let mut head = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut head)).await;
            let body = metrics.encode();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text_format_and_the_figures() {
        let m = Metrics::new();
        m.message(MessageKind::Broadcast, 5);
        m.message(MessageKind::Private, 1);
        m.connection(true, true);
        m.hook(HookKind::Message, Duration::from_millis(2), true);
        let text = m.encode();
        assert!(
            text.contains("relaychat_messages_total{kind=\"broadcast\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relaychat_deliveries_total{kind=\"broadcast\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("relaychat_connections{port=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("relaychat_hook_failures_total{kind=\"message\"} 1"),
            "{text}"
        );
        let figures = m.figures();
        let private = figures
            .iter()
            .find(|(n, l, _)| n == "relaychat_deliveries_total" && l[0].1 == "private")
            .expect("private deliveries");
        assert_eq!(private.2, 1.0);
    }
}
