//! Walks the protobuf wire format of an ExportTraceServiceRequest without
//! allocating, to price its decoding before committing memory to it.

use std::mem::size_of;

use opentelemetry_proto::tonic::{common::v1 as common, trace::v1 as trace};

/// Nesting deeper than this is refused (arrays in arrays in attributes);
/// prost's own limit is 100, and a real request nests under 10.
const MAX_DEPTH: u32 = 32;

/// The messages whose fields the walk knows.
#[derive(Clone, Copy)]
enum Kind {
    Request,
    ResourceSpans,
    Resource,
    EntityRef,
    ScopeSpans,
    Scope,
    Span,
    Event,
    Link,
    Status,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

/// What a length-delimited field holds.
enum Field {
    /// A message of this kind; a repeated one costs a `Vec` element.
    Message(Kind, usize),
    /// Bytes copied to the heap, plus a fixed cost per occurrence.
    Bytes(usize),
}

impl Kind {
    fn field(self, number: u64) -> Field {
        use Kind::*;
        match (self, number) {
            (Request, 1) => Field::Message(ResourceSpans, size_of::<trace::ResourceSpans>()),
            (ResourceSpans, 1) => Field::Message(Resource, 0),
            (ResourceSpans, 2) => Field::Message(ScopeSpans, size_of::<trace::ScopeSpans>()),
            (Resource, 1) | (Scope, 3) | (Span, 9) | (Event, 3) | (Link, 4) | (KeyValueList, 1) => {
                Field::Message(KeyValue, size_of::<common::KeyValue>())
            }
            (Resource, 3) => Field::Message(EntityRef, size_of::<common::EntityRef>()),
            (EntityRef, 3 | 4) => Field::Bytes(size_of::<String>()),
            (ScopeSpans, 1) => Field::Message(Scope, 0),
            (ScopeSpans, 2) => Field::Message(Span, size_of::<trace::Span>()),
            (Span, 11) => Field::Message(Event, size_of::<trace::span::Event>()),
            (Span, 13) => Field::Message(Link, size_of::<trace::span::Link>()),
            (Span, 15) => Field::Message(Status, 0),
            (KeyValue, 2) => Field::Message(AnyValue, 0),
            (AnyValue, 5) => Field::Message(ArrayValue, 0),
            (AnyValue, 6) => Field::Message(KeyValueList, 0),
            (ArrayValue, 1) => Field::Message(AnyValue, size_of::<common::AnyValue>()),
            // Strings, bytes, and unknown fields (which prost skips).
            _ => Field::Bytes(0),
        }
    }
}

/// The heap a decoded request takes, before `Vec` growth (at most twice
/// this), or None if `buf` is not well-formed protobuf.
pub(super) fn decoded_size(buf: &[u8]) -> Option<usize> {
    walk(buf, Kind::Request, 0)
}

fn walk(mut buf: &[u8], kind: Kind, depth: u32) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut total = 0usize;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = key >> 3;
        if number == 0 || number > (1 << 29) - 1 {
            return None;
        }
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (body, rest) = buf.split_at_checked(len)?;
                buf = rest;
                let cost = match kind.field(number) {
                    Field::Message(child, element) => {
                        element.checked_add(walk(body, child, depth + 1)?)?
                    }
                    Field::Bytes(fixed) => fixed + body.len(),
                };
                total = total.checked_add(cost)?;
            }
            // Groups (3, 4) are proto2; OTLP never sends them.
            _ => return None,
        }
    }
    Some(total)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}
