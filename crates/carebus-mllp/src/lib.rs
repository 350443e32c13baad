//! HL7 v2 over MLLP for carebus: the framing codec, the exactly-once ingress listener,
//! and egress (a subscription delivered to an MLLP destination, ACK matched by MSA-2,
//! connection closed before any resend).

pub mod codec;
pub mod egress;
pub mod ingress;
pub mod tls;

pub use codec::{Frame, FrameError, MllpCodec, frame};
pub use egress::{
    EgressConfig, EgressError, EgressStats, NegativeAckPolicy, run_egress, run_egress_with_stats,
};
pub use ingress::{
    ACK_HEADER, CONTENT_TYPE, IngressConfig, IngressStats, NegativeAck, Route, serve, serve_tls,
};
