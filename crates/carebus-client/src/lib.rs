//! An async client for the carebus HTTP API.
//!
//! - [`Client`]: topics and subscriptions admin, publish, reads, receive/ack/nack,
//!   dead letters, traces and transactions, one request per call, no retries.
//! - [`Publisher`]: publishes with retries (exponential backoff with jitter, bounded in
//!   attempts and time) on connection failures, timeouts and 5xx — never on 4xx — with
//!   the idempotency key fixed before the first attempt, so a retry never stores twice.
//! - [`PublishStream`]: many publishes in flight on one WebSocket
//!   (`messages:stream`), each answered once durable.
//! - [`Consumer`]: a receive → handle → ack/nack loop stopped by a cancellation token
//!   or a count.
//!
//! ```no_run
//! # async fn demo() -> Result<(), carebus_client::Error> {
//! use carebus_client::{Client, Message, Publisher, RetryPolicy};
//! let client = Client::new("http://127.0.0.1:7070")?;
//! let publisher = Publisher::new(client.clone(), RetryPolicy::default());
//! let sent = publisher
//!     .publish("hl7.adt", Message::new("MSH|…").idempotency_key("NG|ADT-1"))
//!     .await?;
//! println!("stored at {}/{}", sent.outcome.partition, sent.outcome.offset);
//! # Ok(()) }
//! ```

mod consumer;
mod deliveries;
mod error;
mod retry;
mod stream;
mod types;

use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use consumer::{Consumer, ConsumerOptions, ConsumerStats};
pub use deliveries::decode as decode_binary_deliveries;
pub use error::Error;
pub use retry::{Published, Publisher, RetryPolicy, generate_idempotency_key};
pub use stream::PublishStream;
pub use tokio_util::sync::CancellationToken;
pub use types::{
    CommitResult, DeadLetter, Delivery, Dispatch, Durability, Message, Outcome, ReceiveOptions,
    Refused, Settled, StartPosition, StoredMessage, Subscription, SubscriptionBackoff,
    SubscriptionConfig, SubscriptionStats, SubscriptionTrace, Topic, TopicConfig, Trace,
    TraceEvent,
};

/// The server's default address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Time added to a long poll's `wait_ms` for the request's own timeout.
const POLL_MARGIN: Duration = Duration::from_secs(10);

/// Timeouts of a [`Client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// A whole request (long polls get their `wait_ms` on top).
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

/// A carebus HTTP client. Cheap to clone (connections are pooled and shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    timeouts: Timeouts,
}

/// A transaction begun with [`Client::begin`]: queue publishes and acks, then
/// [`commit`](Transaction::commit) or [`abort`](Transaction::abort).
#[derive(Debug, Clone)]
pub struct Transaction {
    client: Client,
    id: u64,
}

impl Client {
    /// A client of the server at `base_url` (`http://host:port`, optionally with a path
    /// prefix) with the default [`Timeouts`]. Plain HTTP only, as carebus serves it.
    pub fn new(base_url: &str) -> Result<Client, Error> {
        Client::with_timeouts(base_url, Timeouts::default())
    }

    /// A client with explicit timeouts.
    pub fn with_timeouts(base_url: &str, timeouts: Timeouts) -> Result<Client, Error> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if base.scheme() == "https" {
            // carebus serves plain HTTP; TLS (and its aws-lc build) is left out of this
            // client until a deployment needs it.
            return Err(invalid(
                "https is not supported by this client; use http://",
            ));
        }
        if base.scheme() != "http" {
            return Err(invalid("the scheme must be http"));
        }
        if base.cannot_be_a_base() || base.host_str().is_none() {
            return Err(invalid("not a server address"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("no query or fragment allowed"));
        }
        // Keep a path prefix, without its trailing slash, so segments are appended.
        let trimmed = base.path().trim_end_matches('/').to_owned();
        base.set_path(&trimmed);
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .build()
            .map_err(|e| Error::InvalidRequest(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            timeouts,
        })
    }

    /// The base URL as given (without a trailing slash).
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// The URL of `segments` below the base, each percent-encoded as one path segment.
    pub fn url(&self, segments: &[&str]) -> Result<Url, Error> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| Error::InvalidUrl {
                url: self.base.to_string(),
                reason: "not a server address".to_owned(),
            })?;
            path.pop_if_empty();
            for s in segments {
                if s.is_empty() || *s == "." || *s == ".." {
                    return Err(Error::InvalidUrl {
                        url: (*s).to_owned(),
                        reason: "a name must not be empty, `.` or `..`".to_owned(),
                    });
                }
                path.push(s);
            }
        }
        Ok(url)
    }

    // ----- topics -----

    /// `GET /v1/topics`.
    pub async fn list_topics(&self) -> Result<Vec<Topic>, Error> {
        let v: Value = self.get(&["v1", "topics"]).await?;
        field(v, "topics")
    }

    /// `GET /v1/topics/{topic}`.
    pub async fn get_topic(&self, topic: &str) -> Result<Topic, Error> {
        self.get(&["v1", "topics", topic]).await
    }

    /// `PUT /v1/topics/{topic}`: creates the topic or replaces its whole configuration.
    pub async fn put_topic(&self, topic: &str, config: &TopicConfig) -> Result<Topic, Error> {
        self.send_json(Method::PUT, &["v1", "topics", topic], Some(config), None)
            .await
    }

    /// `DELETE /v1/topics/{topic}`: the topic and all its messages.
    pub async fn delete_topic(&self, topic: &str) -> Result<(), Error> {
        self.send_empty(Method::DELETE, &["v1", "topics", topic])
            .await
    }

    // ----- publish and read -----

    /// `POST /v1/topics/{topic}/messages`: one message, one attempt — except that a
    /// message with an idempotency key is sent once more, at once, when the connection
    /// closed before the answer was complete. That is the race every HTTP/1.1 client
    /// meets with a pooled keep-alive connection that the server closes as the request
    /// goes out (carebus closes idle connections at its connection bound, and after the
    /// header timeout); the key makes the second send safe (a duplicate if the first
    /// was stored). For retries with backoff use [`Publisher`].
    pub async fn publish(&self, topic: &str, message: &Message) -> Result<Outcome, Error> {
        self.publish_attempt(topic, message, true).await
    }

    /// One publish; with `resend_on_close`, the one immediate resend of [`Client::publish`].
    pub(crate) async fn publish_attempt(
        &self,
        topic: &str,
        message: &Message,
        resend_on_close: bool,
    ) -> Result<Outcome, Error> {
        let url = self.url(&["v1", "topics", topic, "messages"])?;
        let headers = publish_headers(message)?;
        let request = || {
            self.http
                .post(url.clone())
                .headers(headers.clone())
                .body(message.body.clone())
        };
        let resp = match request().send().await {
            Err(e)
                if resend_on_close
                    && message.idempotency_key.is_some()
                    && closed_before_answer(&e) =>
            {
                request().send().await
            }
            sent => sent,
        };
        let (status, _, bytes) = self.answer(resp).await?;
        decode(status, &bytes)
    }

    /// `POST /v1/topics/{topic}/messages:batch`: all stored or none (one partition).
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: &[Message],
    ) -> Result<Vec<Outcome>, Error> {
        let batch: Vec<types::BatchMessage<'_>> = messages.iter().map(Into::into).collect();
        let v: Value = self
            .send_json(
                Method::POST,
                &["v1", "topics", topic, "messages:batch"],
                Some(&json!({ "messages": batch })),
                None,
            )
            .await?;
        field(v, "results")
    }

    /// Opens `GET /v1/topics/{topic}/messages:stream` (a WebSocket) for pipelined
    /// publishing: see [`PublishStream`]. An unknown topic is refused before the upgrade.
    pub async fn publish_stream(&self, topic: &str) -> Result<PublishStream, Error> {
        let mut url = self.url(&["v1", "topics", topic, "messages:stream"])?;
        url.set_scheme("ws").map_err(|()| Error::InvalidUrl {
            url: self.base_url().to_owned(),
            reason: "cannot take the ws scheme".to_owned(),
        })?;
        PublishStream::connect(url.to_string()).await
    }

    /// `GET /v1/topics/{topic}/messages/{partition}/{offset}`.
    pub async fn read_message(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<StoredMessage, Error> {
        let (p, o) = (partition.to_string(), offset.to_string());
        self.get(&["v1", "topics", topic, "messages", &p, &o]).await
    }

    /// `GET /v1/topics/{topic}/messages?idempotency_key=…`: the first stored copy.
    pub async fn find_message(
        &self,
        topic: &str,
        idempotency_key: &str,
    ) -> Result<StoredMessage, Error> {
        let mut url = self.url(&["v1", "topics", topic, "messages"])?;
        url.query_pairs_mut()
            .append_pair("idempotency_key", idempotency_key);
        self.execute(self.http.get(url)).await
    }

    // ----- subscriptions -----

    /// `GET /v1/topics/{topic}/subscriptions`.
    pub async fn list_subscriptions(&self, topic: &str) -> Result<Vec<Subscription>, Error> {
        let v: Value = self.get(&["v1", "topics", topic, "subscriptions"]).await?;
        field(v, "subscriptions")
    }

    /// `GET /v1/topics/{topic}/subscriptions/{sub}`.
    pub async fn get_subscription(&self, topic: &str, sub: &str) -> Result<Subscription, Error> {
        self.get(&["v1", "topics", topic, "subscriptions", sub])
            .await
    }

    /// `PUT /v1/topics/{topic}/subscriptions/{sub}`: creates it, or replaces its settings
    /// (keeping its position).
    pub async fn put_subscription(
        &self,
        topic: &str,
        sub: &str,
        config: &SubscriptionConfig,
    ) -> Result<Subscription, Error> {
        self.send_json(
            Method::PUT,
            &["v1", "topics", topic, "subscriptions", sub],
            Some(config),
            None,
        )
        .await
    }

    /// `DELETE /v1/topics/{topic}/subscriptions/{sub}` (not the messages).
    pub async fn delete_subscription(&self, topic: &str, sub: &str) -> Result<(), Error> {
        self.send_empty(
            Method::DELETE,
            &["v1", "topics", topic, "subscriptions", sub],
        )
        .await
    }

    /// `POST …/{sub}/receive`: long poll for deliveries.
    pub async fn receive(
        &self,
        topic: &str,
        sub: &str,
        options: &ReceiveOptions,
    ) -> Result<Vec<Delivery>, Error> {
        /// The JSON answer, decoded in one pass (no `Value` tree of up to 1000 bodies).
        #[derive(serde::Deserialize)]
        struct Answer {
            deliveries: Vec<Delivery>,
        }
        let wait = Duration::from_millis(options.wait_ms.unwrap_or(0));
        let url = self.url(&["v1", "topics", topic, "subscriptions", sub, "receive"])?;
        // The binary answer carries the bodies as they are; a server that does not
        // know it answers JSON, which is read as well.
        let req = self
            .http
            .post(url)
            .header(ACCEPT, deliveries::MEDIA_TYPE)
            .json(options)
            .timeout(self.timeouts.request.max(wait + POLL_MARGIN));
        let (status, media_type, bytes) = self.exchange_typed(req).await?;
        let binary = media_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(deliveries::MEDIA_TYPE));
        let decode_error = |reason: String| Error::Decode {
            status: status.as_u16(),
            reason,
        };
        if binary {
            return deliveries::decode(&bytes).map_err(decode_error);
        }
        serde_json::from_slice::<Answer>(&bytes)
            .map(|a| a.deliveries)
            .map_err(|e| decode_error(e.to_string()))
    }

    /// `POST …/{sub}/ack` by delivery ids. Ids the server refuses are listed in the
    /// answer; when it refuses all of them (409 `stale_delivery`) this is still `Ok`,
    /// with `count` 0.
    pub async fn ack(
        &self,
        topic: &str,
        sub: &str,
        delivery_ids: &[u64],
    ) -> Result<Settled, Error> {
        let body = json!({ "delivery_ids": delivery_ids });
        self.settle(
            &["v1", "topics", topic, "subscriptions", sub, "ack"],
            &body,
            "acked",
        )
        .await
    }

    /// `POST …/{sub}/ack` cumulatively: every message of `partition` up to and including
    /// `offset`.
    pub async fn ack_through(
        &self,
        topic: &str,
        sub: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), Error> {
        let _: Value = self
            .send_json(
                Method::POST,
                &["v1", "topics", topic, "subscriptions", sub, "ack"],
                Some(&json!({ "partition": partition, "offset": offset })),
                None,
            )
            .await?;
        Ok(())
    }

    /// `POST …/{sub}/nack`: deliver again after the backoff (or `delay_ms`, whichever is
    /// longer), or dead-letter once out of attempts. Do not put patient data in `reason`.
    /// All refused is `Ok` with `count` 0, as for [`Client::ack`].
    pub async fn nack(
        &self,
        topic: &str,
        sub: &str,
        delivery_ids: &[u64],
        reason: Option<&str>,
        delay_ms: Option<u64>,
    ) -> Result<Settled, Error> {
        let mut body = json!({ "delivery_ids": delivery_ids });
        if let Some(r) = reason {
            body["reason"] = json!(r);
        }
        if let Some(d) = delay_ms {
            body["delay_ms"] = json!(d);
        }
        self.settle(
            &["v1", "topics", topic, "subscriptions", sub, "nack"],
            &body,
            "nacked",
        )
        .await
    }

    /// `GET …/{sub}/dead-letters`.
    pub async fn dead_letters(&self, topic: &str, sub: &str) -> Result<Vec<DeadLetter>, Error> {
        let v: Value = self
            .get(&["v1", "topics", topic, "subscriptions", sub, "dead-letters"])
            .await?;
        field(v, "dead_letters")
    }

    /// `POST …/{sub}/dead-letters/{id}/replay`: delivered again, attempts reset.
    pub async fn replay_dead_letter(&self, topic: &str, sub: &str, id: u64) -> Result<(), Error> {
        let id = id.to_string();
        self.send_empty(
            Method::POST,
            &[
                "v1",
                "topics",
                topic,
                "subscriptions",
                sub,
                "dead-letters",
                &id,
                "replay",
            ],
        )
        .await
    }

    /// `DELETE …/{sub}/dead-letters/{id}`: discarded for good.
    pub async fn discard_dead_letter(&self, topic: &str, sub: &str, id: u64) -> Result<(), Error> {
        let id = id.to_string();
        self.send_empty(
            Method::DELETE,
            &[
                "v1",
                "topics",
                topic,
                "subscriptions",
                sub,
                "dead-letters",
                &id,
            ],
        )
        .await
    }

    // ----- traces -----

    /// `GET /v1/topics/{topic}/messages/{partition}/{offset}/trace`.
    pub async fn trace(&self, topic: &str, partition: u32, offset: u64) -> Result<Trace, Error> {
        let (p, o) = (partition.to_string(), offset.to_string());
        self.get(&["v1", "topics", topic, "messages", &p, &o, "trace"])
            .await
    }

    /// `GET /v1/topics/{topic}/trace?idempotency_key=…`.
    pub async fn trace_by_key(&self, topic: &str, idempotency_key: &str) -> Result<Trace, Error> {
        let mut url = self.url(&["v1", "topics", topic, "trace"])?;
        url.query_pairs_mut()
            .append_pair("idempotency_key", idempotency_key);
        self.execute(self.http.get(url)).await
    }

    // ----- transactions -----

    /// `POST /v1/transactions`: begins a transaction (`timeout_ms` default 60000).
    pub async fn begin(&self, timeout_ms: Option<u64>) -> Result<Transaction, Error> {
        let body = match timeout_ms {
            Some(t) => json!({ "timeout_ms": t }),
            None => json!({}),
        };
        let v: Value = self
            .send_json(Method::POST, &["v1", "transactions"], Some(&body), None)
            .await?;
        let id = v
            .get("transaction_id_str")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .or_else(|| v.get("transaction_id").and_then(Value::as_u64))
            .ok_or_else(|| Error::Decode {
                status: 201,
                reason: "no transaction_id in the answer".to_owned(),
            })?;
        Ok(Transaction {
            client: self.clone(),
            id,
        })
    }

    /// A handle on an already begun transaction.
    pub fn transaction(&self, id: u64) -> Transaction {
        Transaction {
            client: self.clone(),
            id,
        }
    }

    // ----- plumbing -----

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, Error> {
        let url = self.url(segments)?;
        self.execute(self.http.get(url)).await
    }

    async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<T, Error> {
        let url = self.url(segments)?;
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        self.execute(req).await
    }

    async fn send_empty(&self, method: Method, segments: &[&str]) -> Result<(), Error> {
        let url = self.url(segments)?;
        self.exchange(self.http.request(method, url)).await?;
        Ok(())
    }

    async fn settle(&self, segments: &[&str], body: &Value, verb: &str) -> Result<Settled, Error> {
        match self
            .send_json::<_, Value>(Method::POST, segments, Some(body), None)
            .await
        {
            Ok(v) => types::settled_from(&v, verb).ok_or_else(|| Error::Decode {
                status: 200,
                reason: format!("no `{verb}` count in the answer"),
            }),
            Err(Error::Api {
                status: 409,
                code,
                refused,
                ..
            }) if code == "stale_delivery" => Ok(Settled { count: 0, refused }),
            Err(e) => Err(e),
        }
    }

    async fn execute<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, Error> {
        let (status, bytes) = self.exchange(req).await?;
        decode(status, &bytes)
    }

    /// Sends the request; a success status gives its body, anything else an error.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, bytes::Bytes), Error> {
        let (status, _, bytes) = self.exchange_typed(req).await?;
        Ok((status, bytes))
    }

    /// As [`Client::exchange`], also giving the answer's `Content-Type`.
    async fn exchange_typed(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Option<HeaderValue>, bytes::Bytes), Error> {
        self.answer(req.send().await).await
    }

    /// The answer to a sent request: its status, `Content-Type` and body on success.
    async fn answer(
        &self,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<(StatusCode, Option<HeaderValue>, bytes::Bytes), Error> {
        let resp = sent.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let media_type = resp.headers().get(CONTENT_TYPE).cloned();
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            Ok((status, media_type, bytes))
        } else {
            Err(problem(status, &bytes))
        }
    }

    fn transport(&self, e: &reqwest::Error) -> Error {
        let url = self.base_url().to_owned();
        if e.is_timeout() {
            Error::Timeout { url }
        } else if e.is_connect() {
            Error::Connect {
                url,
                reason: error_chain(e),
            }
        } else if e.is_builder() {
            Error::InvalidRequest(error_chain(e))
        } else {
            Error::Transport {
                url,
                reason: error_chain(e),
            }
        }
    }
}

impl Transaction {
    /// The transaction's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `POST /v1/transactions/{id}/publish`: queued, invisible until commit. Messages
    /// without an idempotency key get one from the server, derived from the transaction.
    pub async fn publish(&self, topic: &str, messages: &[Message]) -> Result<u64, Error> {
        let batch: Vec<types::BatchMessage<'_>> = messages.iter().map(Into::into).collect();
        let v: Value = self
            .post(
                "publish",
                Some(&json!({ "topic": topic, "messages": batch })),
            )
            .await?;
        field(v, "queued")
    }

    /// `POST /v1/transactions/{id}/ack`: acks taking effect at commit (commit before
    /// their leases run out). All refused is `Ok` with `count` 0.
    pub async fn ack(
        &self,
        topic: &str,
        subscription: &str,
        delivery_ids: &[u64],
    ) -> Result<Settled, Error> {
        let id = self.id.to_string();
        self.client
            .settle(
                &["v1", "transactions", &id, "ack"],
                &json!({ "topic": topic, "subscription": subscription, "delivery_ids": delivery_ids }),
                "accepted",
            )
            .await
    }

    /// `POST /v1/transactions/{id}/commit`: all or nothing.
    pub async fn commit(self) -> Result<Vec<CommitResult>, Error> {
        let v: Value = self.post("commit", None).await?;
        field(v, "results")
    }

    /// `POST /v1/transactions/{id}/abort`: nothing takes effect.
    pub async fn abort(self) -> Result<(), Error> {
        let id = self.id.to_string();
        self.client
            .send_empty(Method::POST, &["v1", "transactions", &id, "abort"])
            .await
    }

    async fn post(&self, verb: &str, body: Option<&Value>) -> Result<Value, Error> {
        let id = self.id.to_string();
        self.client
            .send_json(Method::POST, &["v1", "transactions", &id, verb], body, None)
            .await
    }
}

/// A successful answer's JSON body as `T`.
fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Decode {
        status: status.as_u16(),
        reason: e.to_string(),
    })
}

/// Whether the connection was closed or reset under the request before its answer was
/// complete (hyper's "connection closed before message completed", or a reset or
/// broken pipe: the request reached a socket the server had just closed).
fn closed_before_answer(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || err.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            })
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The headers of a single publish.
fn publish_headers(m: &Message) -> Result<HeaderMap, Error> {
    let value = |what: &str, v: &str| {
        HeaderValue::from_str(v).map_err(|_| {
            Error::InvalidRequest(format!(
                "{what} must be visible ASCII for a single publish (use a batch for other text)"
            ))
        })
    };
    let mut headers = HeaderMap::new();
    if let Some(ct) = &m.content_type {
        headers.insert(CONTENT_TYPE, value("the content type", ct)?);
    }
    if let Some(k) = &m.idempotency_key {
        headers.insert("idempotency-key", value("the idempotency key", k)?);
    }
    if let Some(k) = &m.partition_key {
        headers.insert("partition-key", value("the partition key", k)?);
    }
    for (name, v) in &m.headers {
        let name = HeaderName::try_from(format!("x-carebus-header-{name}")).map_err(|_| {
            Error::InvalidRequest(format!("header name {name:?} is not a valid HTTP token"))
        })?;
        headers.append(name, value("a header value", v)?);
    }
    Ok(headers)
}

/// An error from a non-success answer: its problem document, or the bare status.
fn problem(status: StatusCode, body: &[u8]) -> Error {
    let doc: Option<Value> = serde_json::from_slice(body).ok();
    let text = |k: &str| {
        doc.as_ref()
            .and_then(|d| d.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let code = text("code").unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let detail = text("detail")
        .or_else(|| text("title"))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let refused = doc.as_ref().map(types::refused_from).unwrap_or_default();
    Error::Api {
        status: status.as_u16(),
        code,
        detail,
        refused,
    }
}

/// Takes `key` of a JSON object as `T`.
fn field<T: DeserializeOwned>(mut v: Value, key: &str) -> Result<T, Error> {
    let inner = v
        .get_mut(key)
        .map(Value::take)
        .ok_or_else(|| Error::Decode {
            status: 200,
            reason: format!("no `{key}` in the answer"),
        })?;
    serde_json::from_value(inner).map_err(|e| Error::Decode {
        status: 200,
        reason: e.to_string(),
    })
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn urls_keep_a_prefix_and_encode_each_segment() {
        let c = Client::new("http://127.0.0.1:7070/").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:7070");
        assert_eq!(
            c.url(&["v1", "topics", "hl7.adt", "messages:batch"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:7070/v1/topics/hl7.adt/messages:batch"
        );
        // A name can never leave its path segment.
        assert_eq!(
            c.url(&["v1", "topics", "a/b?c#d"]).unwrap().as_str(),
            "http://127.0.0.1:7070/v1/topics/a%2Fb%3Fc%23d"
        );
        assert!(c.url(&["v1", "topics", ".."]).is_err());
        assert!(c.url(&["v1", "topics", ""]).is_err());
        let c = Client::new("http://broker.example/carebus/").unwrap();
        assert_eq!(
            c.url(&["v1", "topics"]).unwrap().as_str(),
            "http://broker.example/carebus/v1/topics"
        );
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in [
            "127.0.0.1:7070",
            "ftp://x",
            "http://x/?q=1",
            "not a url",
            "mailto:a@b",
            "https://broker.example",
        ] {
            assert!(
                matches!(Client::new(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn publish_headers_map_message_fields() {
        let m = Message::new("x")
            .idempotency_key("NG|1")
            .partition_key("MRN1")
            .content_type("text/plain")
            .header("origin", "lis");
        let h = publish_headers(&m).unwrap();
        assert_eq!(h["idempotency-key"], "NG|1");
        assert_eq!(h["partition-key"], "MRN1");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-carebus-header-origin"], "lis");
        let bad = Message::new("x").header("bad name", "v");
        assert!(matches!(
            publish_headers(&bad),
            Err(Error::InvalidRequest(_))
        ));
        let bad = Message::new("x").idempotency_key("line\nbreak");
        assert!(matches!(
            publish_headers(&bad),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn problems_carry_their_code() {
        let e = problem(
            StatusCode::NOT_FOUND,
            br#"{"type":"urn:carebus:problem:unknown_topic","title":"Not Found","status":404,"detail":"topic x does not exist","code":"unknown_topic"}"#,
        );
        assert_eq!(e.code(), Some("unknown_topic"));
        assert!(e.is_not_found());
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "404 unknown_topic: topic x does not exist");
        let e = problem(StatusCode::BAD_GATEWAY, b"<html>proxy</html>");
        assert_eq!(e.code(), Some("http_502"));
        assert!(e.is_retryable());
        let e = problem(
            StatusCode::CONFLICT,
            br#"{"code":"stale_delivery","refused":[{"delivery_id":5,"delivery_id_str":"5","code":"lease_expired"}]}"#,
        );
        let Error::Api { refused, .. } = e else {
            panic!("api error")
        };
        assert_eq!(refused[0].delivery_id, 5);
    }
}
