//! openraft's storage conformance suite against our sled log store and
//! state machine, each test on a fresh sled database in a temp dir.

use meshwork_registry::raft::TypeConfig;
use meshwork_registry::raft::log_store::SledLogStore;
use meshwork_registry::raft::state_machine::StateMachineStore;
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join("raft")).expect("open sled");
        let log = SledLogStore::open(&db, &dir.path().join("raft")).expect("log store");
        let sm = StateMachineStore::open(&dir.path().join("snapshot"))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {e}");
    }
}
