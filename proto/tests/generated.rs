//! `proto/src/generated/` is what tonic's code generator makes of `proto/portcullis/v1/*.proto`
//! (compiled by protox, so nothing needs installing). A difference fails this test; with
//! `PORTCULLIS_REGENERATE=1` it writes the generated code instead.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn the_committed_code_is_what_the_generator_makes_of_the_protos() {
    let fds = protox::compile(["portcullis/v1/decision.proto", "portcullis/v1/admin.proto"], [root()])
        .expect("the .proto files compile");
    // the descriptors gRPC reflection serves, encoded
    let descriptors = prost::Message::encode_to_vec(&fds);
    let out = std::env::temp_dir().join(format!("portcullis-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("a scratch folder");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds)
        .expect("tonic's generator");
    let generated = std::fs::read_to_string(out.join("portcullis.v1.rs")).expect("generated code");
    let _ = std::fs::remove_dir_all(&out);
    let committed_path = root().join("src/generated/portcullis.v1.rs");
    let descriptors_path = root().join("src/generated/portcullis_v1.bin");
    if std::env::var_os("PORTCULLIS_REGENERATE").is_some() {
        std::fs::write(&committed_path, &generated).expect("write the generated code");
        std::fs::write(&descriptors_path, &descriptors).expect("write the descriptors");
        return;
    }
    assert!(
        std::fs::read(&descriptors_path).unwrap_or_default() == descriptors,
        "{} is not the encoded descriptors of the .proto files: run `PORTCULLIS_REGENERATE=1 cargo test -p proto` and commit the result",
        descriptors_path.display()
    );
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not what the generator makes of the .proto files: run `PORTCULLIS_REGENERATE=1 cargo test -p proto` and commit the result",
        committed_path.display()
    );
}
