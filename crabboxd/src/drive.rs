//! One stream from a driver future and the channel it sends to: the work
//! of a streaming request runs inside the response stream itself (polled
//! only while the stream is, dropped with it), so it needs no spawned task.

use std::{future::Future, pin::Pin};

use futures::Stream;
use tokio::sync::mpsc;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Turns a driver future and the receiver it sends to into one stream,
/// polling the driver only while the stream is polled (no spawned task;
/// dropping the stream drops the work).
pub fn drive<T: Send + 'static>(
    fut: impl Future<Output = ()> + Send + 'static,
    rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    let fut: BoxFuture = Box::pin(fut);
    futures::stream::unfold((Some(fut), rx), |(mut fut, mut rx)| async move {
        loop {
            match fut.as_mut() {
                Some(f) => {
                    tokio::select! {
                        biased;
                        item = rx.recv() => {
                            return item.map(|i| (i, (fut, rx)));
                        }
                        () = f => { fut = None; }
                    }
                }
                None => return rx.recv().await.map(|i| (i, (None, rx))),
            }
        }
    })
}
