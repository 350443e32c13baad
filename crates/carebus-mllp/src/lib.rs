//! HL7 v2 over MLLP for carebus: the framing codec and the exactly-once ingress
//! listener. Egress (subscription → MLLP destination) comes next.

pub mod codec;
pub mod ingress;

pub use codec::{Frame, FrameError, MllpCodec, frame};
pub use ingress::{ACK_HEADER, CONTENT_TYPE, IngressConfig, IngressStats, serve};
