//! The conformance suite against the durable engine, unchanged.

use mediastore::conformance::{Engine, Setup};
use mediastore::{DurableStore, Result};

struct Durable;

impl Engine for Durable {
    type Store = DurableStore;

    async fn open(&self, setup: &Setup) -> Result<DurableStore> {
        let mut b = DurableStore::builder(&setup.data_dir)
            .owned_root(&setup.owned_root)
            .clock(setup.clock.clone());
        if let Some(max_age) = setup.max_age {
            b = b.max_age(max_age);
        }
        b.open()
    }
}

mediastore::conformance_tests!(Durable);
