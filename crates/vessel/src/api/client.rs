//! A small client of a VM's API socket, for the CLI (`vessel ps`, `pause`,
//! ...) and the tests: one request per connection, through hyper.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// An answer: the status code and the body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Firecracker's `fault_message`, or the body.
    pub fn fault(&self) -> String {
        match self.json().get("fault_message").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => self.body.clone(),
        }
    }
}

/// Send one request to the API socket at `sock`, waiting at most `timeout`.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>, timeout: Duration) -> std::io::Result<Reply> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        tokio::time::timeout(timeout, send(sock, method, path, body))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the VM's API did not answer in time"))?
    })
}

async fn send(sock: &Path, method: &str, path: &str, body: Option<&str>) -> std::io::Result<Reply> {
    let stream = tokio::net::UnixStream::connect(sock).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"))
        .header("Host", "localhost")
        .header("Accept", "application/json");
    if body.is_some() {
        req = req.header("Content-Type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .map_err(std::io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
