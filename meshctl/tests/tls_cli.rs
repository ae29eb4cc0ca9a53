//! `meshctl tls` as an operator runs it: exit codes, one-line errors on
//! standard error, `==> Saved` lines, and never a private key printed.

use std::path::Path;
use std::process::{Command, Output};

fn meshctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .current_dir(dir)
        // No registry is needed, whatever these say.
        .env("MESHWORK_HTTP_ADDR", "not an address")
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .expect("meshctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_nothing_secret(output: &Output) {
    for stream in [&output.stdout, &output.stderr] {
        let stream = text(stream);
        assert!(!stream.contains("PRIVATE KEY"), "{stream}");
        assert!(!stream.contains("-----BEGIN"), "{stream}");
    }
}

#[test]
fn files_are_saved_in_the_current_folder_as_consul_names_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = meshctl(dir, &["tls", "ca", "create"]);
    assert_eq!(ca.status.code(), Some(0), "{}", text(&ca.stderr));
    assert_nothing_secret(&ca);
    assert_eq!(
        text(&ca.stdout),
        "==> Saved meshwork-agent-ca.pem\n==> Saved meshwork-agent-ca-key.pem\n"
    );
    assert!(ca.stderr.is_empty(), "{}", text(&ca.stderr));

    let server = meshctl(dir, &["tls", "cert", "create", "--server"]);
    assert_eq!(server.status.code(), Some(0), "{}", text(&server.stderr));
    assert_nothing_secret(&server);
    assert_eq!(
        text(&server.stdout),
        "==> Using meshwork-agent-ca.pem and meshwork-agent-ca-key.pem\n\
         ==> Saved dc1-server-meshwork-0.pem\n\
         ==> Saved dc1-server-meshwork-0-key.pem\n"
    );
    let again = meshctl(dir, &["tls", "cert", "create", "--server"]);
    assert!(text(&again.stdout).contains("==> Saved dc1-server-meshwork-1.pem\n"));
    let client = meshctl(dir, &["tls", "cert", "create", "--client"]);
    assert!(text(&client.stdout).contains("==> Saved dc1-client-meshwork-0-key.pem\n"));
    assert_nothing_secret(&client);
}

#[test]
fn bad_input_exits_2_with_one_line_on_stderr() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = meshctl(dir, &["tls", "ca", "create"]);
    assert_eq!(ca.status.code(), Some(0));
    let empty = tempfile::tempdir().expect("tempdir");
    for (cwd, args) in [
        (dir, &["tls", "ca", "create"][..]),
        (dir, &["tls", "cert", "create"]),
        (dir, &["tls", "cert", "create", "--server", "--client"]),
        (dir, &["tls", "cert", "create", "--server", "--days", "0"]),
        (
            dir,
            &[
                "tls",
                "cert",
                "create",
                "--server",
                "--additional-ipaddress",
                "300.1.1.1",
            ],
        ),
        (
            dir,
            &[
                "tls",
                "cert",
                "create",
                "--client",
                "--key",
                "meshwork-agent-ca.pem",
            ],
        ),
        (empty.path(), &["tls", "cert", "create", "--server"]),
    ] {
        let output = meshctl(cwd, args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            output.stdout.is_empty(),
            "{args:?}: {}",
            text(&output.stdout)
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("meshctl: "), "{args:?}: {stderr}");
        assert_nothing_secret(&output);
    }
    // Only the CA's two files are there: the refusals wrote nothing.
    assert_eq!(std::fs::read_dir(dir).expect("read_dir").count(), 2);
    assert_eq!(
        std::fs::read_dir(empty.path()).expect("read_dir").count(),
        0
    );
}

#[test]
fn help_describes_the_commands() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let top = meshctl(tmp.path(), &["--help"]);
    assert_eq!(top.status.code(), Some(0));
    assert!(text(&top.stdout).contains("tls"), "{}", text(&top.stdout));
    let cert = meshctl(tmp.path(), &["tls", "cert", "create", "--help"]);
    assert_eq!(cert.status.code(), Some(0));
    let help = text(&cert.stdout);
    for want in [
        "--server",
        "--client",
        "--additional-dnsname",
        "--additional-ipaddress",
        "--node",
        "server.<DC>.<DOMAIN>",
        "0600",
    ] {
        assert!(help.contains(want), "{want}\n{help}");
    }
    let ca = meshctl(tmp.path(), &["tls", "ca", "create", "--help"]);
    let help = text(&ca.stdout);
    for want in ["--common-name", "--days", "--dir", "<DOMAIN>-agent-ca.pem"] {
        assert!(help.contains(want), "{want}\n{help}");
    }
}
