//! The carebus broker core.
//!
//! Today it owns the data directory (locked against a second broker) and the topics:
//! their configuration and one recovered log per partition under
//! `topics/<topic>/<partition>/`. Exactly-once publish, subscriptions and deliveries
//! build on it; see `DESIGN.md` in this crate for the plan.

mod broker;
pub mod dedup;
mod keys_in_flight;
mod message;
mod store;
mod subscription;
pub mod topic;
mod txn;

pub use broker::{
    Broker, BrokerConfig, BrokerError, CommitStep, DedupStats, MessageTrace, PublishOutcome,
    TopicCounters, TopicRuntime,
};
pub use message::{PublishMessage, StoredMessage, body_hash};
pub use store::{Store, StoreError, StoreReport, Topic};
pub use subscription::{
    Backoff, DeadLetter, Delivery, Dispatch, MAX_RECEIVE_BYTES, SettleRefusal, StartPosition,
    Subscription, SubscriptionConfig, SubscriptionError, SubscriptionStats, SubscriptionTrace,
    TraceEvent,
};
pub use topic::{TopicConfig, partition_for_key, validate_name};
