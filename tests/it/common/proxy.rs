//! A TCP forwarder between the relay and the test database that a test can
//! cut (every open connection is closed and new ones are refused until it is
//! restored, as when the database restarts) or stall (open connections go
//! silent, as when the database's host vanishes in a failover).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CutProxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    /// Connections accepted before this many stop forwarding, silently.
    stalled: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
}

impl CutProxy {
    /// Forwards connections on a fresh local port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watch) = watch::channel(true);
        let (stalled, stall) = watch::channel(0);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue;
                }
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let (mut watch, mut stall) = (watch.clone(), stall.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    let cut = async move { watch.wait_for(|open| !open).await.is_ok() };
                    tokio::pin!(cut);
                    let silent = async { stall.wait_for(|before| n < *before).await.is_ok() };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = &mut cut => return,
                        _ = silent => {}
                    }
                    // Open, and silent (as a host that vanished) until cut.
                    let _held = (client, server);
                    cut.await;
                });
            }
        });
        CutProxy {
            addr,
            open,
            stalled,
            accepted,
        }
    }

    /// Every connection open now stops forwarding without closing, as when
    /// the database's host vanishes; new connections work.
    pub fn stall(&self) {
        let now = self.accepted.load(Ordering::SeqCst);
        self.stalled.send_modify(|before| *before = now);
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// `url` (a `postgres://` URL) pointed at this proxy instead.
    pub fn url_through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some(&self.addr.ip().to_string())).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }
}

/// Where the `postgres://` URL `url` connects.
pub fn upstream(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .unwrap()
        .next()
        .unwrap()
}
