//! `meshctl acl …`: Consul's ACL commands over `/v1/acl/*` — bootstrap,
//! tokens and policies — printed as `consul acl` prints them, or the
//! server's JSON with `--json`.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{Map, Value, json};

use super::client::Reply;
use super::{Ctl, CtlError, encode_segment, io_err, print_json, str_field};

/// The hint added when the request's token is unknown or not allowed.
const TOKEN_HINT: &str = "check --token, --token-file or MESHWORK_HTTP_TOKEN";

#[derive(Debug, Subcommand)]
pub(crate) enum AclCommand {
    /// Create the cluster's first management token (allowed once); prints
    /// its SecretID, to keep safe.
    Bootstrap,
    /// Create, list, read and delete tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create and list policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token linked to policies, roles and identities.
    Create(TokenCreate),
    /// Every token (SecretIDs show only to a token with acl:write).
    List,
    /// One token, by AccessorID or the request's own (--self).
    Read(TokenRead),
    /// Delete a token by AccessorID.
    Delete {
        /// The token's AccessorID.
        #[arg(long, value_name = "ACCESSOR", value_parser = non_empty)]
        id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct TokenCreate {
    /// A description for the token.
    #[arg(long)]
    description: Option<String>,
    /// Link the policy with this name (repeatable).
    #[arg(long = "policy-name", value_name = "NAME", value_parser = non_empty)]
    policy_names: Vec<String>,
    /// Link the policy with this ID (repeatable).
    #[arg(long = "policy-id", value_name = "ID", value_parser = non_empty)]
    policy_ids: Vec<String>,
    /// Link the role with this name (repeatable).
    #[arg(long = "role-name", value_name = "NAME", value_parser = non_empty)]
    role_names: Vec<String>,
    /// Link the role with this ID (repeatable).
    #[arg(long = "role-id", value_name = "ID", value_parser = non_empty)]
    role_ids: Vec<String>,
    /// A service identity, valid in every datacenter or only in those
    /// listed (repeatable).
    #[arg(long = "service-identity", value_name = "NAME[:DC1,DC2]", value_parser = service_identity)]
    service_identities: Vec<ServiceIdentity>,
    /// A node identity for a node in a datacenter (repeatable).
    #[arg(long = "node-identity", value_name = "NODE:DC", value_parser = node_identity)]
    node_identities: Vec<NodeIdentity>,
    /// Make the token expire after this long (e.g. 30m, 1h; at most 24h).
    #[arg(long = "expires-ttl", value_name = "DURATION", value_parser = ttl)]
    expires_ttl: Option<String>,
    /// Keep the token in this datacenter only.
    #[arg(long)]
    local: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "self_token"])))]
pub(crate) struct TokenRead {
    /// The token's AccessorID.
    #[arg(long, value_name = "ACCESSOR", value_parser = non_empty)]
    id: Option<String>,
    /// Read the token meshctl sends (--token), secret included.
    #[arg(long = "self", id = "self_token")]
    self_token: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Create a policy from rules (HCL or JSON).
    Create(PolicyCreate),
    /// Every policy, without its rules.
    List,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("rules_source").required(true).args(["rules", "rules_file"])))]
pub(crate) struct PolicyCreate {
    /// The policy's name (letters, digits, '-' and '_').
    #[arg(long, value_parser = non_empty)]
    name: String,
    /// A description for the policy.
    #[arg(long)]
    description: Option<String>,
    /// The rules, as text (e.g. 'key_prefix "app/" { policy = "read" }').
    #[arg(long, value_name = "TEXT")]
    rules: Option<String>,
    /// Read the rules from FILE ("-": standard input).
    #[arg(long = "rules-file", value_name = "FILE")]
    rules_file: Option<PathBuf>,
    /// Only valid in this datacenter (repeatable; default: all).
    #[arg(long, value_name = "DC", visible_alias = "valid-datacenter", value_parser = non_empty)]
    datacenter: Vec<String>,
}

/// `--service-identity NAME[:DC1,DC2]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceIdentity {
    name: String,
    datacenters: Vec<String>,
}

/// `--node-identity NODE:DC`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeIdentity {
    node: String,
    datacenter: String,
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

fn service_identity(text: &str) -> Result<ServiceIdentity, String> {
    let (name, datacenters) = match text.split_once(':') {
        None => (text, Vec::new()),
        Some((name, list)) => {
            let datacenters: Vec<String> = list.split(',').map(|d| d.trim().to_owned()).collect();
            if datacenters.iter().any(String::is_empty) {
                return Err(
                    "want NAME or NAME:DC1,DC2 with no empty datacenter (e.g. web:dc1,dc2)"
                        .to_owned(),
                );
            }
            (name, datacenters)
        }
    };
    if name.trim().is_empty() {
        return Err("want NAME or NAME:DC1,DC2 (e.g. web or web:dc1)".to_owned());
    }
    Ok(ServiceIdentity {
        name: name.to_owned(),
        datacenters,
    })
}

fn node_identity(text: &str) -> Result<NodeIdentity, String> {
    match text.split_once(':') {
        Some((node, datacenter))
            if !node.trim().is_empty()
                && !datacenter.trim().is_empty()
                && !datacenter.contains(':') =>
        {
            Ok(NodeIdentity {
                node: node.to_owned(),
                datacenter: datacenter.to_owned(),
            })
        }
        _ => Err("want NODE:DATACENTER (e.g. node-1:dc1)".to_owned()),
    }
}

fn ttl(text: &str) -> Result<String, String> {
    match meshwork_core::duration::parse_duration(text) {
        Some(d) if !d.is_zero() => Ok(text.to_owned()),
        _ => Err("want a duration such as 30m or 1h".to_owned()),
    }
}

/// The body of `PUT /v1/acl/token`, in Consul's shape.
fn token_create_body(args: &TokenCreate) -> Value {
    let mut body = Map::new();
    if let Some(description) = &args.description {
        body.insert("Description".into(), json!(description));
    }
    let policies: Vec<Value> = args
        .policy_ids
        .iter()
        .map(|id| json!({ "ID": id }))
        .chain(args.policy_names.iter().map(|name| json!({ "Name": name })))
        .collect();
    if !policies.is_empty() {
        body.insert("Policies".into(), Value::Array(policies));
    }
    let roles: Vec<Value> = args
        .role_ids
        .iter()
        .map(|id| json!({ "ID": id }))
        .chain(args.role_names.iter().map(|name| json!({ "Name": name })))
        .collect();
    if !roles.is_empty() {
        body.insert("Roles".into(), Value::Array(roles));
    }
    if !args.service_identities.is_empty() {
        let list = args
            .service_identities
            .iter()
            .map(|s| {
                let mut v = json!({ "ServiceName": s.name });
                if !s.datacenters.is_empty() {
                    v["Datacenters"] = json!(s.datacenters);
                }
                v
            })
            .collect();
        body.insert("ServiceIdentities".into(), Value::Array(list));
    }
    if !args.node_identities.is_empty() {
        let list = args
            .node_identities
            .iter()
            .map(|n| json!({ "NodeName": n.node, "Datacenter": n.datacenter }))
            .collect();
        body.insert("NodeIdentities".into(), Value::Array(list));
    }
    if let Some(ttl) = &args.expires_ttl {
        body.insert("ExpirationTTL".into(), json!(ttl));
    }
    if args.local {
        body.insert("Local".into(), json!(true));
    }
    Value::Object(body)
}

/// The body of `PUT /v1/acl/policy`.
fn policy_create_body(args: &PolicyCreate, rules: &str) -> Value {
    let mut body = json!({
        "Name": args.name,
        "Description": args.description.as_deref().unwrap_or(""),
        "Rules": rules,
    });
    if !args.datacenter.is_empty() {
        body["Datacenters"] = json!(args.datacenter);
    }
    body
}

/// The rules of `policy create`: `--rules` or `--rules-file` (`-`: stdin).
fn read_rules(args: &PolicyCreate) -> Result<String, CtlError> {
    if let Some(rules) = &args.rules {
        return Ok(rules.clone());
    }
    let Some(path) = &args.rules_file else {
        return Err(CtlError::Usage(
            "policy create needs --rules TEXT or --rules-file FILE".into(),
        ));
    };
    let bytes = if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .map_err(|e| CtlError::Usage(format!("cannot read the rules from stdin: {e}")))?;
        bytes
    } else {
        std::fs::read(path).map_err(|e| {
            CtlError::Usage(format!(
                "cannot read the rules from {}: {e}",
                path.display()
            ))
        })?
    };
    String::from_utf8(bytes).map_err(|_| {
        CtlError::Usage(format!(
            "the rules in {} are not UTF-8 text",
            path.display()
        ))
    })
}

/// Turns an ACL endpoint's answer into its JSON, or the server's own
/// message as the error. `not_found` says what Consul's 403 "ACL not
/// found" means for this request.
fn acl_json(reply: Reply, not_found: &str) -> Result<Value, CtlError> {
    if reply.status.is_success() {
        return serde_json::from_slice(&reply.body)
            .map_err(|e| CtlError::Server(format!("the registry sent invalid JSON: {e}")));
    }
    Err(acl_failure(
        reply.status,
        String::from_utf8_lossy(&reply.body).trim(),
        not_found,
    ))
}

fn acl_failure(status: StatusCode, message: &str, not_found: &str) -> CtlError {
    let message = if message.is_empty() {
        status.to_string()
    } else {
        message.to_owned()
    };
    match status {
        StatusCode::UNAUTHORIZED => CtlError::Server(format!(
            "{message} (the registry was not started with ACLs enabled)"
        )),
        StatusCode::FORBIDDEN if message == "ACL not found" => {
            CtlError::Server(format!("{message}: {not_found}"))
        }
        // A refused bootstrap is no token problem: the server's words.
        StatusCode::FORBIDDEN
            if message.starts_with("Permission denied")
                && !message.contains("ACL bootstrap no longer allowed") =>
        {
            CtlError::Server(format!("{message} ({TOKEN_HINT})"))
        }
        // Bootstrap refusals and the like: the server's words as they are.
        StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST => CtlError::Server(message),
        StatusCode::NOT_FOUND => CtlError::NotFound(message),
        status => CtlError::Server(format!("{}: {message}", status.as_u16())),
    }
}

/// What "ACL not found" means when the request's own token is the only
/// one looked up.
const UNKNOWN_TOKEN: &str =
    "the token sent (--token, --token-file or MESHWORK_HTTP_TOKEN) is unknown or has expired";

/// Appends `Label:  value`, the values aligned as `consul acl` aligns them.
fn field(text: &mut String, indent: &str, label: &str, value: &str) {
    let label = format!("{label}:");
    let line = format!(
        "{indent}{label:<width$}{value}",
        width = 14.max(label.len() + 1)
    );
    let _ = writeln!(text, "{}", line.trim_end());
}

fn links(value: &Value, key: &str) -> Vec<(String, String)> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|l| {
            (
                str_field(l, "ID").to_owned(),
                str_field(l, "Name").to_owned(),
            )
        })
        .collect()
}

fn strings(value: &Value, key: &str) -> Vec<String> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// A token as `consul acl token read` prints it.
pub(crate) fn format_token(token: &Value) -> String {
    let mut text = String::new();
    field(&mut text, "", "AccessorID", str_field(token, "AccessorID"));
    field(&mut text, "", "SecretID", str_field(token, "SecretID"));
    field(
        &mut text,
        "",
        "Description",
        str_field(token, "Description"),
    );
    if let Some(local) = token.get("Local").and_then(Value::as_bool) {
        field(&mut text, "", "Local", &local.to_string());
    }
    if let Some(at) = token.get("CreateTime").and_then(Value::as_str) {
        field(&mut text, "", "Create Time", at);
    }
    if let Some(at) = token.get("ExpirationTime").and_then(Value::as_str) {
        field(&mut text, "", "Expiration Time", at);
    }
    for (key, title) in [("Policies", "Policies"), ("Roles", "Roles")] {
        let list = links(token, key);
        if !list.is_empty() {
            let _ = writeln!(text, "{title}:");
            for (id, name) in list {
                let _ = writeln!(text, "   {id} - {name}");
            }
        }
    }
    let services: Vec<&Value> = token
        .get("ServiceIdentities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if !services.is_empty() {
        let _ = writeln!(text, "Service Identities:");
        for s in services {
            let dcs = strings(s, "Datacenters");
            let dcs = if dcs.is_empty() {
                "all".to_owned()
            } else {
                dcs.join(", ")
            };
            let _ = writeln!(
                text,
                "   {} (Datacenters: {dcs})",
                str_field(s, "ServiceName")
            );
        }
    }
    let nodes: Vec<&Value> = token
        .get("NodeIdentities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if !nodes.is_empty() {
        let _ = writeln!(text, "Node Identities:");
        for n in nodes {
            let _ = writeln!(
                text,
                "   {} (Datacenter: {})",
                str_field(n, "NodeName"),
                str_field(n, "Datacenter")
            );
        }
    }
    text
}

/// Tokens, one block each, blank lines between.
pub(crate) fn format_token_list(tokens: &Value) -> String {
    tokens
        .as_array()
        .into_iter()
        .flatten()
        .map(format_token)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A policy as `consul acl policy read` prints it (rules last, when the
/// answer has them).
pub(crate) fn format_policy(policy: &Value) -> String {
    let mut text = String::new();
    field(&mut text, "", "ID", str_field(policy, "ID"));
    field(&mut text, "", "Name", str_field(policy, "Name"));
    field(
        &mut text,
        "",
        "Description",
        str_field(policy, "Description"),
    );
    field(
        &mut text,
        "",
        "Datacenters",
        &strings(policy, "Datacenters").join(", "),
    );
    if let Some(rules) = policy.get("Rules").and_then(Value::as_str) {
        let _ = writeln!(text, "Rules:");
        text.push_str(rules);
        if !rules.is_empty() && !rules.ends_with('\n') {
            text.push('\n');
        }
    }
    text
}

/// Policies as `consul acl policy list` prints them.
pub(crate) fn format_policy_list(policies: &Value) -> String {
    let mut text = String::new();
    for policy in policies.as_array().into_iter().flatten() {
        let _ = writeln!(text, "{}:", str_field(policy, "Name"));
        field(&mut text, "   ", "ID", str_field(policy, "ID"));
        field(
            &mut text,
            "   ",
            "Description",
            str_field(policy, "Description"),
        );
        field(
            &mut text,
            "   ",
            "Datacenters",
            &strings(policy, "Datacenters").join(", "),
        );
    }
    text
}

impl Ctl {
    async fn acl_send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        not_found: &str,
    ) -> Result<Value, CtlError> {
        let body = match body {
            Some(v) => serde_json::to_vec(v)
                .map_err(|e| CtlError::Usage(format!("cannot encode the request: {e}")))?,
            None => Vec::new(),
        };
        let reply = self.client.send(method, path, body).await?;
        acl_json(reply, not_found)
    }

    /// Prints the server's JSON with `--json`, else `human(value)`.
    fn show(
        &self,
        out: &mut dyn Write,
        value: &Value,
        human: fn(&Value) -> String,
    ) -> Result<(), CtlError> {
        if self.json {
            return print_json(out, value);
        }
        out.write_all(human(value).as_bytes()).map_err(io_err)
    }

    pub(crate) async fn acl(&self, cmd: AclCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            AclCommand::Bootstrap => {
                let token = self
                    .acl_send(Method::PUT, "/v1/acl/bootstrap", None, UNKNOWN_TOKEN)
                    .await?;
                self.show(out, &token, format_token)
            }
            AclCommand::Token(cmd) => self.acl_token(cmd, out).await,
            AclCommand::Policy(cmd) => self.acl_policy(cmd, out).await,
        }
    }

    async fn acl_token(&self, cmd: TokenCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            TokenCommand::Create(args) => {
                let body = token_create_body(&args);
                let token = self
                    .acl_send(Method::PUT, "/v1/acl/token", Some(&body), UNKNOWN_TOKEN)
                    .await?;
                self.show(out, &token, format_token)
            }
            TokenCommand::List => {
                let tokens = self
                    .acl_send(Method::GET, "/v1/acl/tokens", None, UNKNOWN_TOKEN)
                    .await?;
                self.show(out, &tokens, format_token_list)
            }
            TokenCommand::Read(TokenRead { id, .. }) => {
                let token = match id {
                    Some(id) => {
                        let path = format!("/v1/acl/token/{}", encode_segment(&id));
                        let not_found = format!(
                            "no token has AccessorID {id:?}, or the token sent (--token, --token-file or MESHWORK_HTTP_TOKEN) is unknown or has expired"
                        );
                        self.acl_send(Method::GET, &path, None, &not_found).await?
                    }
                    None => {
                        self.acl_send(Method::GET, "/v1/acl/token/self", None, UNKNOWN_TOKEN)
                            .await?
                    }
                };
                self.show(out, &token, format_token)
            }
            TokenCommand::Delete { id } => {
                let path = format!("/v1/acl/token/{}", encode_segment(&id));
                let deleted = self
                    .acl_send(Method::DELETE, &path, None, UNKNOWN_TOKEN)
                    .await?;
                if deleted != Value::Bool(true) {
                    return Err(CtlError::NotFound(format!(
                        "no token has AccessorID {id:?} (see `meshctl acl token list`)"
                    )));
                }
                if self.json {
                    return print_json(out, &json!({ "AccessorID": id, "Deleted": true }));
                }
                writeln!(out, "Token {id:?} deleted successfully").map_err(io_err)
            }
        }
    }

    async fn acl_policy(&self, cmd: PolicyCommand, out: &mut dyn Write) -> Result<(), CtlError> {
        match cmd {
            PolicyCommand::Create(args) => {
                let rules = read_rules(&args)?;
                let body = policy_create_body(&args, &rules);
                let policy = self
                    .acl_send(Method::PUT, "/v1/acl/policy", Some(&body), UNKNOWN_TOKEN)
                    .await?;
                self.show(out, &policy, format_policy)
            }
            PolicyCommand::List => {
                let policies = self
                    .acl_send(Method::GET, "/v1/acl/policies", None, UNKNOWN_TOKEN)
                    .await?;
                self.show(out, &policies, format_policy_list)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT)
    }

    #[test]
    fn service_identities_parse() {
        assert_eq!(
            service_identity("web"),
            Ok(ServiceIdentity {
                name: "web".into(),
                datacenters: vec![]
            })
        );
        assert_eq!(
            service_identity("web:dc1, dc2"),
            Ok(ServiceIdentity {
                name: "web".into(),
                datacenters: vec!["dc1".into(), "dc2".into()]
            })
        );
        assert!(service_identity("").is_err());
        assert!(service_identity(":dc1").is_err());
        assert!(service_identity("web:").is_err());
        assert!(service_identity("web:dc1,,dc2").is_err());
    }

    #[test]
    fn node_identities_parse() {
        assert_eq!(
            node_identity("node-1:dc1"),
            Ok(NodeIdentity {
                node: "node-1".into(),
                datacenter: "dc1".into()
            })
        );
        for bad in ["node-1", "node-1:", ":dc1", "a:b:c", ""] {
            assert!(node_identity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ttls_are_checked() {
        assert_eq!(ttl("1h"), Ok("1h".to_owned()));
        assert_eq!(ttl("90s"), Ok("90s".to_owned()));
        assert!(ttl("0s").is_err());
        assert!(ttl("soon").is_err());
    }

    #[test]
    fn failures_keep_the_servers_words() {
        let bootstrap = acl_failure(
            status(403),
            "Permission denied: ACL bootstrap no longer allowed (reset index: 3)",
            UNKNOWN_TOKEN,
        );
        assert_eq!(
            bootstrap.to_string(),
            "Permission denied: ACL bootstrap no longer allowed (reset index: 3)"
        );
        assert_eq!(bootstrap.exit_code(), 1);

        let parse = acl_failure(
            status(400),
            "Failed to parse ACL rules: line 2, column 11: expected '='",
            UNKNOWN_TOKEN,
        );
        assert_eq!(
            parse.to_string(),
            "Failed to parse ACL rules: line 2, column 11: expected '='"
        );
        assert_eq!(parse.exit_code(), 1);

        let denied = acl_failure(
            status(403),
            "Permission denied: token with AccessorID 'a-1' lacks permission 'acl:write'",
            UNKNOWN_TOKEN,
        );
        assert!(denied.to_string().starts_with(
            "Permission denied: token with AccessorID 'a-1' lacks permission 'acl:write' (check --token"
        ));

        let unknown = acl_failure(status(403), "ACL not found", UNKNOWN_TOKEN);
        assert!(
            unknown
                .to_string()
                .starts_with("ACL not found: the token sent")
        );

        let disabled = acl_failure(status(401), "ACL support disabled", UNKNOWN_TOKEN);
        assert!(
            disabled
                .to_string()
                .starts_with("ACL support disabled (the registry")
        );
        assert_eq!(disabled.exit_code(), 1);

        let empty = acl_failure(status(500), "", UNKNOWN_TOKEN);
        assert_eq!(empty.to_string(), "500: 500 Internal Server Error");
    }

    fn bootstrap_token() -> Value {
        json!({
            "AccessorID": "3f8a1c2e-0000-4000-8000-000000000001",
            "SecretID": "9b1d2e3f-0000-4000-8000-000000000002",
            "Description": "Bootstrap Token (Global Management)",
            "Policies": [{
                "ID": "00000000-0000-0000-0000-000000000001",
                "Name": "global-management"
            }],
            "Local": false,
            "CreateTime": "2024-05-01T10:00:00Z",
            "Legacy": false,
            "CreateIndex": 7,
            "ModifyIndex": 7
        })
    }

    #[test]
    fn a_token_prints_as_consul_prints_it() {
        assert_eq!(
            format_token(&bootstrap_token()),
            "AccessorID:   3f8a1c2e-0000-4000-8000-000000000001\n\
             SecretID:     9b1d2e3f-0000-4000-8000-000000000002\n\
             Description:  Bootstrap Token (Global Management)\n\
             Local:        false\n\
             Create Time:  2024-05-01T10:00:00Z\n\
             Policies:\n   00000000-0000-0000-0000-000000000001 - global-management\n"
        );
    }

    #[test]
    fn a_token_with_everything_prints_every_section() {
        let token = json!({
            "AccessorID": "acc",
            "SecretID": "<hidden>",
            "Description": "",
            "Roles": [{ "ID": "r-1", "Name": "ops" }],
            "ServiceIdentities": [
                { "ServiceName": "web" },
                { "ServiceName": "db", "Datacenters": ["dc1", "dc2"] }
            ],
            "NodeIdentities": [{ "NodeName": "node-1", "Datacenter": "dc1" }],
            "Local": true,
            "CreateTime": "2024-05-01T10:00:00Z",
            "ExpirationTime": "2024-05-01T11:00:00Z"
        });
        assert_eq!(
            format_token(&token),
            "AccessorID:   acc\n\
             SecretID:     <hidden>\n\
             Description:\n\
             Local:        true\n\
             Create Time:  2024-05-01T10:00:00Z\n\
             Expiration Time: 2024-05-01T11:00:00Z\n\
             Roles:\n   r-1 - ops\n\
             Service Identities:\n   web (Datacenters: all)\n   db (Datacenters: dc1, dc2)\n\
             Node Identities:\n   node-1 (Datacenter: dc1)\n"
        );
    }

    #[test]
    fn token_lists_are_blocks_between_blank_lines() {
        let list =
            json!([bootstrap_token(), { "AccessorID": "b", "SecretID": "s", "Description": "d" }]);
        let text = format_token_list(&list);
        let blocks: Vec<&str> = text.split("\n\n").collect();
        assert_eq!(blocks.len(), 2, "{text}");
        assert!(blocks[0].starts_with("AccessorID:   3f8a1c2e"));
        assert_eq!(
            blocks[1],
            "AccessorID:   b\nSecretID:     s\nDescription:  d\n"
        );
        assert_eq!(format_token_list(&json!([])), "");
    }

    #[test]
    fn a_policy_prints_its_rules_last() {
        let policy = json!({
            "ID": "p-1",
            "Name": "kv-read",
            "Description": "read app/",
            "Rules": "key_prefix \"app/\" {\n  policy = \"read\"\n}",
            "Datacenters": ["dc1", "dc2"],
            "CreateIndex": 9,
            "ModifyIndex": 9
        });
        assert_eq!(
            format_policy(&policy),
            "ID:           p-1\n\
             Name:         kv-read\n\
             Description:  read app/\n\
             Datacenters:  dc1, dc2\n\
             Rules:\n\
             key_prefix \"app/\" {\n  policy = \"read\"\n}\n"
        );
    }

    #[test]
    fn policy_lists_name_each_policy() {
        let list = json!([
            { "ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management",
              "Description": "Builtin Policy that grants unlimited access" },
            { "ID": "p-1", "Name": "kv-read", "Description": "", "Datacenters": ["dc1"] }
        ]);
        assert_eq!(
            format_policy_list(&list),
            "global-management:\n\
             \x20  ID:           00000000-0000-0000-0000-000000000001\n\
             \x20  Description:  Builtin Policy that grants unlimited access\n\
             \x20  Datacenters:\n\
             kv-read:\n\
             \x20  ID:           p-1\n\
             \x20  Description:\n\
             \x20  Datacenters:  dc1\n"
        );
    }
}

#[cfg(test)]
mod parse_tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn acl(args: &[&str]) -> AclCommand {
        let argv = ["meshctl", "acl"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Acl(cmd),
                ..
            }) => cmd,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn token_create_sends_consuls_body() {
        let AclCommand::Token(TokenCommand::Create(args)) = acl(&[
            "token",
            "create",
            "--description",
            "web token",
            "--policy-name",
            "kv-read",
            "--policy-id",
            "p-1",
            "--policy-name",
            "svc-write",
            "--role-name",
            "ops",
            "--service-identity",
            "web",
            "--service-identity",
            "db:dc1,dc2",
            "--node-identity",
            "node-1:dc1",
            "--expires-ttl",
            "1h",
            "--local",
        ]) else {
            panic!("not token create")
        };
        assert_eq!(
            token_create_body(&args),
            json!({
                "Description": "web token",
                "Policies": [{ "ID": "p-1" }, { "Name": "kv-read" }, { "Name": "svc-write" }],
                "Roles": [{ "Name": "ops" }],
                "ServiceIdentities": [
                    { "ServiceName": "web" },
                    { "ServiceName": "db", "Datacenters": ["dc1", "dc2"] }
                ],
                "NodeIdentities": [{ "NodeName": "node-1", "Datacenter": "dc1" }],
                "ExpirationTTL": "1h",
                "Local": true
            })
        );
        let AclCommand::Token(TokenCommand::Create(bare)) = acl(&["token", "create"]) else {
            panic!("not token create")
        };
        assert_eq!(token_create_body(&bare), json!({}));
    }

    #[test]
    fn token_read_takes_an_id_or_self() {
        let AclCommand::Token(TokenCommand::Read(read)) = acl(&["token", "read", "--id", "acc"])
        else {
            panic!("not token read")
        };
        assert_eq!(read.id.as_deref(), Some("acc"));
        assert!(!read.self_token);
        let AclCommand::Token(TokenCommand::Read(read)) = acl(&["token", "read", "--self"]) else {
            panic!("not token read")
        };
        assert!(read.self_token && read.id.is_none());
        assert!(matches!(
            acl(&["token", "delete", "--id", "acc"]),
            AclCommand::Token(TokenCommand::Delete { id }) if id == "acc"
        ));
        assert!(matches!(
            acl(&["token", "list"]),
            AclCommand::Token(TokenCommand::List)
        ));
    }

    #[test]
    fn policy_create_reads_rules_from_text_or_file() {
        let AclCommand::Policy(PolicyCommand::Create(args)) = acl(&[
            "policy",
            "create",
            "--name",
            "kv-read",
            "--description",
            "read app/",
            "--rules",
            "key_prefix \"app/\" { policy = \"read\" }",
            "--datacenter",
            "dc1",
            "--valid-datacenter",
            "dc2",
        ]) else {
            panic!("not policy create")
        };
        let rules = read_rules(&args).expect("rules");
        assert_eq!(
            policy_create_body(&args, &rules),
            json!({
                "Name": "kv-read",
                "Description": "read app/",
                "Rules": "key_prefix \"app/\" { policy = \"read\" }",
                "Datacenters": ["dc1", "dc2"]
            })
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rules.hcl");
        std::fs::write(&file, "node_prefix \"\" { policy = \"read\" }\n").expect("write");
        let file_arg = file.display().to_string();
        let AclCommand::Policy(PolicyCommand::Create(args)) =
            acl(&["policy", "create", "--name", "n", "--rules-file", &file_arg])
        else {
            panic!("not policy create")
        };
        let rules = read_rules(&args).expect("rules");
        assert_eq!(
            policy_create_body(&args, &rules),
            json!({ "Name": "n", "Description": "", "Rules": "node_prefix \"\" { policy = \"read\" }\n" })
        );

        let missing = dir.path().join("missing.hcl").display().to_string();
        let AclCommand::Policy(PolicyCommand::Create(args)) =
            acl(&["policy", "create", "--name", "n", "--rules-file", &missing])
        else {
            panic!("not policy create")
        };
        let e = read_rules(&args).expect_err("no file");
        assert_eq!(e.exit_code(), 2);
        assert!(matches!(
            acl(&["policy", "list"]),
            AclCommand::Policy(PolicyCommand::List)
        ));
    }
}
