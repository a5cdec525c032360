//! The race scenario can fail: a faithful port of the seed fails it.
//!
//! DESIGN.md §3.1 says the Go seed's `ReleaseAll` drops a file's last ref
//! under its lock, unlocks, and only then unlinks the file; a concurrent
//! `Store` of the same file whose `os.Stat` ran before the unlink registers
//! after the release and gets a ref to a deleted file. The conformance
//! scenario [`release_store_race`] claims to run enough contested rounds to
//! catch that design. A scenario that every engine passes proves nothing
//! unless it can also fail, so this file ports the seed's algorithm —
//! faithfully and minimally, with no sleeps or widened windows — as
//! [`SeedStore`], runs the unchanged scenario against it, and asserts that
//! the scenario panics with its "a live ref pointed at a deleted file"
//! message. `memory_conformance.rs` runs the same scenario against our
//! engine, which must pass it.
//!
//! The port mirrors `FileMediaStore` of the seed: one reader-writer lock over
//! the same maps (refs, scope → refs, ref → scope, ref → path, and a per-path
//! ref count with the delete-eligible flag, keyed by the path *string*);
//! `store` stats the file before taking the lock; `release_all` and
//! `clean_expired` collect removable paths under the lock, unlock, then
//! unlink. Operations the seed lacks (`retain`, `touch`, per-scope expiry)
//! are inert.
//!
//! [`release_store_race`]: mediastore::conformance::release_store_race

use mediastore::Result;
use mediastore::conformance::seed_port::SeedStore;
use mediastore::conformance::{Engine, Setup};

struct SeedEngine;

impl Engine for SeedEngine {
    type Store = SeedStore;

    async fn open(&self, setup: &Setup) -> Result<SeedStore> {
        Ok(SeedStore::new(setup.max_age, setup.clock.clone()))
    }
}

/// The port is the seed: it passes a plain store/release round trip, so a
/// failure of the race scenario is the race, not a broken port.
#[test]
fn seed_port_round_trips() {
    mediastore::conformance::block_on(mediastore::conformance::peer_04_shared_file_counts(
        &SeedEngine,
    ));
    mediastore::conformance::block_on(mediastore::conformance::peer_05_forget_only_pins(
        &SeedEngine,
    ));
}

#[test]
fn seed_design_fails_release_store_race() {
    let outcome = std::panic::catch_unwind(|| {
        mediastore::conformance::block_on(mediastore::conformance::release_store_race(&SeedEngine));
    });
    let payload = outcome.expect_err("the seed's design passed the race scenario");
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("<non-string panic payload>");
    assert!(
        message.contains("a live ref pointed at a deleted file"),
        "the scenario failed, but not by catching the race: {message}"
    );
}
