//! Generates the Meshwork Watch and Agent clients from the repository's own
//! protos (`proto/meshwork/v1/`, two directories up) with protox, as
//! `proto/build.rs` of the main project does: no `protoc` needed for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = "../../proto";
    let files = ["meshwork/v1/watch.proto", "meshwork/v1/agent.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={include}/{file}");
    }
    let descriptors = protox::compile(files, [include])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
