//! The exporter's HTTP transport: the relay's own outbound client (pooled
//! keep-alive connections, HTTP and HTTPS with rustls), so that exporting
//! brings in no second HTTP stack.

use crate::deliver::HttpClient;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry_http::HttpError;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The most of a collector's answer that is read: it is a small protobuf
/// saying how many spans it rejected.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug)]
pub(super) struct Collector {
    client: HttpClient,
    /// For the whole exchange, the answer's body included.
    timeout: Duration,
}

impl Collector {
    pub(super) fn new(client: HttpClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let response = self.client.request(request.map(Full::new)).await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

type Sent<'a> = Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'a>>;

impl opentelemetry_http::HttpClient for Collector {
    fn send_bytes<'s, 'f>(&'s self, request: Request<Bytes>) -> Sent<'f>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.send(request)).await {
                Ok(answer) => answer,
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )
                .into()),
            }
        })
    }
}
