//! Generates the Meshwork Watch client from the repository's own proto
//! (`proto/meshwork/v1/watch.proto`, two directories up) with protox, as
//! `proto/build.rs` of the main project does: no `protoc` needed for it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let include = "../../proto";
    let file = "meshwork/v1/watch.proto";
    println!("cargo:rerun-if-changed={include}/{file}");
    let descriptors = protox::compile([file], [include])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
