//! Compiles `proto/ballast/v1/ballast.proto` (needs `protoc`: Debian package `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/ballast/v1/ballast.proto"], &["proto"])?;
    Ok(())
}
