//! Compiles `meshwork/v1/*.proto` with protox (pure Rust, so no `protoc` is
//! needed on the build machine) and generates the tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "meshwork/v1/raft.proto",
        "meshwork/v1/registry.proto",
        "meshwork/v1/watch.proto",
        "meshwork/v1/agent.proto",
        "grpc/health/v1/health.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
