//! The carebus broker core.
//!
//! Today it owns the data directory: it locks it against a second broker and opens
//! (recovering) every partition log stored under `topics/<topic>/<partition>/`.
//! Topics, exactly-once publish, subscriptions and deliveries build on it.

mod store;

pub use store::{Store, StoreError, StoreReport};
