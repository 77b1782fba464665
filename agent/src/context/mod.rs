//! Spans: the run context that OTLP clients send to the node.
//!
//! In: OTLP trace requests over gRPC and HTTP (`receiver`), each bound by the
//! kernel to the process that sent it (`sender`). Out: checked [`spans::Span`]s
//! admitted into the bounded [`inbox::SpanInbox`] before the client is
//! answered, where `report` takes them window by window, each LLM call's
//! tokens once ([`dedupe`]).

pub mod binding;
pub mod dedupe;
pub mod inbox;
pub mod index;
pub mod lineage;
pub mod receiver;
pub mod sender;
pub mod spans;
