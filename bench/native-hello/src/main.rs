//! The ceiling: a native hyper server answering what the benchmark's
//! functions answer (`/hello` as `examples/hello`, `/json` as
//! `bench/guests/json`, with the same transform code), with the same
//! runtime and server settings as Nimbus's gateway.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = if req.uri().path() == "/json" {
        match req.into_body().collect().await {
            Ok(body) => match json_transform::transform(&body.to_bytes()) {
                Ok(out) => (200, "application/json", Bytes::from(out)),
                Err(e) => (400, "text/plain; charset=utf-8", Bytes::from(e)),
            },
            Err(e) => (400, "text/plain; charset=utf-8", Bytes::from(e.to_string())),
        }
    } else {
        (
            200,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"Hello from Nimbus!\n"),
        )
    };
    let mut resp = hyper::Response::new(Full::new(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("native-hello listening on {addr}");
    // Ends on SIGTERM or SIGINT by returning from `main`, so a build
    // instrumented for profile-guided optimisation writes its profile.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
