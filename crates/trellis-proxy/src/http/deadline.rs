//! A future cut short after an optional time limit.
//!
//! `tokio::time::timeout` carries its timer inline, and a match between a timed and an
//! untimed call keeps two copies of the inner future's state. Here the inner future is
//! stored once and the timer lives on the heap, only when there is a limit: a request's
//! future stays small (it is copied whenever it moves, e.g. into a spawned HTTP/2 stream
//! task), and the common case (no limit) costs nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

pin_project_lite::pin_project! {
    /// Resolves to `Some(output)`, or `None` when the limit passed first.
    pub struct Deadline<F> {
        #[pin]
        fut: F,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future> Deadline<F> {
    pub fn new(limit: Option<Duration>, fut: F) -> Deadline<F> {
        Deadline {
            fut,
            timer: limit.map(|t| Box::pin(tokio::time::sleep(t))),
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Some(v));
        }
        match this.timer {
            Some(t) => t.as_mut().poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_limit_waits_and_a_limit_cuts() {
        let slow = || tokio::time::sleep(Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(Deadline::new(None, slow()).await, Some(()));
        assert!(start.elapsed() >= Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(
            Deadline::new(Some(Duration::from_millis(20)), slow()).await,
            None
        );
        assert!(start.elapsed() < Duration::from_millis(190));
        assert_eq!(
            Deadline::new(Some(Duration::from_secs(5)), slow()).await,
            Some(())
        );
    }
}
