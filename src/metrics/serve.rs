//! The optional HTTP endpoint (`metrics_listen`, off by default): `GET /metrics` answers the
//! latest rendering, and nothing else is served. Loopback or a unix socket only — no TLS, no
//! authentication: put a proxy in front for anything further. Bounded whatever a client
//! does: `MAX_CLIENTS` at once (more are closed at once), `MAX_REQUEST` bytes of request
//! head, `READ_TIMEOUT` to send it, `WRITE_TIMEOUT` to take the answer. It runs as a task
//! of the daemon's runtime, on its one thread, and never touches the daemon's state: it
//! reads what the loop last published.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

pub const MAX_CLIENTS: usize = 8;
pub const MAX_REQUEST: usize = 8192;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// `127.0.0.1:9469`, `[::1]:9469`, or `unix:/run/hermes-mgr/metrics.sock`.
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let p = PathBuf::from(path);
            return if p.is_absolute() && p.file_name().is_some() {
                Ok(Listen::Unix(p))
            } else {
                Err(format!("{s:?}: a unix socket needs an absolute path (unix:/run/hermes-mgr/metrics.sock)"))
            };
        }
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is neither ADDRESS:PORT nor unix:PATH"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s:?} is not a loopback address: the endpoint has no TLS and no authentication; \
                 listen on 127.0.0.1 or ::1 (or unix:PATH) and put a proxy in front"
            ));
        }
        Ok(Listen::Tcp(addr))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Bind `listen`. A unix socket left by an earlier daemon is replaced; any other file there
/// is refused. The socket is `0666`: the directory it is in says who may connect.
pub async fn bind(listen: &Listen) -> std::io::Result<Listener> {
    match listen {
        Listen::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        Listen::Unix(p) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p)?,
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", p.display()),
                    ))
                }
                Err(_) => {}
            }
            let l = tokio::net::UnixListener::bind(p)?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))?;
            Ok(Listener::Unix(l))
        }
    }
}

/// Serve until the runtime ends: each client gets the text `latest` holds when it asks.
pub async fn serve(listener: Listener, latest: watch::Receiver<Arc<String>>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted: std::io::Result<Box<dyn Conn>> = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Too many at once: this one is closed unanswered.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let text = latest.borrow().clone();
        tokio::spawn(async move {
            answer(conn, &text).await;
            drop(permit);
        });
    }
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// What a request head asks for: the status line and the body to send.
pub fn respond(head: &[u8], text: &str) -> (&'static str, Option<String>) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => ("200 OK", Some(text.to_string())),
        ("GET" | "HEAD", _) => ("404 Not Found", None),
        _ => ("405 Method Not Allowed", None),
    }
}

async fn answer(mut conn: Box<dyn Conn>, text: &str) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_REQUEST {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    let (status, body) = match read {
        Ok(true) if head.len() <= MAX_REQUEST => respond(&head, text),
        Ok(true) => ("431 Request Header Fields Too Large", None),
        _ => return,
    };
    let head_only = head.starts_with(b"HEAD ");
    let body = body.unwrap_or_else(|| format!("{status}\n"));
    let content_type = if status.starts_with("200") {
        super::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        conn.write_all(&out).await?;
        conn.shutdown().await
    })
    .await;
    // A lingering close: what the client sent beyond the head is read (a little, briefly)
    // before the socket is closed, or the kernel would reset the connection, and the client
    // could lose the answer.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_unix_sockets_are_taken() {
        for (s, ok) in [
            ("127.0.0.1:9469", true),
            ("[::1]:9469", true),
            ("unix:/run/hermes-mgr/metrics.sock", true),
            ("0.0.0.0:9469", false),
            ("192.168.1.5:9469", false),
            ("unix:relative.sock", false),
            ("localhost:9469", false),
            ("9469", false),
        ] {
            assert_eq!(s.parse::<Listen>().is_ok(), ok, "{s}");
        }
    }

    #[test]
    fn only_get_of_the_metrics_path_is_answered() {
        for (head, want) in [
            (&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..], "200 OK"),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", "200 OK"),
            (b"HEAD / HTTP/1.1\r\n\r\n", "200 OK"),
            (b"GET /etc/passwd HTTP/1.1\r\n\r\n", "404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
            (b"\xff\xfe\r\n\r\n", "405 Method Not Allowed"),
        ] {
            assert_eq!(
                respond(head, "x").0,
                want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    /// A real socket: a client that sends a head too big gets 431, one that never finishes
    /// its head is cut off, a good one gets the text.
    #[tokio::test(flavor = "current_thread")]
    async fn a_real_client_gets_the_text_and_a_bad_one_is_bounded() {
        let l = bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap();
        let Listener::Tcp(t) = &l else { unreachable!() };
        let addr = t.local_addr().unwrap();
        let (_tx, rx) = watch::channel(Arc::new("hermes_mgr_estop 0\n".to_string()));
        tokio::spawn(serve(l, rx));
        let ask = |req: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&req).await.unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("version=0.0.4") && ok.ends_with("hermes_mgr_estop 0\n"),
            "{ok}"
        );
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST + 10));
        let refused = ask(big).await;
        assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    }

    /// A unix socket: served, world-connectable (its directory decides), a stale one left
    /// by an earlier daemon replaced, any other file at the path refused and kept.
    #[tokio::test(flavor = "current_thread")]
    async fn a_unix_socket_is_served_and_only_a_socket_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.sock");
        let listen = Listen::Unix(path.clone());
        drop(bind(&listen).await.unwrap());
        // The socket file of that listener is left behind: taken over.
        let l = bind(&listen).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        let (_tx, rx) = watch::channel(Arc::new("hermes_mgr_estop 0\n".to_string()));
        tokio::spawn(serve(l, rx));
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("hermes_mgr_estop 0\n"),
            "{out}"
        );
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "keep").unwrap();
        assert!(bind(&Listen::Unix(file.clone())).await.is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }
}
