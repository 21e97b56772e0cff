//! Subscribe streams of this process that a lease may hand messages to
//! directly (issue 14). On an ordered subscription a key stays with the
//! stream holding its run; when another stream's lease reads new messages
//! of that key, they are leased to the holding stream and sent to it here,
//! instead of being stored held back until the run is acked. A stream takes
//! such messages only while its flow-control window has room.
//!
//! Only streams of this process are here: a key held by a stream of another
//! instance (PostgreSQL) keeps its new messages held back as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::model::Delivery;

use super::Holder;

/// Deliveries leased by a lease of another stream, for one stream.
pub(super) type Routed = (i64, Vec<Delivery>);

/// A stream's window as leases on other streams see it.
#[derive(Debug, Default)]
struct Window {
    /// Messages the stream's window has room for, by its own count.
    free: AtomicIsize,
    /// Messages sent to the stream that it has not counted yet.
    pending: AtomicIsize,
}

#[derive(Debug)]
struct Mailbox {
    subscription: String,
    window: Arc<Window>,
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
}

/// The streams that take deliveries leased for them, by holder.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<Mutex<HashMap<i64, Mailbox>>>);

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Mailbox>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `holder`, a stream on `subscription`; it takes deliveries
    /// until the returned route is closed or dropped.
    pub fn open(&self, subscription: &str, holder: Holder) -> Route {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Window::default());
        self.lock().insert(
            holder.0,
            Mailbox {
                subscription: subscription.to_owned(),
                window: Arc::clone(&window),
                tx,
            },
        );
        Route {
            holder: holder.0,
            routes: self.clone(),
            window,
            rx,
            open: true,
        }
    }

    /// How many messages `holder` may still be handed on `subscription`;
    /// `None` if it is no stream of this process on it.
    pub(super) fn room(&self, subscription: &str, holder: i64) -> Option<isize> {
        let boxes = self.lock();
        let mailbox = boxes.get(&holder)?;
        (mailbox.subscription == subscription).then(|| {
            let window = &mailbox.window;
            window.free.load(Ordering::SeqCst) - window.pending.load(Ordering::SeqCst)
        })
    }

    /// Sends `deliveries` to `holder`'s stream; gives them back if it is
    /// gone (its stream ended after they were leased).
    pub(super) fn send(&self, holder: i64, deliveries: Vec<Delivery>) -> Result<(), Vec<Delivery>> {
        let boxes = self.lock();
        let Some(mailbox) = boxes.get(&holder) else {
            return Err(deliveries);
        };
        let sent = deliveries.len() as isize;
        mailbox.window.pending.fetch_add(sent, Ordering::SeqCst);
        mailbox.tx.send(deliveries).map_err(|e| e.0)
    }

    fn remove(&self, holder: i64) {
        self.lock().remove(&holder);
    }
}

/// A stream's end of [`Routes`]: the deliveries other streams' leases
/// leased to it.
#[derive(Debug)]
pub struct Route {
    holder: i64,
    routes: Routes,
    window: Arc<Window>,
    rx: mpsc::UnboundedReceiver<Vec<Delivery>>,
    open: bool,
}

impl Route {
    /// Says how many more messages the stream's window has room for, by
    /// its own count (what it was sent and has not counted yet is taken off
    /// by the leases looking). A stream about to lease says so first,
    /// without what it asks for, so that its window is not filled twice.
    pub fn set_room(&self, room: usize) {
        let room = isize::try_from(room).unwrap_or(isize::MAX);
        self.window.free.store(room, Ordering::SeqCst);
    }

    /// Says the stream counted `count` messages it was sent (after saying
    /// its room with them counted).
    pub fn counted(&self, count: usize) {
        let count = isize::try_from(count).unwrap_or(isize::MAX);
        self.window.pending.fetch_sub(count, Ordering::SeqCst);
    }

    /// The next deliveries leased to the stream; pending for ever once
    /// closed.
    pub async fn recv(&mut self) -> Vec<Delivery> {
        if self.open
            && let Some(deliveries) = self.rx.recv().await
        {
            return deliveries;
        }
        std::future::pending().await
    }

    /// The deliveries waiting, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<Vec<Delivery>> {
        self.rx.try_recv().ok()
    }

    /// Takes no more deliveries; returns those sent and not yet received,
    /// which the stream must give back.
    pub fn close(&mut self) -> Vec<Delivery> {
        self.routes.remove(self.holder);
        self.open = false;
        self.rx.close();
        let mut left = Vec::new();
        while let Ok(deliveries) = self.rx.try_recv() {
            left.extend(deliveries);
        }
        left
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        self.routes.remove(self.holder);
    }
}
