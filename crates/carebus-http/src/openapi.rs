//! The OpenAPI 3.1 description served at `GET /openapi.json` (hand-written).

use serde_json::{Value, json};

fn problem_responses(codes: &[(&str, &str)]) -> Value {
    let mut map = serde_json::Map::new();
    for (status, description) in codes {
        map.insert(
            (*status).to_owned(),
            json!({
                "description": description,
                "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } }
            }),
        );
    }
    Value::Object(map)
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn json_body(schema: &str) -> Value {
    json!({ "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } })
}

/// The OpenAPI 3.1 document of every endpoint this crate serves.
pub fn openapi() -> Value {
    let topic_param = json!({
        "name": "topic", "in": "path", "required": true,
        "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$" }
    });
    let common = problem_responses(&[
        (
            "400",
            "invalid_name, invalid_path, malformed_json, invalid_json, invalid_header, …",
        ),
        ("404", "unknown_topic, not_found"),
        ("503", "not_ready: the broker is still recovering"),
    ]);
    let publish_errors = problem_responses(&[
        ("408", "body_timeout: the request body paused too long"),
        ("413", "body_too_large, message_too_large"),
        (
            "415",
            "unsupported_media_type (batch: needs application/json)",
        ),
        ("507", "storage_full: nothing was stored"),
    ]);
    let outcome_props = json!({
        "partition": { "type": "integer", "minimum": 0 },
        "offset": { "type": "integer", "minimum": 0 },
        "duplicate": { "type": "boolean" },
        "conflict": { "type": "boolean" },
        "durability": { "type": "string", "enum": ["fsynced", "buffered"] }
    });
    let text_health = json!({ "text/plain": { "schema": { "type": "string" } } });
    let sub_param = json!({
        "name": "subscription", "in": "path", "required": true,
        "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,200}$" }
    });
    let txn_param = json!({
        "name": "transaction", "in": "path", "required": true,
        "schema": { "type": "integer", "minimum": 1 }, "description": "transaction id (decimal)"
    });
    let sub_errors = merge(
        common.clone(),
        problem_responses(&[("404", "unknown_topic, unknown_subscription")]),
    );
    let settle_errors = merge(
        sub_errors.clone(),
        problem_responses(&[
            (
                "400",
                "invalid_delivery_id, invalid_json, malformed_json, …",
            ),
            (
                "409",
                "stale_delivery: every id was refused (the problem lists them in `refused`)",
            ),
            ("415", "unsupported_media_type"),
        ]),
    );
    let txn_errors = merge(
        common.clone(),
        problem_responses(&[
            (
                "404",
                "unknown_transaction (never begun, committed, aborted, or expired and already reported), unknown_topic, unknown_subscription",
            ),
            (
                "409",
                "transaction_aborted: the commit failed, nothing of it took effect",
            ),
            (
                "410",
                "transaction_expired: its timeout passed; it was aborted",
            ),
        ]),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "carebus HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Topics, exactly-once publish, subscriptions (long-poll receive, ack/nack, dead letters), message traces, transactions and metrics. Errors are RFC 9457 problem documents (application/problem+json) with a stable `code`."
        },
        "paths": {
            "/healthz": { "get": {
                "summary": "Liveness: 200 while the process runs",
                "responses": { "200": { "description": "alive", "content": text_health } }
            }},
            "/readyz": { "get": {
                "summary": "Readiness: 503 while the store recovers, then 200",
                "responses": {
                    "200": { "description": "ready", "content": text_health },
                    "503": { "description": "recovering", "content": text_health }
                }
            }},
            "/openapi.json": { "get": {
                "summary": "This document",
                "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": {} } } }
            }},
            "/v1/topics": { "get": {
                "summary": "List topics",
                "responses": merge(json!({
                    "200": { "description": "all topics", "content": json_body("TopicList") }
                }), problem_responses(&[("503", "not_ready")]))
            }},
            "/v1/topics/{topic}": {
                "parameters": [topic_param.clone()],
                "get": {
                    "summary": "One topic",
                    "responses": merge(json!({
                        "200": { "description": "the topic", "content": json_body("Topic") }
                    }), common.clone())
                },
                "put": {
                    "summary": "Create a topic or update its configuration (partitions can only grow). An empty body without Content-Type means all defaults.",
                    "requestBody": { "required": false, "content": json_body("TopicConfig") },
                    "responses": merge(merge(json!({
                        "200": { "description": "updated", "content": json_body("Topic") },
                        "201": { "description": "created", "content": json_body("Topic") }
                    }), common.clone()), problem_responses(&[
                        ("409", "partitions_cannot_shrink"),
                        ("413", "body_too_large"),
                        ("415", "unsupported_media_type"),
                        ("507", "storage_full")
                    ]))
                },
                "delete": {
                    "summary": "Delete a topic and all its messages",
                    "responses": merge(json!({ "204": { "description": "deleted" } }), common.clone())
                }
            },
            "/v1/topics/{topic}/messages": {
                "parameters": [topic_param.clone()],
                "post": {
                    "summary": "Publish one message: the body is the payload, stored byte for byte",
                    "parameters": [
                        { "name": "Content-Type", "in": "header", "schema": { "type": "string" }, "description": "stored as the message's content type" },
                        { "name": "Idempotency-Key", "in": "header", "schema": { "type": "string", "minLength": 1 }, "description": "a resend with the same key within the deduplication window is not stored again" },
                        { "name": "Partition-Key", "in": "header", "schema": { "type": "string", "minLength": 1 }, "description": "messages with the same key land in the same partition, in order" },
                        { "name": "X-Carebus-Header-{Name}", "in": "header", "schema": { "type": "string" }, "description": "each becomes a message header named {name} (lower case)" }
                    ],
                    "requestBody": { "required": true, "content": { "*/*": { "schema": { "type": "string", "format": "binary" } } } },
                    "responses": merge(merge(json!({
                        "201": { "description": "stored", "content": json_body("PublishOutcome") },
                        "200": { "description": "duplicate of an earlier message (conflict: true if the body differs; the first copy is kept)", "content": json_body("PublishOutcome") }
                    }), common.clone()), publish_errors.clone())
                },
                "get": {
                    "summary": "Find the first stored copy of a message by its idempotency key",
                    "parameters": [
                        { "name": "idempotency_key", "in": "query", "required": true, "schema": { "type": "string", "minLength": 1 } }
                    ],
                    "responses": merge(json!({
                        "200": { "description": "the first copy", "content": json_body("Message") }
                    }), common.clone())
                }
            },
            "/v1/topics/{topic}/messages:batch": {
                "parameters": [topic_param.clone()],
                "post": {
                    "summary": "Publish a batch atomically (all stored or none); its messages must map to one partition",
                    "requestBody": { "required": true, "content": json_body("Batch") },
                    "responses": merge(merge(json!({
                        "201": { "description": "at least one message stored", "content": json_body("BatchResults") },
                        "200": { "description": "every message was a duplicate", "content": json_body("BatchResults") }
                    }), common.clone()), publish_errors.clone())
                }
            },
            "/v1/topics/{topic}/messages:stream": {
                "parameters": [topic_param.clone()],
                "get": {
                    "summary": "Upgrade to a WebSocket for pipelined publishing: send text frames {\"id\": <unsigned integer>, \"message\": <a messages:batch element>}, or binary frames (version byte 1, u64 id, flags, the flagged keys and content type, headers, then the raw body; layout in the carebus-http README), without waiting; each is answered once durable (or found duplicate) with {\"id\", \"result\": <publish outcome>} or {\"id\", \"error\": {\"status\", \"code\", \"detail\"}}, in completion order; up to 1024 (and 64 MiB) in flight per socket; closed after 120 s without a frame",
                    "responses": merge(json!({
                        "101": { "description": "switched to the WebSocket protocol" }
                    }), merge(common.clone(), problem_responses(&[("404", "unknown_topic")])))
                }
            },
            "/v1/topics/{topic}/messages/{partition}/{offset}/trace": {
                "parameters": [
                    topic_param.clone(),
                    { "name": "partition", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 0 } },
                    { "name": "offset", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 0 } }
                ],
                "get": {
                    "summary": "The life of one stored message: when it was stored, and in every subscription each delivery attempt and its current state",
                    "responses": merge(json!({
                        "200": { "description": "the trace", "content": json_body("MessageTrace") }
                    }), merge(common.clone(), problem_responses(&[("404", "unknown_topic, unknown_partition, offset_out_of_range, not_found")])))
                }
            },
            "/v1/topics/{topic}/trace": {
                "parameters": [topic_param.clone()],
                "get": {
                    "summary": "The trace of the message stored under an idempotency key (within the deduplication window)",
                    "parameters": [
                        { "name": "idempotency_key", "in": "query", "required": true, "schema": { "type": "string", "minLength": 1 } }
                    ],
                    "responses": merge(json!({
                        "200": { "description": "the trace", "content": json_body("MessageTrace") }
                    }), common.clone())
                }
            },
            "/v1/topics/{topic}/subscriptions": {
                "parameters": [topic_param.clone()],
                "get": {
                    "summary": "The topic's subscriptions (sorted by name)",
                    "responses": merge(json!({
                        "200": { "description": "the subscriptions", "content": json_body("SubscriptionList") }
                    }), common.clone())
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}": {
                "parameters": [topic_param.clone(), sub_param.clone()],
                "get": {
                    "summary": "One subscription: settings and counters",
                    "responses": merge(json!({
                        "200": { "description": "the subscription", "content": json_body("Subscription") }
                    }), sub_errors.clone())
                },
                "put": {
                    "summary": "Create a subscription or replace its settings (its position is kept). An empty body without Content-Type means all defaults.",
                    "requestBody": { "required": false, "content": json_body("SubscriptionConfig") },
                    "responses": merge(merge(json!({
                        "200": { "description": "updated", "content": json_body("Subscription") },
                        "201": { "description": "created", "content": json_body("Subscription") }
                    }), common.clone()), problem_responses(&[
                        ("400", "invalid_subscription (setting out of range), invalid_name, invalid_json, …"),
                        ("413", "body_too_large"),
                        ("415", "unsupported_media_type"),
                        ("507", "storage_full")
                    ]))
                },
                "delete": {
                    "summary": "Delete a subscription and its state (the topic's messages stay)",
                    "responses": merge(json!({ "204": { "description": "deleted" } }), sub_errors.clone())
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/receive": {
                "parameters": [topic_param.clone(), sub_param.clone()],
                "post": {
                    "summary": "Long-poll for deliveries: answers as soon as at least one is available, or after wait_ms with none. An empty body without Content-Type means all defaults.",
                    "requestBody": { "required": false, "content": json_body("ReceiveRequest") },
                    "responses": merge(json!({
                        "200": { "description": "deliveries (possibly none); with Accept: application/vnd.carebus.deliveries the binary form of the same answer (layout in the carebus-http README)", "content": merge(json_body("Deliveries"), json!({
                            "application/vnd.carebus.deliveries": { "schema": { "type": "string", "contentMediaType": "application/vnd.carebus.deliveries" } }
                        })) }
                    }), merge(sub_errors.clone(), problem_responses(&[
                        ("400", "invalid_consumer, invalid_json, malformed_json"),
                        ("415", "unsupported_media_type")
                    ])))
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/ack": {
                "parameters": [topic_param.clone(), sub_param.clone()],
                "post": {
                    "summary": "Acknowledge deliveries by id ({\"delivery_ids\": [...]}), or cumulatively every message of a partition up to and including an offset ({\"partition\": P, \"offset\": O})",
                    "requestBody": { "required": true, "content": json_body("AckRequest") },
                    "responses": merge(json!({
                        "200": { "description": "acknowledged (durably); partial refusals are listed", "content": { "application/json": { "schema": { "oneOf": [
                            { "$ref": "#/components/schemas/AckResult" },
                            { "$ref": "#/components/schemas/CumulativeAckResult" }
                        ] } } } }
                    }), merge(settle_errors.clone(), problem_responses(&[
                        ("404", "unknown_topic, unknown_subscription, unknown_partition (cumulative)"),
                        ("409", "stale_delivery (every id refused); offset_beyond_end (cumulative ack past the partition's end)")
                    ])))
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/nack": {
                "parameters": [topic_param.clone(), sub_param.clone()],
                "post": {
                    "summary": "Negative acknowledgement: delivered again after the backoff (or delay_ms if longer), dead-lettered once out of attempts",
                    "requestBody": { "required": true, "content": json_body("NackRequest") },
                    "responses": merge(json!({
                        "200": { "description": "nacked; partial refusals are listed", "content": json_body("NackResult") }
                    }), settle_errors.clone())
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters": {
                "parameters": [topic_param.clone(), sub_param.clone()],
                "get": {
                    "summary": "The subscription's dead letters",
                    "responses": merge(json!({
                        "200": { "description": "dead letters", "content": json_body("DeadLetterList") }
                    }), sub_errors.clone())
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters/{id}": {
                "parameters": [topic_param.clone(), sub_param.clone(),
                    { "name": "id", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 1 } }],
                "delete": {
                    "summary": "Discard a dead letter for good",
                    "responses": merge(json!({ "204": { "description": "discarded" } }),
                        merge(sub_errors.clone(), problem_responses(&[("404", "unknown_dead_letter, unknown_subscription, unknown_topic")])))
                }
            },
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters/{id}/replay": {
                "parameters": [topic_param.clone(), sub_param.clone(),
                    { "name": "id", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 1 } }],
                "post": {
                    "summary": "Send a dead letter back to its subscription (attempts reset)",
                    "responses": merge(json!({ "204": { "description": "replayed" } }),
                        merge(sub_errors.clone(), problem_responses(&[("404", "unknown_dead_letter, unknown_subscription, unknown_topic")])))
                }
            },
            "/v1/transactions": {
                "post": {
                    "summary": "Begin a transaction (publishes and acks that take effect together at commit, or not at all). An empty body without Content-Type means the default timeout (60 s).",
                    "requestBody": { "required": false, "content": json_body("BeginTransaction") },
                    "responses": merge(json!({
                        "201": { "description": "begun", "content": json_body("Transaction") }
                    }), merge(common.clone(), problem_responses(&[
                        ("429", "too_many_transactions"),
                        ("415", "unsupported_media_type")
                    ])))
                }
            },
            "/v1/transactions/{transaction}/publish": {
                "parameters": [txn_param.clone()],
                "post": {
                    "summary": "Add messages to publish at commit (invisible until then)",
                    "requestBody": { "required": true, "content": json_body("TransactionPublish") },
                    "responses": merge(json!({
                        "200": { "description": "queued", "content": { "application/json": { "schema": {
                            "type": "object", "required": ["queued"], "properties": { "queued": { "type": "integer" } } } } } }
                    }), merge(txn_errors.clone(), publish_errors.clone()))
                }
            },
            "/v1/transactions/{transaction}/ack": {
                "parameters": [txn_param.clone()],
                "post": {
                    "summary": "Add deliveries to acknowledge at commit; ids not in flight now are refused and not added",
                    "requestBody": { "required": true, "content": json_body("TransactionAck") },
                    "responses": merge(json!({
                        "200": { "description": "accepted; partial refusals are listed", "content": json_body("TransactionAckResult") }
                    }), merge(txn_errors.clone(), problem_responses(&[
                        ("409", "stale_delivery (every id refused), transaction_aborted")
                    ])))
                }
            },
            "/v1/transactions/{transaction}/commit": {
                "parameters": [txn_param.clone()],
                "post": {
                    "summary": "Commit: every publish and ack takes effect, or none does",
                    "responses": merge(json!({
                        "200": { "description": "committed", "content": json_body("CommitResults") }
                    }), txn_errors.clone())
                }
            },
            "/v1/transactions/{transaction}/abort": {
                "parameters": [txn_param],
                "post": {
                    "summary": "Abort: nothing takes effect; the deliveries it would have acknowledged are delivered again",
                    "responses": merge(json!({ "204": { "description": "aborted" } }), txn_errors)
                }
            },
            "/metrics": { "get": {
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "responses": { "200": { "description": "metrics", "content": { "text/plain": { "schema": { "type": "string" } } } } }
            }},
            "/v1/topics/{topic}/messages/{partition}/{offset}": {
                "parameters": [
                    topic_param.clone(),
                    { "name": "partition", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 0 } },
                    { "name": "offset", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 0 } }
                ],
                "get": {
                    "summary": "Read one stored message",
                    "responses": merge(json!({
                        "200": { "description": "the message", "content": json_body("Message") }
                    }), merge(common.clone(), problem_responses(&[("404", "unknown_topic, unknown_partition, offset_out_of_range, not_found")])))
                }
            }
        },
        "components": { "schemas": {
            "TopicConfig": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "partitions": { "type": "integer", "minimum": 1, "maximum": 1024, "default": 1 },
                    "retention_ms": { "type": ["integer", "null"], "minimum": 1 },
                    "retention_bytes": { "type": ["integer", "null"], "minimum": 1 },
                    "dedup_window_ms": { "type": ["integer", "null"], "minimum": 1 }
                }
            },
            "Topic": {
                "type": "object",
                "required": ["name", "partitions", "config", "end_offsets", "start_offsets", "published", "duplicates", "conflicts", "subscriptions"],
                "properties": {
                    "subscriptions": { "type": "array", "items": { "$ref": "#/components/schemas/Subscription" } },
                    "name": { "type": "string" },
                    "partitions": { "type": "integer" },
                    "config": { "$ref": "#/components/schemas/TopicConfig" },
                    "end_offsets": { "type": "array", "items": { "type": "integer" }, "description": "next offset per partition" },
                    "start_offsets": { "type": "array", "items": { "type": "integer" }, "description": "first retained offset per partition" },
                    "published": { "type": "integer", "description": "messages stored since the broker started" },
                    "duplicates": { "type": "integer" },
                    "conflicts": { "type": "integer" }
                }
            },
            "TopicList": {
                "type": "object", "required": ["topics"],
                "properties": { "topics": { "type": "array", "items": { "$ref": "#/components/schemas/Topic" } } }
            },
            "PublishOutcome": {
                "type": "object",
                "required": ["partition", "offset", "duplicate", "conflict", "durability"],
                "properties": outcome_props.clone()
            },
            "BatchMessage": {
                "type": "object", "additionalProperties": false,
                "description": "exactly one of body (UTF-8 text) and body_base64",
                "properties": {
                    "body": { "type": "string" },
                    "body_base64": { "type": "string", "contentEncoding": "base64" },
                    "content_type": { "type": "string" },
                    "idempotency_key": { "type": "string", "minLength": 1 },
                    "partition_key": { "type": "string", "minLength": 1 },
                    "headers": { "type": "object", "additionalProperties": { "type": "string" } }
                }
            },
            "Batch": {
                "type": "object", "additionalProperties": false, "required": ["messages"],
                "properties": { "messages": { "type": "array", "minItems": 1, "items": { "$ref": "#/components/schemas/BatchMessage" } } }
            },
            "BatchResults": {
                "type": "object", "required": ["results"],
                "properties": { "results": { "type": "array", "items": { "$ref": "#/components/schemas/PublishOutcome" } } }
            },
            "Message": {
                "type": "object",
                "required": ["partition", "offset", "timestamp_ms", "partition_key", "idempotency_key", "content_type", "headers", "body_base64"],
                "properties": {
                    "partition": { "type": "integer" },
                    "offset": { "type": "integer" },
                    "timestamp_ms": { "type": "integer" },
                    "partition_key": { "type": ["string", "null"] },
                    "idempotency_key": { "type": ["string", "null"] },
                    "content_type": { "type": ["string", "null"] },
                    "headers": { "type": "object", "additionalProperties": { "type": "string" } },
                    "body_base64": { "type": "string", "contentEncoding": "base64" }
                }
            },
            "SubscriptionConfig": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "dispatch": { "type": "string", "enum": ["round_robin", "random", "least_in_flight"], "default": "round_robin" },
                    "ack_deadline_ms": { "type": "integer", "minimum": 1, "maximum": 86400000, "default": 30000 },
                    "max_attempts": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 5 },
                    "backoff": {
                        "type": "object", "additionalProperties": false,
                        "properties": {
                            "initial_ms": { "type": "integer", "minimum": 0, "default": 1000 },
                            "max_ms": { "type": "integer", "minimum": 0, "maximum": 86400000, "default": 60000 },
                            "multiplier": { "type": "number", "minimum": 1, "maximum": 100, "default": 2.0 },
                            "jitter": { "type": "number", "minimum": 0, "maximum": 1, "default": 0.2 }
                        }
                    },
                    "start": { "type": "string", "enum": ["earliest", "latest"], "default": "earliest" },
                    "dead_letter_topic": { "type": ["string", "null"], "description": "a failure record is published there for every dead letter" }
                }
            },
            "SubscriptionStats": {
                "type": "object",
                "required": ["delivered", "redelivered", "acked", "nacked", "expired", "in_flight", "backlog", "dead_letters"],
                "properties": {
                    "delivered": { "type": "integer" }, "redelivered": { "type": "integer" },
                    "acked": { "type": "integer" }, "nacked": { "type": "integer" },
                    "expired": { "type": "integer" }, "in_flight": { "type": "integer" },
                    "backlog": { "type": "integer" }, "dead_letters": { "type": "integer" }
                }
            },
            "Subscription": {
                "type": "object", "required": ["topic", "name", "config", "stats"],
                "properties": {
                    "topic": { "type": "string" },
                    "name": { "type": "string" },
                    "config": { "$ref": "#/components/schemas/SubscriptionConfig" },
                    "stats": { "$ref": "#/components/schemas/SubscriptionStats" }
                }
            },
            "SubscriptionList": {
                "type": "object", "required": ["subscriptions"],
                "properties": { "subscriptions": { "type": "array", "items": { "$ref": "#/components/schemas/Subscription" } } }
            },
            "ReceiveRequest": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "max": { "type": "integer", "default": 1, "description": "bounded to 1..=1000; an answer also stops once it holds 8 MiB of bodies (at least one message always)" },
                    "wait_ms": { "type": "integer", "minimum": 0, "default": 0, "description": "bounded to 60000" },
                    "consumer": { "type": "string", "minLength": 1, "maxLength": 200, "default": "default" }
                }
            },
            "Delivery": {
                "type": "object",
                "required": ["delivery_id", "delivery_id_str", "attempt", "partition", "offset", "timestamp_ms", "partition_key", "idempotency_key", "content_type", "headers", "body_base64"],
                "properties": {
                    "delivery_id": { "type": "integer", "minimum": 1, "maximum": 9223372036854775807_u64, "description": "below 2^63; beyond 2^53 use delivery_id_str in JavaScript" },
                    "delivery_id_str": { "type": "string", "pattern": "^[0-9]+$", "description": "delivery_id as a decimal string" },
                    "attempt": { "type": "integer", "minimum": 1 },
                    "partition": { "type": "integer" },
                    "offset": { "type": "integer" },
                    "timestamp_ms": { "type": "integer" },
                    "partition_key": { "type": ["string", "null"] },
                    "idempotency_key": { "type": ["string", "null"] },
                    "content_type": { "type": ["string", "null"] },
                    "headers": { "type": "object", "additionalProperties": { "type": "string" } },
                    "body_base64": { "type": "string", "contentEncoding": "base64" }
                }
            },
            "Deliveries": {
                "type": "object", "required": ["deliveries"],
                "properties": { "deliveries": { "type": "array", "items": { "$ref": "#/components/schemas/Delivery" } } }
            },
            "DeliveryIds": {
                "type": "array", "minItems": 1, "maxItems": 10000,
                "items": { "oneOf": [ { "type": "integer", "minimum": 0 }, { "type": "string", "pattern": "^[0-9]+$" } ] }
            },
            "AckRequest": {
                "type": "object", "additionalProperties": false,
                "description": "either delivery_ids, or partition and offset (cumulative ack of everything up to and including offset)",
                "properties": {
                    "delivery_ids": { "$ref": "#/components/schemas/DeliveryIds" },
                    "partition": { "type": "integer", "minimum": 0 },
                    "offset": { "type": "integer", "minimum": 0 }
                }
            },
            "NackRequest": {
                "type": "object", "additionalProperties": false, "required": ["delivery_ids"],
                "properties": {
                    "delivery_ids": { "$ref": "#/components/schemas/DeliveryIds" },
                    "reason": { "type": "string", "description": "kept (first 1000 characters) in the trace and dead letter; do not put patient data here" },
                    "delay_ms": { "type": "integer", "minimum": 0, "maximum": 86400000 }
                }
            },
            "Refusal": {
                "type": "object", "required": ["delivery_id", "delivery_id_str", "code"],
                "properties": {
                    "delivery_id": { "type": "integer" },
                    "delivery_id_str": { "type": "string" },
                    "code": { "type": "string", "enum": ["unknown_or_stale_delivery", "lease_expired"] }
                }
            },
            "AckResult": {
                "type": "object", "required": ["acked", "refused"],
                "properties": { "acked": { "type": "integer" }, "refused": { "type": "array", "items": { "$ref": "#/components/schemas/Refusal" } } }
            },
            "CumulativeAckResult": {
                "type": "object", "required": ["acked_through"],
                "properties": { "acked_through": { "type": "object", "required": ["partition", "offset"],
                    "properties": { "partition": { "type": "integer" }, "offset": { "type": "integer" } } } }
            },
            "NackResult": {
                "type": "object", "required": ["nacked", "refused"],
                "properties": { "nacked": { "type": "integer" }, "refused": { "type": "array", "items": { "$ref": "#/components/schemas/Refusal" } } }
            },
            "DeadLetter": {
                "type": "object",
                "required": ["id", "partition", "offset", "reason", "attempts", "first_failure_ms", "last_failure_ms"],
                "properties": {
                    "id": { "type": "integer" }, "partition": { "type": "integer" }, "offset": { "type": "integer" },
                    "reason": { "type": "string" }, "attempts": { "type": "integer" },
                    "first_failure_ms": { "type": "integer" }, "last_failure_ms": { "type": "integer" }
                }
            },
            "DeadLetterList": {
                "type": "object", "required": ["dead_letters"],
                "properties": { "dead_letters": { "type": "array", "items": { "$ref": "#/components/schemas/DeadLetter" } } }
            },
            "TraceEvent": {
                "type": "object", "required": ["at_ms", "kind"],
                "properties": {
                    "at_ms": { "type": "integer" },
                    "kind": { "type": "string", "enum": ["delivered", "not_handed_over", "acked", "nacked", "lease_expired", "dead_lettered", "cumulative_ack", "dead_letter_replayed", "dead_letter_discarded"] },
                    "attempt": { "type": "integer" },
                    "consumer": { "type": "string" },
                    "reason": { "type": "string" }
                }
            },
            "MessageTrace": {
                "type": "object",
                "required": ["topic", "partition", "offset", "stored_ms", "idempotency_key", "body_bytes", "subscriptions"],
                "properties": {
                    "topic": { "type": "string" }, "partition": { "type": "integer" }, "offset": { "type": "integer" },
                    "stored_ms": { "type": "integer" },
                    "idempotency_key": { "type": ["string", "null"] },
                    "body_bytes": { "type": "integer" },
                    "subscriptions": { "type": "array", "items": {
                        "type": "object", "required": ["subscription", "state", "events"],
                        "properties": {
                            "subscription": { "type": "string" },
                            "state": { "type": "string", "enum": ["pending", "in_flight", "acknowledged", "dead_lettered", "discarded", "not_subscribed"] },
                            "events": { "type": "array", "items": { "$ref": "#/components/schemas/TraceEvent" } }
                        }
                    } }
                }
            },
            "BeginTransaction": {
                "type": "object", "additionalProperties": false,
                "properties": { "timeout_ms": { "type": "integer", "minimum": 1, "maximum": 3600000, "default": 60000 } }
            },
            "Transaction": {
                "type": "object", "required": ["transaction_id", "transaction_id_str", "timeout_ms"],
                "properties": {
                    "transaction_id": { "type": "integer", "description": "below 2^63; beyond 2^53 use transaction_id_str in JavaScript" },
                    "transaction_id_str": { "type": "string" },
                    "timeout_ms": { "type": "integer" }
                }
            },
            "TransactionPublish": {
                "type": "object", "additionalProperties": false, "required": ["topic", "messages"],
                "properties": {
                    "topic": { "type": "string" },
                    "messages": { "type": "array", "minItems": 1, "items": { "$ref": "#/components/schemas/BatchMessage" } }
                }
            },
            "TransactionAck": {
                "type": "object", "additionalProperties": false, "required": ["topic", "subscription", "delivery_ids"],
                "properties": {
                    "topic": { "type": "string" },
                    "subscription": { "type": "string" },
                    "delivery_ids": { "$ref": "#/components/schemas/DeliveryIds" }
                }
            },
            "TransactionAckResult": {
                "type": "object", "required": ["accepted", "refused"],
                "properties": { "accepted": { "type": "integer" }, "refused": { "type": "array", "items": { "$ref": "#/components/schemas/Refusal" } } }
            },
            "CommitResults": {
                "type": "object", "required": ["transaction_id", "transaction_id_str", "results"],
                "properties": {
                    "transaction_id": { "type": "integer" },
                    "transaction_id_str": { "type": "string" },
                    "results": { "type": "array", "items": {
                        "type": "object",
                        "required": ["topic", "partition", "offset", "duplicate", "conflict", "durability"],
                        "properties": merge(json!({ "topic": { "type": "string" } }), outcome_props.clone())
                    } }
                }
            },
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "detail", "code"],
                "properties": {
                    "type": { "type": "string", "description": "urn:carebus:problem:<code>" },
                    "title": { "type": "string" },
                    "status": { "type": "integer" },
                    "detail": { "type": "string" },
                    "code": { "type": "string" },
                    "refused": { "type": "array", "items": { "$ref": "#/components/schemas/Refusal" }, "description": "with stale_delivery: the refused ids" }
                }
            }
        }}
    })
}
