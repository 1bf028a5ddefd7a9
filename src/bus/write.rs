//! A bus's writes to the store: every poll's batch in order, behind what the store could not
//! take before. While the store cannot write (a full or failing disk) batches wait in the
//! bus's [`super::spill`], bounded; what it had to give up is reported once the store takes
//! writes again.

use std::sync::Arc;

use jiff::tz::TimeZone;
use tokio::sync::Notify;

use super::spill::Spill;
use crate::clock::SharedClock;
use crate::reading::{EventKind, Stamp, SystemEvent};
use crate::store::{Append, Store, StoreError};

/// Readings kept in memory per bus while the store cannot write (about 10 MiB).
pub const SPILL_READINGS: usize = 100_000;

/// What the writes of one bus share.
pub struct Writer {
    pub bus: String,
    pub store: Arc<dyn Store>,
    /// Poked after every append: the drain has something new.
    pub wake: Arc<Notify>,
    pub clock: SharedClock,
    pub tz: TimeZone,
    /// What the store could not take yet. Held while it is written back, so that nothing of
    /// this bus overtakes what waits in it; not held while a poll's own batch is appended,
    /// so that the bus's polls that end together share the store's group commit.
    pub spill: tokio::sync::Mutex<Spill>,
    /// The bus's counters, when metrics are on.
    pub metrics: Option<Arc<crate::metrics::BusMetrics>>,
}

impl Writer {
    pub fn new(
        bus: &str,
        store: Arc<dyn Store>,
        wake: Arc<Notify>,
        clock: SharedClock,
        tz: TimeZone,
    ) -> Self {
        Writer {
            bus: bus.to_owned(),
            store,
            wake,
            clock,
            tz,
            spill: tokio::sync::Mutex::new(Spill::new(SPILL_READINGS)),
            metrics: crate::metrics::global().map(|m| m.bus(bus)),
        }
    }
}

/// Writes a poll's batch to the store, behind anything the store could not take before.
/// If the store cannot write now (a full or failing disk), the batch waits in the bus's
/// spill and `false` is returned: not durable yet, but not lost either.
///
/// The spill's lock is let go before the append itself, so the bus's polls that end at the
/// same time are appended together (the store's group commit: one batch, one fsync), not one
/// after the other. A meter's readings still reach the store in the order they were read:
/// its next poll starts only after this one returned, and a batch that fails goes into the
/// spill, which every later append writes back first.
pub async fn store_append(ctx: &Writer, batch: Append) -> bool {
    if batch.is_empty() {
        return true;
    }
    {
        let mut spill = ctx.spill.lock().await;
        if !flush_spill(ctx, &mut spill).await {
            keep(ctx, &mut spill, batch);
            return false;
        }
    }
    let readings = batch.readings.len();
    // Shared with the store, not copied: kept here for the spill should the append fail.
    let batch = Arc::new(batch);
    match append(ctx, batch.clone()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(bus = %ctx.bus, error = %e, readings, "Store cannot write: keeping the readings in memory until it can");
            keep(
                ctx,
                &mut *ctx.spill.lock().await,
                Arc::unwrap_or_clone(batch),
            );
            false
        }
    }
}

fn keep(ctx: &Writer, spill: &mut Spill, batch: Append) {
    let dropped = spill.push(batch);
    if dropped > 0 {
        tracing::error!(bus = %ctx.bus, dropped, kept = spill.readings(), "Readings lost: the store cannot write and the memory spill is full");
    }
}

/// Writes what the spill holds, oldest first; `true` once it is empty. Reports readings the
/// spill had to give up, once the store takes writes again.
pub async fn flush_spill(ctx: &Writer, spill: &mut Spill) -> bool {
    let had = spill.readings();
    while let Some(front) = spill.front() {
        if append(ctx, Arc::new(front.clone())).await.is_err() {
            return false;
        }
        spill.pop_front();
    }
    if had > 0 {
        tracing::info!(bus = %ctx.bus, readings = had, "The store takes writes again: kept readings stored");
    }
    let dropped = spill.take_dropped();
    if dropped > 0 {
        let now = Stamp::in_zone(ctx.clock.now(), &ctx.tz);
        let event = SystemEvent::new(
            EventKind::StoreError,
            now,
            format!("{dropped} readings were lost on bus {}: the store could not write and the memory spill was full", ctx.bus),
        )
        .bus(ctx.bus.clone())
        .detail("lost_readings", dropped);
        let _ = append(
            ctx,
            Arc::new(Append {
                events: vec![event],
                ..Append::default()
            }),
        )
        .await;
    }
    true
}

async fn append(ctx: &Writer, batch: Arc<Append>) -> Result<(), StoreError> {
    let readings = batch.readings.len();
    // Counted once durable; a poll's readings share one cadence.
    let cadence = batch.readings.first().map(|r| r.cadence);
    // Not on a blocking thread of its own: a thousand polls ending at one boundary wait for
    // their group commit without a thread each.
    match ctx.store.clone().append_async(batch).await {
        Ok(a) => {
            if readings > 0 {
                // Which sequence numbers are now durable (fsynced): the crash and power-cut
                // tests hold the agent to them, from this event's fields.
                tracing::debug!(bus = %ctx.bus, first_seq = a.seqs[0], readings, "Buffered");
            }
            ctx.wake.notify_one();
            if let (Some(m), Some(c)) = (&ctx.metrics, cadence) {
                m.buffered(c, readings);
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}
