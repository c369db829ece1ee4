//! A shard's pool of scratch buffers, lent for reads and for the writes the kernel could not take
//! at once, and the non-blocking reads into them: an idle connection holds no read buffer, a
//! readable one borrows one for the length of a read.

use std::cell::RefCell;

use crate::transport::{Stream, Transport};

/// Size of the buffers a shard lends for reads and writes.
pub(crate) const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse per shard.
const POOLED_BUFFERS: usize = 32;

/// One shard's buffers.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    buffers: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of [`BUFFER_SIZE`] from the pool (or a new one).
    pub(crate) fn take(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE))
    }

    /// Gives a buffer back.
    pub(crate) fn put(&self, mut buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        // Oversized buffers (a large write batch) are not kept, nor small ones (a read needs the
        // whole scratch size: a `recv` into no spare room would read as end of stream).
        if pool.len() < POOLED_BUFFERS && (BUFFER_SIZE..=4 * BUFFER_SIZE).contains(&buf.capacity())
        {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Waits until `stream` is readable, then reads what it holds into a pooled buffer (empty at
    /// the end of the stream). No buffer is held while waiting; the caller puts it back. `eager`
    /// tries the read before waiting: worth it where bytes have usually arrived already (a request
    /// head right after the accept), one wasted syscall where they have not.
    pub(crate) async fn read_ready(
        &self,
        stream: &Stream,
        eager: bool,
    ) -> std::io::Result<Vec<u8>> {
        let mut wait = !eager;
        loop {
            if wait {
                stream.readable().await?;
            }
            wait = true;
            if let Some(read) = self.try_read(stream) {
                return read;
            }
        }
    }

    /// One non-blocking read into a pooled buffer: `None` while nothing has arrived. The caller
    /// puts the buffer back.
    pub(crate) fn try_read(&self, stream: &Stream) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = self.take();
        match stream.recv_now(&mut buf) {
            Ok(_) => Some(Ok(buf)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                self.put(buf);
                None
            }
            Err(e) => {
                self.put(buf);
                Some(Err(e))
            }
        }
    }
}
