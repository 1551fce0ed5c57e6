//! `PageOrigin`: an HTTPS origin on `127.0.0.1:0` serving a page with many
//! resources — a stylesheet, scripts, eight images and a multi-MiB script —
//! over HTTP/1.1 keep-alive, with a fresh self-signed certificate whose SPKI
//! hash Chromium is told to trust (`--ignore-certificate-errors-spki-list`).
//! It records every path it served in full and every peer address.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use sha2::Digest as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// Bytes of the big script (`/big.js`).
pub const BIG: usize = 4 * 1024 * 1024;
/// Images on the page.
pub const IMAGES: usize = 8;

/// The running origin.
#[derive(Debug, Clone)]
pub struct PageOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// base64(sha256(SubjectPublicKeyInfo)) of its certificate.
    pub spki: String,
    /// Paths served in full, in order.
    pub served: Arc<Mutex<Vec<String>>>,
    /// The peer of every connection.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

/// The page's text once its scripts ran (what `--dump-dom` shows).
pub fn loaded_marker() -> String {
    format!("loaded app-ok {BIG} css-ok")
}

fn resource(path: &str) -> Option<(&'static str, Vec<u8>)> {
    let imgs: String = (1..=IMAGES)
        .map(|i| format!("<img src=\"/img{i}.svg\" width=8 height=8>"))
        .collect();
    Some(match path {
        "/" | "/index.html" => (
            "text/html",
            format!(
                "<!doctype html><html><head><title>egress page</title>\
                 <link rel=stylesheet href=\"/style.css\"><script src=\"/app.js\"></script>\
                 <script src=\"/big.js\"></script></head><body>{imgs}<div id=r>pending</div><div id=t></div>\
                 <script>var c=getComputedStyle(document.body).color=='rgb(1, 2, 3)'?'css-ok':'css-missing';\
                 document.getElementById('r').textContent='loaded '+window.appOk+' '+window.bigLen+' '+c;\
                 addEventListener('load',function(){{document.getElementById('t').textContent='loadms='+Math.round(performance.now());}});</script>\
                 </body></html>"
            )
            .into_bytes(),
        ),
        "/style.css" => ("text/css", b"body{color:rgb(1,2,3)}".to_vec()),
        "/app.js" => ("application/javascript", b"window.appOk='app-ok';".to_vec()),
        "/big.js" => {
            let head = b"window.bigLen=\"";
            let tail = b"\".length;";
            let mut body = Vec::with_capacity(BIG + 32);
            body.extend_from_slice(head);
            body.resize(head.len() + BIG, b'x');
            body.extend_from_slice(tail);
            ("application/javascript", body)
        }
        p if p.starts_with("/img") && p.ends_with(".svg") => (
            "image/svg+xml",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"8\" height=\"8\"><rect width=\"8\" height=\"8\" fill=\"#c33\"/></svg>".to_vec(),
        ),
        _ => return None,
    })
}

impl PageOrigin {
    /// Starts the origin.
    pub async fn start() -> PageOrigin {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let spki = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(key.public_key_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = PageOrigin {
            addr,
            spki,
            served: Arc::default(),
            peers: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                o.peers.lock().unwrap().push(peer);
                let (acceptor, served) = (acceptor.clone(), Arc::clone(&o.served));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; 8192];
                    loop {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let path = head
                            .split_whitespace()
                            .nth(1)
                            .unwrap_or("/")
                            .split('?')
                            .next()
                            .unwrap_or("/")
                            .to_owned();
                        let (status, ctype, body) = match resource(&path) {
                            Some((t, b)) => ("200 OK", t, b),
                            None => ("404 Not Found", "text/plain", b"not found".to_vec()),
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\r\n",
                            body.len()
                        );
                        if tls.write_all(resp.as_bytes()).await.is_err()
                            || tls.write_all(&body).await.is_err()
                            || tls.flush().await.is_err()
                        {
                            return;
                        }
                        served.lock().unwrap().push(path);
                    }
                });
            }
        });
        origin
    }

    /// `https://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.addr.port())
    }

    /// Whether every resource of the page was served in full.
    pub fn served_everything(&self) -> Result<(), String> {
        let served = self.served.lock().unwrap().clone();
        let mut want: Vec<String> = ["/", "/style.css", "/app.js", "/big.js"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        want.extend((1..=IMAGES).map(|i| format!("/img{i}.svg")));
        let missing: Vec<&String> = want.iter().filter(|w| !served.contains(w)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not served: {missing:?}; served: {served:?}"))
        }
    }
}

/// The DOM headless Chromium's `--dump-dom` wrote to `path`, once it is
/// complete (`</html>`) or `within` has passed (whatever is there then).
pub async fn wait_for_dom(path: &std::path::Path, within: std::time::Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let dom = std::fs::read_to_string(path).unwrap_or_default();
        if dom.contains("</html>") || tokio::time::Instant::now() > deadline {
            return dom;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The flags every headless Chromium of the tests runs with (the closed
/// network floods otherwise), trusting `spki`.
pub fn chromium_flags(spki: &str) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!("--ignore-certificate-errors-spki-list={spki}")])
    .collect()
}

/// Where Chromium is, if installed; under `CI=true` it must be.
pub fn chromium() -> Option<&'static str> {
    let path = "/usr/bin/chromium";
    if std::path::Path::new(path).exists() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("chromium is missing; CI installs it (.ci/run)");
    }
    None
}
