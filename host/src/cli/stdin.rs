//! Stdin for `sandbox exec -i`: the process's blocking stdin as an async
//! reader the library streams into the command.

/// Chunk size of [`blocking_reader`].
const READER_CHUNK: usize = 64 * 1024;

/// An async reader over a blocking one (the process's stdin), read on a
/// detached thread through a channel of a few 64 KiB chunks: memory stays
/// bounded whatever flows through, and an abandoned read (the command ended
/// first) never holds the runtime's shutdown, unlike `tokio::io::stdin`.
pub fn blocking_reader<R: std::io::Read + Send + 'static>(mut source: R) -> ChannelReader {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || loop {
        let mut chunk = vec![0u8; READER_CHUNK];
        let item = match source.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                chunk.truncate(n);
                Ok(chunk)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
    });
    ChannelReader {
        rx,
        chunk: Vec::new(),
        at: 0,
    }
}

/// See [`blocking_reader`].
#[derive(Debug)]
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl tokio::io::AsyncRead for ChannelReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while self.at == self.chunk.len() {
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(self.chunk.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.chunk[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blocking_reader_delivers_every_byte_in_order() {
        use tokio::io::AsyncReadExt;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut reader = blocking_reader(std::io::Cursor::new(data.clone()));
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "bytes differ");
    }
}
