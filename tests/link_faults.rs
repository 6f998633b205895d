//! The link misbehaves: cut mid-transfer between sender and receiver, and stalled between
//! sender and coordinator for longer than the lease timeout. The move completes, source equals
//! target, and no chunk is applied twice: a sender whose lease expired during the stall cannot
//! commit (the receiver's fencing check refuses it) and the chunk goes out again.

mod common;

use std::time::Duration;

use common::moves::{self, Setup};

#[test]
fn cuts_between_sender_and_receiver() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        link_to_receiver: true,
        ..Default::default()
    })?;
    let link = m.to_receiver.as_ref().expect("link");
    let mut done = m.wait_for_chunks(2)?;
    // Cut three times, each a little way into whatever is crossing: mid-block and mid-frame.
    for bytes in [150_000, 700_000, 40_000] {
        let cuts = link.cuts();
        link.cut_after(bytes);
        while link.cuts() == cuts {
            std::thread::sleep(Duration::from_millis(20));
        }
        done = m.wait_for_chunks(done + 2)?;
    }
    assert!(link.cuts() >= 3);
    m.finish()?;
    Ok(())
}

#[test]
fn stall_longer_than_the_lease_timeout() -> anyhow::Result<()> {
    let m = moves::start(Setup {
        link_to_receiver: true,
        link_to_coordinator: true,
        lease_timeout: Some("3s"),
        ..Default::default()
    })?;
    let (to_coordinator, to_receiver) = (
        m.to_coordinator.as_ref().expect("link"),
        m.to_receiver.as_ref().expect("link"),
    );
    let done = m.wait_for_chunks(3)?;
    // For 8 s no renewal reaches the coordinator, and the chunks in flight crawl to the
    // receiver: their leases expire before they can commit. The receiver's fencing check
    // refuses them (or the sender learns of the revocation first and stops, or the chunk's new
    // lease reaches the receiver first and its stream takes the chunk over); they go out again.
    to_receiver.set_rate(20_000);
    to_coordinator.stall(true);
    std::thread::sleep(Duration::from_secs(8));
    to_coordinator.stall(false);
    to_receiver.set_rate(0);
    m.wait_for_chunks(done + 3)?;
    m.finish()?;
    let sender = m.sender.log_text();
    let fenced = sender.matches("lease is no longer current").count()
        + sender.matches("was revoked").count()
        + sender
            .matches("a stream under a newer lease took over")
            .count();
    assert!(
        fenced > 0,
        "expected a fenced or revoked transfer during the stall; sender log:\n{sender}"
    );
    assert!(m.coordinator.log_text().contains("lease expired"));
    Ok(())
}
