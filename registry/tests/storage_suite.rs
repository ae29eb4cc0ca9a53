//! openraft's storage conformance suite against our log store (WAL + metadata file) and
//! state machine, each test on a fresh temp dir.

use meshwork_registry::raft::TypeConfig;
use meshwork_registry::raft::log_store::LogStore;
use meshwork_registry::raft::state_machine::StateMachineStore;
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open_with_segment_size(
            &dir.path().join("raft-meta"),
            &dir.path().join("wal"),
            64 * 1024,
        )
        .expect("log store");
        let sm = StateMachineStore::open(&dir.path().join("snapshot"))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn log_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage suite failed: {e}");
    }
}
