//! Compiles `proto/strom/v1/realtime.proto` with protox (pure Rust, so no
//! system `protoc` is needed) and writes the descriptor set that the gRPC
//! reflection service serves.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/strom/v1/realtime.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("strom_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Messages and the client.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors.clone())?;
    // The server, with two changes: Subscribe streams pre-encoded
    // responses, so an event is encoded once and its bytes shared by every
    // gRPC subscriber (see `edge::grpc::EncodedResponse`), and a request
    // that is not valid protobuf is INVALID_ARGUMENT (`edge::grpc::Codec`).
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&server_dir)
        .codec_path("crate::edge::grpc::Codec")
        .extern_path(
            ".strom.v1.SubscribeResponse",
            "crate::edge::grpc::EncodedResponse",
        )
        .extern_path(".strom.v1", "crate::proto")
        .compile_fds(descriptors)?;
    Ok(())
}
