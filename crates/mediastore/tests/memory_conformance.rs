//! The conformance suite against the in-memory engine.

use mediastore::conformance::{Engine, Setup};
use mediastore::{MemoryStore, Result};

struct Memory;

impl Engine for Memory {
    type Store = MemoryStore;

    async fn open(&self, setup: &Setup) -> Result<MemoryStore> {
        let mut b = MemoryStore::builder()
            .owned_root(&setup.owned_root)
            .clock(setup.clock.clone());
        if let Some(max_age) = setup.max_age {
            b = b.max_age(max_age);
        }
        b.build()
    }
}

mediastore::conformance_tests!(Memory);
