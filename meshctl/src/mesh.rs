//! `meshctl config` (config entries, as `consul config` does, plus
//! `apply --wait`: until every sidecar has applied the change) and
//! `meshctl mesh status` (every sidecar and the config it runs).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use super::{Ctl, CtlError, encode_segment, io_err, print_json, print_table, str_field};

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Create or replace the config entry in FILE (JSON, as `PUT
    /// /v1/config` takes it; "-" reads standard input).
    Apply {
        file: PathBuf,
        /// Only if the entry's ModifyIndex is this (0: only if absent).
        #[arg(long)]
        cas: Option<u64>,
        /// Then wait until every connected sidecar has applied it (up to
        /// DURATION, 10s if not given); exit code 6 if some have not.
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "10s")]
        wait: Option<String>,
    },
    /// Print one entry.
    Read { kind: String, name: String },
    /// List the entries of one kind.
    List { kind: String },
    /// Delete an entry.
    Delete {
        kind: String,
        name: String,
        /// Then wait as `apply --wait` does.
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "10s")]
        wait: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MeshCommand {
    /// Every sidecar: the server it reports to, the config index it has
    /// applied, when it last reported, what it refused.
    Status,
}

/// How long `--wait` waits, parsed.
pub(crate) fn wait_duration(text: &str) -> Result<Duration, CtlError> {
    meshwork_core::duration::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            CtlError::Usage(format!(
                "invalid --wait {text:?}: want a duration such as 10s or 1m"
            ))
        })
}

impl ConfigCommand {
    /// The wait asked for, if any (the request timeout must cover it).
    pub(crate) fn wait(&self) -> Option<&str> {
        match self {
            ConfigCommand::Apply { wait, .. } | ConfigCommand::Delete { wait, .. } => {
                wait.as_deref()
            }
            _ => None,
        }
    }
}

fn read_file(file: &PathBuf) -> Result<Vec<u8>, CtlError> {
    if file.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
            .map_err(|e| CtlError::Usage(format!("cannot read standard input: {e}")))?;
        return Ok(body);
    }
    std::fs::read(file).map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", file.display())))
}

impl Ctl {
    pub(crate) async fn config(
        &self,
        cmd: ConfigCommand,
        out: &mut dyn Write,
    ) -> Result<(), CtlError> {
        match cmd {
            ConfigCommand::Apply { file, cas, wait } => {
                let body = read_file(&file)?;
                let entry: Value = serde_json::from_slice(&body).map_err(|e| {
                    CtlError::Usage(format!(
                        "{} is not a JSON config entry: {e}",
                        file.display()
                    ))
                })?;
                let (kind, name) = (str_field(&entry, "Kind"), str_field(&entry, "Name"));
                let path = match cas {
                    Some(cas) => format!("/v1/config?cas={cas}"),
                    None => "/v1/config".to_owned(),
                };
                let reply = self.client.send(Method::PUT, &path, body.clone()).await?;
                let index = reply.index;
                let written = reply.json()?;
                if written == Value::Bool(false) {
                    return Err(CtlError::Server(format!(
                        "{kind} {name:?} not written: its ModifyIndex is not {} (check-and-set)",
                        cas.unwrap_or(0)
                    )));
                }
                writeln!(
                    out,
                    "{kind} {name:?} written at index {}",
                    index.unwrap_or(0)
                )
                .map_err(io_err)?;
                self.wait_applied(index, wait.as_deref(), out).await
            }
            ConfigCommand::Read { kind, name } => {
                let path = format!(
                    "/v1/config/{}/{}",
                    encode_segment(&kind),
                    encode_segment(&name)
                );
                let entry = self.get_json(&path).await?;
                print_json(out, &entry)
            }
            ConfigCommand::List { kind } => {
                let entries = self
                    .get_json(&format!("/v1/config/{}", encode_segment(&kind)))
                    .await?;
                if self.json {
                    return print_json(out, &entries);
                }
                let rows: Vec<Vec<String>> = entries
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            str_field(e, "Name").to_owned(),
                            e.get("ModifyIndex")
                                .map(Value::to_string)
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(out, &["NAME", "MODIFY-INDEX"], &rows)
            }
            ConfigCommand::Delete { kind, name, wait } => {
                let path = format!(
                    "/v1/config/{}/{}",
                    encode_segment(&kind),
                    encode_segment(&name)
                );
                let reply = self.client.send(Method::DELETE, &path, Vec::new()).await?;
                let index = reply.index;
                reply.ok()?;
                writeln!(
                    out,
                    "{kind} {name:?} deleted at index {}",
                    index.unwrap_or(0)
                )
                .map_err(io_err)?;
                self.wait_applied(index, wait.as_deref(), out).await
            }
        }
    }

    /// With `wait`: asks `/v1/mesh/propagation` until every sidecar has
    /// applied `index`; an incomplete answer lists who has not.
    async fn wait_applied(
        &self,
        index: Option<u64>,
        wait: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<(), CtlError> {
        let Some(wait) = wait else {
            return Ok(());
        };
        let wait = wait_duration(wait)?;
        let index = index.ok_or_else(|| {
            CtlError::Server(
                "the registry did not say the write's index (X-Consul-Index); cannot wait".into(),
            )
        })?;
        let path = format!(
            "/v1/mesh/propagation?index={index}&wait={}ms",
            wait.as_millis()
        );
        let answer = self.get_json(&path).await?;
        if self.json {
            print_json(out, &answer)?;
        }
        let count = |key: &str| answer.get(key).and_then(Value::as_u64).unwrap_or(0);
        let complete = answer.get("Complete").and_then(Value::as_bool) == Some(true);
        if complete {
            if !self.json {
                writeln!(
                    out,
                    "applied by {}/{} sidecars in {}ms",
                    count("Applied"),
                    count("Sidecars"),
                    count("ElapsedMs")
                )
                .map_err(io_err)?;
            }
            return Ok(());
        }
        let mut why = format!(
            "index {index} applied by {}/{} sidecars after {:?}",
            count("Applied"),
            count("Sidecars"),
            wait
        );
        let list = |key: &str| {
            answer
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        for pending in list("Pending") {
            why.push_str(&format!(
                "\n  behind: {} on {} (applied {}; {})",
                str_field(&pending, "ServiceID"),
                str_field(&pending, "Node"),
                pending
                    .get("AppliedIndex")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                pending
                    .get("Kinds")
                    .and_then(Value::as_array)
                    .map(|k| k
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ));
        }
        for refused in list("Refused") {
            for entry in refused
                .get("Refused")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                why.push_str(&format!(
                    "\n  refused: {} on {}: {}: {}",
                    str_field(&refused, "ServiceID"),
                    str_field(&refused, "Node"),
                    str_field(entry, "Scope"),
                    str_field(entry, "Reason")
                ));
            }
        }
        for server in list("Unreachable") {
            why.push_str(&format!(
                "\n  server not answering (its sidecars unknown): {}",
                server.as_str().unwrap_or("")
            ));
        }
        Err(CtlError::Incomplete(why))
    }

    pub(crate) async fn mesh(&self, cmd: MeshCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            MeshCommand::Status => {
                let fleet = self.get_json("/v1/mesh/sidecars").await?;
                if self.json {
                    return print_json(out, &fleet);
                }
                let index = fleet.get("Index").and_then(Value::as_u64).unwrap_or(0);
                let sidecars = fleet
                    .get("Sidecars")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let rows: Vec<Vec<String>> = sidecars
                    .iter()
                    .map(|s| {
                        let applied = s.get("AppliedIndex").and_then(Value::as_u64).unwrap_or(0);
                        let connected = s.get("Connected").and_then(Value::as_bool) == Some(true);
                        let ago = s.get("LastReportMs").and_then(Value::as_u64).unwrap_or(0);
                        let refused = s
                            .get("Refused")
                            .and_then(Value::as_array)
                            .map(|r| {
                                r.iter()
                                    .map(|e| {
                                        format!(
                                            "{}: {}",
                                            str_field(e, "Scope"),
                                            str_field(e, "Reason")
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            })
                            .unwrap_or_default();
                        vec![
                            str_field(s, "Service").to_owned(),
                            str_field(s, "ServiceID").to_owned(),
                            str_field(s, "Node").to_owned(),
                            str_field(s, "Address").to_owned(),
                            str_field(s, "Server").to_owned(),
                            if applied >= index {
                                format!("{applied} (current)")
                            } else {
                                format!("{applied} (behind {index})")
                            },
                            if connected {
                                format!("{:.1}s ago", ago as f64 / 1000.0)
                            } else {
                                format!("disconnected {:.0}s", ago as f64 / 1000.0)
                            },
                            str_field(s, "Version").to_owned(),
                            if refused.is_empty() {
                                "-".into()
                            } else {
                                refused
                            },
                        ]
                    })
                    .collect();
                writeln!(out, "config index {index}").map_err(io_err)?;
                print_table(
                    out,
                    &[
                        "SERVICE", "ID", "NODE", "ADDRESS", "SERVER", "APPLIED", "REPORTED",
                        "VERSION", "REFUSED",
                    ],
                    &rows,
                )?;
                for server in fleet
                    .get("Unreachable")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    writeln!(
                        out,
                        "server {} did not answer: its sidecars are not listed",
                        server.as_str().unwrap_or("")
                    )
                    .map_err(io_err)?;
                }
                Ok(())
            }
        }
    }
}
