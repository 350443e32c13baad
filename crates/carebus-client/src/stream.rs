//! [`PublishStream`]: pipelined publishing over the `messages:stream` WebSocket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::error::Error;
use crate::types::{BatchMessage, Message, Outcome};

/// Frames queued for the socket's writer before `publish` waits.
const QUEUED_FRAMES: usize = 1024;
/// Bytes the WebSocket reads at most per read (see [`PublishStream::connect`]).
const READ_BUFFER_BYTES: usize = 16 * 1024;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Outcome, Error>>>>>;

/// One WebSocket to `GET /v1/topics/{topic}/messages:stream`, shared by any number of
/// concurrent [`publish`](PublishStream::publish) calls: each sends its message as one
/// frame and waits for its own answer, so many messages are in flight on one connection
/// without an HTTP request each. Same guarantees as [`Client::publish`](crate::Client::publish):
/// an `Ok` outcome means stored durably (or a duplicate of a stored copy). If the socket
/// fails, every call waiting on it fails with [`Error::Transport`] (whether those
/// messages were stored is unknown: resend them with the same idempotency keys, on a new
/// stream, to find out). Cheap to clone; the socket closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct PublishStream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    frames: mpsc::Sender<Frame>,
    waiting: Waiting,
    next_id: AtomicU64,
}

#[derive(Serialize)]
struct Request<'a> {
    id: u64,
    message: BatchMessage<'a>,
}

#[derive(Deserialize)]
struct Reply {
    id: Option<u64>,
    result: Option<Outcome>,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct ReplyError {
    status: u16,
    code: String,
    detail: String,
}

impl PublishStream {
    /// Opens the stream (`url` is the `ws://…/messages:stream` address).
    pub(crate) async fn connect(url: String) -> Result<PublishStream, Error> {
        // Answers are small: a 16 KiB read holds hundreds of them, and tungstenite
        // zero-fills the read size before every read (its default is 128 KiB).
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES);
        let (socket, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false)
                .await
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => {
                        let body = response.body().as_deref().unwrap_or_default();
                        crate::problem(response.status(), body)
                    }
                    other => Error::Connect {
                        url: url.clone(),
                        reason: other.to_string(),
                    },
                })?;
        let (mut sink, mut source) = socket.split();
        let (frames, mut queued) = mpsc::channel::<Frame>(QUEUED_FRAMES);
        let waiting: Waiting = Arc::default();
        // Writer: sends what is queued, one flush for everything queued at once.
        let writer_url = url.clone();
        let writer_waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut ok = sink.feed(first).await.is_ok();
                while ok && let Ok(next) = queued.try_recv() {
                    ok = sink.feed(next).await.is_ok();
                }
                // A burst of answers wakes many publishers at once, and their frames
                // arrive one by one: let the tasks already woken run once before
                // writing, so the burst goes out in one write instead of one each
                // (measured at 256 in flight: ~3 frames per write without this).
                if ok {
                    tokio::task::yield_now().await;
                    while ok && let Ok(next) = queued.try_recv() {
                        ok = sink.feed(next).await.is_ok();
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    fail_all(
                        &writer_waiting,
                        &writer_url,
                        "the stream could not be written",
                    );
                    break;
                }
            }
            let _ = sink.close().await;
        });
        // Reader: hands each answer to the call waiting for it.
        let reader_url = url.clone();
        let reader_waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let why = loop {
                match source.next().await {
                    None => break "the server closed the stream",
                    Some(Err(_)) => break "the stream failed",
                    Some(Ok(Frame::Text(text))) => {
                        let Ok(reply) = serde_json::from_str::<Reply>(text.as_str()) else {
                            break "the server sent an unreadable answer";
                        };
                        let Some(id) = reply.id else {
                            // An answer to a frame the server could not read at all:
                            // this client only sends well-formed frames.
                            tracing::warn!(url = %reader_url, "publish stream: answer without id");
                            continue;
                        };
                        let answer = match (reply.result, reply.error) {
                            (Some(outcome), _) => Ok(outcome),
                            (None, Some(e)) => Err(Error::Api {
                                status: e.status,
                                code: e.code,
                                detail: e.detail,
                                refused: Vec::new(),
                            }),
                            (None, None) => Err(Error::Decode {
                                status: 101,
                                reason: "an answer with neither result nor error".into(),
                            }),
                        };
                        let waiter = reader_waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send(answer);
                        }
                    }
                    Some(Ok(Frame::Close(_))) => break "the server closed the stream",
                    Some(Ok(_)) => {}
                }
            };
            fail_all(&reader_waiting, &reader_url, why);
        });
        Ok(PublishStream {
            inner: Arc::new(Inner {
                url,
                frames,
                waiting,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// Publishes one message and waits for its outcome (other calls go on meanwhile).
    /// The message goes as a binary frame (its body byte for byte).
    pub async fn publish(&self, message: &Message) -> Result<Outcome, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::binary(binary_frame(id, message)?);
        self.send_and_wait(id, frame).await
    }

    /// As [`publish`](PublishStream::publish), with the message sent as a JSON text
    /// frame (the body as text if it is UTF-8, else base64): the stream's other
    /// encoding, for servers or proxies that take text frames only.
    pub async fn publish_json(&self, message: &Message) -> Result<Outcome, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let text = serde_json::to_string(&Request {
            id,
            message: message.into(),
        })
        .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.send_and_wait(id, Frame::text(text)).await
    }

    async fn send_and_wait(&self, id: u64, frame: Frame) -> Result<Outcome, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        // Forgotten again if this call is dropped before its answer.
        let _forget = Forget {
            waiting: &self.inner.waiting,
            id,
        };
        if self.inner.frames.send(frame).await.is_err() {
            return Err(self.transport("the stream is closed"));
        }
        match rx.await {
            Ok(answer) => answer,
            Err(_) => Err(self.transport("the stream closed before the answer")),
        }
    }

    fn transport(&self, reason: &str) -> Error {
        Error::Transport {
            url: self.inner.url.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// The binary frame of one message (version 1; layout in the server's
/// `carebus_http::stream` docs): version, id, flags, the flagged keys and content type,
/// the headers, then the body as it is.
fn binary_frame(id: u64, m: &Message) -> Result<Vec<u8>, Error> {
    let too_long = |what: &str| Error::InvalidRequest(format!("the {what} is too long"));
    let fields = [
        m.idempotency_key.as_deref(),
        m.partition_key.as_deref(),
        m.content_type.as_deref(),
    ];
    let heads: usize = m.headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    let mut f = Vec::with_capacity(16 + 3 * 64 + heads + m.body.len());
    f.push(1);
    f.extend_from_slice(&id.to_be_bytes());
    let mut flags = 0u8;
    for (bit, v) in fields.iter().enumerate() {
        if v.is_some() {
            flags |= 1 << bit;
        }
    }
    f.push(flags);
    for (v, what) in fields
        .iter()
        .zip(["idempotency key", "partition key", "content type"])
    {
        if let Some(v) = v {
            let n = u32::try_from(v.len()).map_err(|_| too_long(what))?;
            f.extend_from_slice(&n.to_be_bytes());
            f.extend_from_slice(v.as_bytes());
        }
    }
    let count = u32::try_from(m.headers.len()).map_err(|_| too_long("header list"))?;
    f.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &m.headers {
        let n = u32::try_from(name.len()).map_err(|_| too_long("header name"))?;
        f.extend_from_slice(&n.to_be_bytes());
        f.extend_from_slice(name.as_bytes());
        let n = u32::try_from(value.len()).map_err(|_| too_long("header value"))?;
        f.extend_from_slice(&n.to_be_bytes());
        f.extend_from_slice(value.as_bytes());
    }
    f.extend_from_slice(&m.body);
    Ok(f)
}

struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn fail_all(waiting: &Waiting, url: &str, why: &str) {
    let waiters: Vec<_> = waiting
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .map(|(_, w)| w)
        .collect();
    for w in waiters {
        let _ = w.send(Err(Error::Transport {
            url: url.to_owned(),
            reason: why.to_owned(),
        }));
    }
}
