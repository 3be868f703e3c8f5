//! A TCP proxy between the relay and its database that a test can cut: every
//! open connection is dropped at once and new ones are closed as soon as they
//! are accepted, until it is restored. To the relay this is the database going
//! away mid-transaction (a crash, a failover to a standby) without stopping the
//! server the other tests share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Bumped by every cut; each connection ends when it changes.
    cuts: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    down: AtomicBool,
    /// Connections dropped by a cut or refused while down.
    dropped: AtomicUsize,
}

impl Proxy {
    /// A proxy on a fresh port of 127.0.0.1 to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (cuts, _) = watch::channel(0u64);
        let accept = {
            let (shared, cuts) = (shared.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.down.load(Ordering::SeqCst) {
                        shared.dropped.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let (shared, cut) = (shared.clone(), cuts.subscribe());
                    tokio::spawn(relay_bytes(client, upstream, shared, cut));
                }
            })
        };
        Proxy {
            addr,
            shared,
            cuts,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
    }

    /// How many connections a cut dropped or refused so far.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut.
async fn relay_bytes(
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut cut: watch::Receiver<u64>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.changed() => {
            shared.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}
