//! Compiles the kit's own copy of the wire schema, `proto/restpipe.proto` of the repository,
//! with prost, using protox so that no system `protoc` is needed (as the root `build.rs`
//! does). Raw peers speak it without going through `restpipe`'s internals.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile(["../../proto/restpipe.proto"], ["../../proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
