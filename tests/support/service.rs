//! `streamdest run` as a child process: started on `127.0.0.1:0` (the address is read from its
//! `listening on http://…` line on stderr), driven with a small HTTP/1.1 client, stopped with
//! SIGTERM or `kill -9`. Used by the service tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a request may take.
pub const WAIT: Duration = Duration::from_secs(20);
/// How long a start (which may replay a log) may take on a loaded machine.
pub const START_WAIT: Duration = Duration::from_secs(60);

/// A running `streamdest run`.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Service {
    pub fn start(config: &Path, data_dir: &Path, extra: &[&str]) -> Service {
        Service::try_start(config, data_dir, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the service with `env` added to its environment.
    pub fn start_with_env(
        config: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        Service::spawn(config, data_dir, extra, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the service; `Err` with its stderr when it exits before listening.
    pub fn try_start(config: &Path, data_dir: &Path, extra: &[&str]) -> Result<Service, String> {
        Service::spawn(config, data_dir, extra, &[])
    }

    fn spawn(
        config: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Service, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamdest"))
            .args(["run", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env_remove("STREAMDEST_API_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start streamdest run");
        let mut pipe = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut sent = false;
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut text = stderr.lock().unwrap();
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if !sent
                        && let Some(rest) = text.split("listening on http://").nth(1)
                        && let Some(addr) = rest.split_whitespace().next()
                        && let Ok(addr) = addr.parse()
                    {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            });
        }
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(20)) {
                return Ok(Service {
                    child,
                    addr,
                    stderr,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "exited with {status} before listening:\n{}",
                    stderr.lock().unwrap()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "not listening after {START_WAIT:?}:\n{}",
                    stderr.lock().unwrap()
                ));
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// One HTTP/1.1 request; returns the status and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http(self.addr, method, path, headers, body)
    }

    pub fn json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request(
            method,
            path,
            &[("Content-Type", "application/json")],
            &body.to_string(),
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn post_events(&self, events: &[Value]) -> u16 {
        self.json("POST", "/v1/events", &Value::from(events.to_vec()))
            .0
    }

    pub fn sigterm(mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = super::wait_or_kill(&mut self.child, WAIT);
        status.and_then(|s| s.code())
    }

    /// `kill -9`; returns the instant the signal was sent.
    pub fn kill9(mut self) -> Instant {
        let _ = self.child.kill();
        let at = Instant::now();
        let _ = self.child.wait();
        at
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the service");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
