//! hyper HTTP/1.1 over a Unix socket, on a thread of its own with a
//! single-threaded tokio runtime.

use std::convert::Infallible;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::routes;
use crate::control::{ActionError, Msg, VmmData};

/// Firecracker's default limit on a request body, in bytes.
pub const MAX_PAYLOAD: usize = 51_200;

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn fault(msg: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "fault_message": msg }).to_string(),
    )
}

fn answer(result: Result<VmmData, ActionError>) -> Response<Full<Bytes>> {
    match result {
        Ok(VmmData::Empty) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Ok(data) => match serde_json::to_string(&data) {
            Ok(s) => json_response(StatusCode::OK, s),
            Err(e) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "fault_message": e.to_string() }).to_string(),
            ),
        },
        Err(e) => fault(&e.to_string()),
    }
}

async fn handle(
    req: Request<Incoming>,
    vmm: Sender<Msg>,
    max_payload: usize,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), max_payload).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = if e.is::<http_body_util::LengthLimitError>() {
                format!("request payload is larger than the limit of {max_payload} bytes allowed by the server")
            } else {
                format!("cannot read the request body: {e}")
            };
            return Ok(fault(&msg));
        }
    };
    let action = match routes::parse(&method, &path, &body) {
        Ok(a) => a,
        Err(e) => return Ok(fault(&e.0)),
    };
    let (tx, rx) = oneshot::channel();
    if vmm
        .send(Msg::Request {
            action,
            reply: Some(tx),
        })
        .is_err()
    {
        return Ok(fault("the VMM is shutting down"));
    }
    Ok(match rx.await {
        Ok(result) => answer(result),
        Err(_) => fault("the VMM is shutting down"),
    })
}

/// Bind `path` and serve the API on a new thread, sending each request to
/// `vmm`. A socket file left by a dead VMM is replaced; one that a live
/// VMM answers on is an error.
pub fn serve(path: &Path, vmm: Sender<Msg>, max_payload: usize) -> std::io::Result<()> {
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: another process serves this socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("api".into()).spawn(move || {
        vmm::seccomp::enter(vmm::seccomp::ThreadKind::Api);
        runtime.block_on(async move {
            let listener = match tokio::net::UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("API socket: {e}");
                    return;
                }
            };
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("API accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let vmm = vmm.clone();
                tokio::task::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, vmm.clone(), max_payload));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!("API connection: {e}");
                    }
                });
            }
        })
    })?;
    Ok(())
}
