//! Generates the gRPC code with a vendored `protoc`, so a fresh machine needs no system protobuf.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/haul.proto");
    tonic_prost_build::configure().compile_protos(&["proto/haul.proto"], &["proto"])?;
    Ok(())
}
