//! OTLP over HTTP/protobuf (4318): the axum route, and reading a body under
//! its size and time limits.

use std::{fmt, future::poll_fn, pin::Pin, sync::Arc};

use axum::{
    body::{Body as AxumBody, HttpBody},
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use crate::context::receiver::{
    DECODE_FACTOR, PROTOBUF,
    admission::{Handler, Refusal, decode_request},
    peer::Peer,
};

/// `google.rpc.Status`, the body OTLP/HTTP puts in error responses.
#[derive(Clone, PartialEq, Message)]
pub(super) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub(super) code: i32,
    #[prost(string, tag = "2")]
    pub(super) message: String,
}

/// `POST /v1/traces`.
pub(super) async fn export_http(
    State(handler): State<Arc<Handler>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: AxumBody,
) -> Response {
    match handle_http(&handler, &peer, &headers, body).await {
        Ok(response) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROTOBUF)],
            response.encode_to_vec(),
        )
            .into_response(),
        Err(refusal) => {
            handler.refused("HTTP", &refusal);
            let status = RpcStatus {
                code: refusal.grpc as i32,
                message: refusal.message,
            };
            let mut response = (
                refusal.http,
                [(header::CONTENT_TYPE, PROTOBUF)],
                status.encode_to_vec(),
            )
                .into_response();
            if matches!(
                refusal.http,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) {
                // The inbox empties every tick (1 s by default), and a read
                // slot frees when its body has arrived.
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

pub(super) async fn handle_http(
    handler: &Handler,
    peer: &Peer,
    headers: &HeaderMap,
    body: AxumBody,
) -> Result<ExportTraceServiceResponse, Refusal> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let media = header(header::CONTENT_TYPE)
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if !media.eq_ignore_ascii_case(PROTOBUF) {
        return Err(Refusal::unsupported(format!(
            "content type {media:?} is not supported; send {PROTOBUF}"
        )));
    }
    if let Some(encoding) = header(header::CONTENT_ENCODING)
        && !encoding.trim().eq_ignore_ascii_case("identity")
    {
        return Err(Refusal::unsupported(format!(
            "content encoding {encoding:?} is not supported; send uncompressed"
        )));
    }
    let limit = handler.max_request_bytes;
    let length = header(header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = length
        && length > limit as u64
    {
        return Err(Refusal::too_large(format!(
            "a {length}-byte body is over the limit of {limit}"
        )));
    }
    let sender = peer.sender(&handler.binder).await;
    // Read before a decode permit is taken, in a read slot of the sender's
    // own share, under a deadline: slow senders hold only their own slots.
    let _slot = handler.read_slot(&sender)?;
    let capacity = length.map_or(0, |l| l as usize);
    let timeout = handler.read_timeout;
    let bytes = tokio::time::timeout(timeout, read_body(body, limit, capacity))
        .await
        .map_err(|_| Refusal::timeout(format!("the body took over {timeout:?}")))??;
    let Ok(_permit) = handler.permits.clone().acquire_owned().await else {
        return Err(Refusal::timeout("the receiver is stopping".into()));
    };
    let request = decode_request(&bytes, limit.saturating_mul(DECODE_FACTOR))?;
    drop(bytes);
    handler.accept(request, &sender).await
}

/// Reads a body of at most `limit` bytes.
pub(super) async fn read_body<B>(
    mut body: B,
    limit: usize,
    capacity: usize,
) -> Result<Vec<u8>, Refusal>
where
    B: HttpBody<Data = axum::body::Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let mut bytes = Vec::with_capacity(capacity.min(limit));
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Refusal::malformed(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(Refusal::too_large(format!(
                    "the body is over the limit of {limit} bytes"
                )));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

// The client's process.
