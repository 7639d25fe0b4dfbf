//! A TCP relay that a test can cut, pause and restore: a database or an upstream server "goes
//! away", "stalls" or comes back, without touching the real server behind it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub struct DbProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    target: SocketAddr,
    /// False while cut: new connections are closed at once (and counted).
    up: AtomicBool,
    /// True while paused: connections stay open but no byte moves either way.
    paused: watch::Sender<bool>,
    /// Connections closed at once while cut, and a wake-up for each.
    turned_away: AtomicUsize,
    knocked: Notify,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.shared.connections.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl DbProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            up: AtomicBool::new(true),
            paused: watch::channel(false).0,
            turned_away: AtomicUsize::new(0),
            knocked: Notify::new(),
            connections: Mutex::default(),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !s.up.load(Ordering::SeqCst) {
                    drop(inbound);
                    s.turned_away.fetch_add(1, Ordering::SeqCst);
                    s.knocked.notify_waiters();
                    continue;
                }
                let paused = s.paused.subscribe();
                let target = s.target;
                let conn = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::join!(pipe(ri, wo, paused.clone()), pipe(ro, wi, paused));
                    }
                });
                s.connections.lock().unwrap().push(conn);
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// Drops every connection; new ones are closed at once: the server is gone.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        for t in self.shared.connections.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Relays again: the server is back.
    pub async fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
        let _ = self.shared.paused.send(false);
    }

    /// Connections stay open, but nothing moves through them (a server that hangs).
    pub fn pause(&self) {
        let _ = self.shared.paused.send(true);
    }

    /// Waits until someone tries to connect while the relay is cut.
    pub async fn knocked_while_cut(&self) {
        loop {
            let knock = self.shared.knocked.notified();
            if self.shared.turned_away.load(Ordering::SeqCst) > 0 {
                return;
            }
            knock.await;
        }
    }
}

/// Copies one direction, holding bytes back while paused.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut paused: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
