//! The expiry sweeper: sleeps until the soonest lease deadline, expires due
//! leases and closes their bridges `1008 "lease expired"`.

use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::watch;

use crate::app::Shared;
use crate::clock::iso;
use crate::store;

/// Upper bound on one sleep, so a wall-clock jump is noticed within this time
/// even when nothing wakes the sweeper.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Expire every live lease whose deadline has passed; returns their ids.
fn expire_due(c: &mut Connection, now: i64) -> anyhow::Result<Vec<String>> {
    let tx = c.transaction()?;
    let mut ids = Vec::new();
    for mut lease in store::due_leases(&tx, now)? {
        let at = iso(now);
        lease.state = "expired".into();
        lease.updated_at = at.clone();
        lease.ended_at = Some(at);
        store::put_lease(&tx, &lease)?;
        store::clear_egress(&tx, &lease.id)?;
        ids.push(lease.id);
    }
    tx.commit()?;
    Ok(ids)
}

/// Run until `stop` flips.
pub(crate) async fn run(st: Shared, mut stop: watch::Receiver<bool>) {
    loop {
        let now = st.clock.now_ms();
        let mut sleep = MAX_SLEEP;
        match st
            .store
            .call(move |c| Ok((expire_due(c, now)?, store::next_expiry(c)?)))
            .await
        {
            Ok((expired, next)) => {
                for id in expired {
                    tracing::info!(lease = %id, "lease expired");
                    st.egress.end_lease(&id, 1008, "lease expired").await;
                    st.changed(Some(&id), None);
                }
                if let Some(next) = next {
                    let wait = (next - st.clock.now_ms()).max(0) as u64;
                    sleep = sleep.min(Duration::from_millis(wait));
                }
            }
            Err(err) => {
                tracing::warn!(err = %format!("{err:#}"), "expiry sweep failed");
                sleep = Duration::from_secs(1);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = st.sweeper_wake.notified() => {}
            _ = st.clock.advanced() => {}
            _ = stop.changed() => return,
        }
    }
}
