//! OTLP over gRPC (4317): the tonic service, its codec, and the accepted
//! connections with their peer address.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::body::Body as AxumBody;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse, trace_service_server::TraceService,
};
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http, tokio_stream::Stream},
    server::UnaryService,
    transport::server::Connected as TonicConnected,
};
use tracing::warn;

use crate::context::{
    receiver::{
        DECODE_FACTOR, EXPORT_PATH,
        admission::{Handler, Refusal, decode_request},
        http_protobuf::read_body,
        peer::Peer,
        warn::{Warn, warn_allowed},
    },
    sender::Sender,
};

#[tonic::async_trait]
impl TraceService for Handler {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        // Set by `GrpcService::call`; a request that reached here without
        // one is refused whole rather than believed.
        let sender = request
            .extensions()
            .get::<Sender>()
            .cloned()
            .unwrap_or(Sender::Unidentified);
        match self.accept(request.into_inner(), &sender).await {
            Ok(response) => Ok(tonic::Response::new(response)),
            Err(refusal) => Err(tonic::Status::new(refusal.grpc, refusal.message)),
        }
    }
}

/// The gRPC server: the generated `TraceServiceServer` with our codec, which
/// refuses over-dense payloads before decoding and answers malformed ones
/// with `InvalidArgument` (prost's codec says `Internal`), and with the
/// request-concurrency bound around reading and decoding.
#[derive(Clone)]
pub(super) struct GrpcService {
    pub(super) handler: Arc<Handler>,
}

impl Service<http::Request<tonic::body::Body>> for GrpcService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = self.handler.clone();
        Box::pin(async move {
            if request.uri().path() != EXPORT_PATH {
                return Ok(tonic::Status::unimplemented(format!(
                    "{} is not served here; OTLP traces go to {EXPORT_PATH}",
                    request.uri().path()
                ))
                .into_http());
            }
            let sender = match request.extensions().get::<Peer>() {
                Some(peer) => peer.sender(&handler.binder).await,
                None => Sender::Unidentified,
            };
            // The body is read before a decode permit is taken, in a read
            // slot of the sender's own share, under a deadline.
            let _slot = match handler.read_slot(&sender) {
                Ok(slot) => slot,
                Err(refusal) => {
                    handler.refused("gRPC", &refusal);
                    return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                }
            };
            let (mut parts, body) = request.into_parts();
            // A unary message: its 5-byte gRPC prefix, then at most the limit
            // (tonic checks the exact size when it decodes).
            let limit = handler.max_request_bytes.saturating_add(5);
            let bytes =
                match tokio::time::timeout(handler.read_timeout, read_body(body, limit, 0)).await {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(refusal)) => {
                        handler.refused("gRPC", &refusal);
                        return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                    }
                    Err(_) => {
                        let refusal = Refusal::timeout(format!(
                            "the request took over {:?} to arrive",
                            handler.read_timeout
                        ));
                        handler.refused("gRPC", &refusal);
                        return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                    }
                };
            parts.extensions.insert(sender);
            let request =
                http::Request::from_parts(parts, tonic::body::Body::new(AxumBody::from(bytes)));
            let Ok(_permit) = handler.permits.clone().acquire_owned().await else {
                return Ok(tonic::Status::unavailable("the receiver is stopping").into_http());
            };
            let codec = OtlpCodec {
                max_decoded: handler.max_request_bytes.saturating_mul(DECODE_FACTOR),
            };
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(handler.max_request_bytes), None);
            let mut response = grpc.unary(Export(handler.clone()), request).await;
            // `export` never fails, so an error status here is a refusal by
            // the codec or tonic's size and compression checks.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32);
            if code == Some(tonic::Code::OutOfRange) {
                // Tonic says OutOfRange for a message over the size limit,
                // which OTLP clients retry; ResourceExhausted without retry
                // info tells them not to.
                response = tonic::Status::resource_exhausted(format!(
                    "the request is over the limit of {} bytes",
                    handler.max_request_bytes
                ))
                .into_http();
                let refusal = Refusal::too_large(format!(
                    "a request over the limit of {} bytes",
                    handler.max_request_bytes
                ));
                handler.refused("gRPC", &refusal);
            } else if let Some(code) = code.filter(|c| *c != tonic::Code::Ok) {
                let message = response
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let refusal = match code {
                    tonic::Code::ResourceExhausted => Refusal::too_large(message),
                    tonic::Code::Unimplemented => Refusal::unsupported(message),
                    tonic::Code::Unavailable => Refusal::busy(message),
                    _ => Refusal::malformed(message),
                };
                handler.refused("gRPC", &refusal);
            }
            Ok(response)
        })
    }
}

/// The Export method, as tonic's unary dispatch wants it.
pub(super) struct Export(Arc<Handler>);

impl UnaryService<ExportTraceServiceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<ExportTraceServiceRequest>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move { handler.export(request).await })
    }
}

/// Prost encoding of responses; requests decoded through [`decode_request`].
#[derive(Clone, Copy)]
pub(super) struct OtlpCodec {
    pub(super) max_decoded: usize,
}

impl Codec for OtlpCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = ExportTraceServiceRequest;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for OtlpCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the response: {e}")))
    }
}

impl Decoder for OtlpCodec {
    type Item = ExportTraceServiceRequest;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use prost::bytes::Buf;
        // Zero-copy: the buffer is one contiguous `BytesMut`.
        let bytes = src.copy_to_bytes(src.remaining());
        decode_request(&bytes, self.max_decoded)
            .map(Some)
            .map_err(|r| tonic::Status::new(r.grpc, r.message))
    }
}

/// Accepted gRPC connections, each tagged with its [`Peer`].
pub(super) struct Incoming {
    pub(super) listener: TcpListener,
    pub(super) pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<PeerStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(pause) = this.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        match ready!(this.listener.poll_accept(cx)) {
            Ok((io, remote)) => {
                // Responses are small and latency matters more than packets.
                let _ = io.set_nodelay(true);
                let peer = Peer::new(remote);
                Poll::Ready(Some(Ok(PeerStream { io, peer })))
            }
            Err(e) => {
                // A connection that died before accept is its own problem;
                // anything else (out of descriptors) lasts a while, and
                // retrying at once would spin.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) {
                    if warn_allowed(Warn::Accept) {
                        warn!("OTLP receiver: accepting a gRPC connection: {e}");
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// A TCP connection with its peer, so the handler can find the peer's pid.
pub(super) struct PeerStream {
    pub(super) io: TcpStream,
    pub(super) peer: Peer,
}

impl TonicConnected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// HTTP/protobuf.
