//! `meshctl`: operate a Meshwork registry cluster (see `meshctl --help`).

fn main() -> std::process::ExitCode {
    meshctl::main()
}
