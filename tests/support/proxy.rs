//! A Unix-socket stand-in for the Docker engine: it accepts connections and
//! says nothing (an engine that hangs) until told to forward to the real
//! socket.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};

pub struct SocketProxy {
    forwarding: Arc<AtomicBool>,
}

impl SocketProxy {
    /// Listens at `path` on a thread of its own (independent of the test's runtime).
    pub fn start(path: &Path, upstream: &str) -> Self {
        let forwarding = Arc::new(AtomicBool::new(false));
        let flag = forwarding.clone();
        let path = path.to_owned();
        let upstream = upstream.to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = UnixListener::bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    let flag = flag.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        // Hang (read and drop) until forwarding is switched on.
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        if let Ok(mut server) = UnixStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
        });
        ready_rx.recv().unwrap();
        SocketProxy { forwarding }
    }

    pub fn set_forwarding(&self, on: bool) {
        self.forwarding.store(on, Ordering::SeqCst);
    }
}
