//! Compiles `proto/` with protox (pure Rust, no `protoc`) into the gRPC code and
//! the descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tidings/v1/message.proto",
        "proto/tidings/v1/publisher.proto",
        "proto/tidings/v1/subscriber.proto",
        "proto/tidings/v1/admin.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tidings_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
