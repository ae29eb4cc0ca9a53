//! The first start of a cluster with ACLs: either the operator bootstraps
//! (`meshctl acl bootstrap`), and the leader says so in its log until
//! someone does, or a server given `--acl-bootstrap-file` bootstraps by
//! itself and leaves the management token's SecretID in that file.
//!
//! The secret is written (mode 0600, synced) before it is proposed, so a
//! crash in between never leaves a cluster bootstrapped with a token
//! nobody has: on restart the file's secret is proposed again. A server
//! that loses the race to another one removes its file (the winner's file
//! holds the token).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::RegistryNode;
use crate::command::{Command, CommandResponse};
use crate::state::acl::{GLOBAL_MANAGEMENT_ID, Token};

/// How often the task looks again while there is no leader or a write
/// fails.
const RETRY: Duration = Duration::from_secs(1);

/// Runs until the cluster is bootstrapped (or shutdown).
pub async fn run(node: Arc<RegistryNode>, file: Option<PathBuf>, shutdown: CancellationToken) {
    let mut told = false;
    loop {
        if node.state.read().acl.bootstrapped_at().is_some() {
            return;
        }
        match &file {
            None => {
                if node.is_leader() && !told {
                    tracing::warn!(
                        "ACLs are enabled and not bootstrapped yet: every request is refused \
                         until an operator runs `meshctl acl bootstrap` (or starts a server \
                         with --acl-bootstrap-file)"
                    );
                    told = true;
                }
            }
            Some(path) if node.leader().is_some() => match bootstrap(&node, path).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "ACL bootstrap failed; retrying");
                }
            },
            Some(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One attempt: true when the cluster is bootstrapped (by us or another).
async fn bootstrap(node: &RegistryNode, path: &Path) -> Result<bool, String> {
    let secret = secret_in(path)?;
    let token = Token {
        accessor_id: crate::storage::datadir::new_uuid(),
        secret_id: secret.clone(),
        description: "Bootstrap Token (Global Management)".to_owned(),
        policies: vec![GLOBAL_MANAGEMENT_ID.to_owned()],
        create_time_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        ..Token::default()
    };
    let applied = node
        .write(Command::AclBootstrap(Box::new(token)))
        .await
        .map_err(|e| e.to_string())?;
    match applied.response {
        CommandResponse::Applied(true) => {
            tracing::info!(file = %path.display(), "ACLs bootstrapped: the management token's SecretID is in the file");
            Ok(true)
        }
        CommandResponse::Refused(_) => {
            let ours = node.state.read().acl.token_by_secret(&secret).is_some();
            if !ours {
                // Another server (or an operator) was first; this file
                // holds a secret that grants nothing.
                let _ = std::fs::remove_file(path);
                tracing::info!(file = %path.display(), "ACLs were bootstrapped elsewhere; removed this server's unused bootstrap file");
            }
            Ok(true)
        }
        other => Err(format!("unexpected answer to the bootstrap: {other:?}")),
    }
}

/// The secret to propose: the file's (a retry after a crash), or a new
/// one written to it first (0600, synced).
fn secret_in(path: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // Only a file this server wrote is trusted (its own, 0600): a
            // file planted by someone else would name their secret.
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let uid = rustix::process::geteuid().as_raw();
            if meta.uid() != uid || meta.mode() & 0o077 != 0 {
                return Err(format!(
                    "{} exists but was not written by this server (owner {}, mode {:o}; \
                     expected uid {uid}, mode 600): move it away",
                    path.display(),
                    meta.uid(),
                    meta.mode() & 0o777
                ));
            }
            let secret = text.trim();
            if secret.len() != 36 {
                return Err(format!(
                    "{} exists but does not hold a bootstrap SecretID; move it away",
                    path.display()
                ));
            }
            return Ok(secret.to_owned());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let secret = crate::storage::datadir::new_uuid();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| crate::storage::durable::sync_all(&file))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = crate::storage::durable::sync_dir(dir);
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_written_before_use_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("management-token");
        let first = secret_in(&path).expect("new");
        let mode = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .expect("metadata");
        assert_eq!(mode, 0o600);
        assert_eq!(secret_in(&path).expect("again"), first, "a retry reuses it");
        std::fs::write(&path, "junk").expect("write");
        assert!(
            secret_in(&path).is_err(),
            "a foreign file is not overwritten"
        );
    }
}
