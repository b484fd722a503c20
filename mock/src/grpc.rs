//! A gRPC service for the demo, tests and benchmarks (`sallyport-mock --grpc ADDR`): the
//! `mock.Echo` service over h2c, written against tonic's server API without generated code
//! (the one message is a hand-written prost type, so no `protoc` is needed to build).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::{Request, Response, Status, Streaming};

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Echo {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

pub fn codec() -> tonic_prost::ProstCodec<Echo, Echo> {
    tonic_prost::ProstCodec::default()
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<Echo, Status>> + Send>>;

struct Unary;
impl tonic::server::UnaryService<Echo> for Unary {
    type Response = Echo;
    type Future = BoxFuture<Response<Echo>, Status>;
    fn call(&mut self, req: Request<Echo>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            if msg.text == "fail" {
                return Err(Status::not_found("no such order"));
            }
            let mut resp = Response::new(Echo {
                text: msg.text,
                count: 1,
            });
            resp.metadata_mut().insert(
                "x-served-by",
                tonic::metadata::MetadataValue::from_static("echo"),
            );
            Ok(resp)
        })
    }
}

struct ServerStream;
impl tonic::server::ServerStreamingService<Echo> for ServerStream {
    type Response = Echo;
    type ResponseStream = EchoStream;
    type Future = BoxFuture<Response<EchoStream>, Status>;
    fn call(&mut self, req: Request<Echo>) -> Self::Future {
        Box::pin(async move {
            let msg = req.into_inner();
            let items = (0..msg.count).map(move |i| {
                Ok(Echo {
                    text: format!("{}-{i}", msg.text),
                    count: i,
                })
            });
            Ok(Response::new(
                Box::pin(futures_util::stream::iter(items)) as EchoStream
            ))
        })
    }
}

struct ClientStream;
impl tonic::server::ClientStreamingService<Echo> for ClientStream {
    type Response = Echo;
    type Future = BoxFuture<Response<Echo>, Status>;
    fn call(&mut self, req: Request<Streaming<Echo>>) -> Self::Future {
        Box::pin(async move {
            let mut stream = req.into_inner();
            let (mut text, mut count) = (String::new(), 0);
            while let Some(m) = stream.next().await {
                text.push_str(&m?.text);
                count += 1;
            }
            Ok(Response::new(Echo { text, count }))
        })
    }
}

struct Bidi;
impl tonic::server::StreamingService<Echo> for Bidi {
    type Response = Echo;
    type ResponseStream = EchoStream;
    type Future = BoxFuture<Response<EchoStream>, Status>;
    fn call(&mut self, req: Request<Streaming<Echo>>) -> Self::Future {
        Box::pin(async move {
            let out = req.into_inner().map(|m| {
                m.map(|m| Echo {
                    text: m.text.to_uppercase(),
                    count: m.count,
                })
            });
            Ok(Response::new(Box::pin(out) as EchoStream))
        })
    }
}

/// `mock.Echo`: Unary (echoes `text` with `count = 1`; `text = "fail"` answers NOT_FOUND),
/// ServerStream (`count` messages), ClientStream (the texts joined), Bidi (each text in upper
/// case, as it arrives).
#[derive(Clone)]
pub struct EchoService;

impl<B> Service<http::Request<B>> for EchoService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(codec());
            Ok(match req.uri().path() {
                "/mock.Echo/Unary" => grpc.unary(Unary, req).await,
                "/mock.Echo/ServerStream" => grpc.server_streaming(ServerStream, req).await,
                "/mock.Echo/ClientStream" => grpc.client_streaming(ClientStream, req).await,
                "/mock.Echo/Bidi" => grpc.streaming(Bidi, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "mock.Echo";
}

/// Serves `mock.Echo` over h2c on `listener`; returns the connections it accepted so far.
pub fn serve(listener: tokio::net::TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = {
        let accepted = Arc::clone(&accepted);
        tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |c| {
            if c.is_ok() {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoService)
            .serve_with_incoming(counted),
    );
    accepted
}
