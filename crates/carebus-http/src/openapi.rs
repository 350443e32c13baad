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
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "carebus HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Topics and exactly-once publish. Errors are RFC 9457 problem documents (application/problem+json) with a stable `code`."
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
                    }), common.clone()), publish_errors)
                }
            },
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
                    }), merge(common, problem_responses(&[("404", "unknown_topic, unknown_partition, offset_out_of_range, not_found")])))
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
                "required": ["name", "partitions", "config", "end_offsets", "start_offsets", "published", "duplicates", "conflicts"],
                "properties": {
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
                "properties": outcome_props
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
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "detail", "code"],
                "properties": {
                    "type": { "type": "string", "description": "urn:carebus:problem:<code>" },
                    "title": { "type": "string" },
                    "status": { "type": "integer" },
                    "detail": { "type": "string" },
                    "code": { "type": "string" }
                }
            }
        }}
    })
}
