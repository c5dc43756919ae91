//! Reading a process's output pipe into the bounded output channel an `Execution` hands out;
//! shared by the local and the Kubernetes executor, like `sql.rs` is by the SQL adapters.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::domain::command::OutputStream;

/// Bytes read at a time.
pub const READ_SIZE: usize = 8 * 1024;

/// Forwards what `pipe` yields as `stream` pieces until it ends or the consumer is gone. A full
/// channel stops the reading, so a slow consumer slows the process instead of growing memory.
pub async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    stream: OutputStream,
    tx: mpsc::Sender<(OutputStream, Bytes)>,
) {
    let mut buffer = BytesMut::with_capacity(READ_SIZE);
    loop {
        buffer.reserve(READ_SIZE);
        match pipe.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send((stream, buffer.split().freeze())).await.is_err() {
                    return;
                }
            }
        }
    }
}
