//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the same property checks
//! the fuzz targets run (`protocol::fuzz_props`), so that `cargo test` keeps every seed and every
//! input a fuzzing run found (a fixed crash included) passing on stable, without libFuzzer.
//!
//! A missing or empty corpus directory fails: the corpus is part of the test.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use protocol::envelope::Format;
use protocol::fuzz_props;

/// The corpus directory of a fuzz target.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `check` on every file of the target's corpus; fails naming each file whose check panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = corpus_dir(target);
    assert!(
        dir.is_dir(),
        "corpus directory {} is missing",
        dir.display()
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<PathBuf>, _>>()
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    let mut failed = Vec::new();
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus file(s) failed their property: {failed:#?}",
        failed.len(),
        files.len()
    );
    eprintln!("{target}: replayed {} corpus file(s)", files.len());
}

#[test]
fn http_head_corpus() {
    replay("http_head", fuzz_props::http_head);
}

#[test]
fn http_chunked_corpus() {
    replay("http_chunked", fuzz_props::http_chunked);
}

#[test]
fn ws_frame_corpus() {
    replay("ws_frame", fuzz_props::ws_frames);
}

#[test]
fn envelope_json_corpus() {
    replay("envelope_json", |data| {
        fuzz_props::envelope(data, Format::Json);
    });
}

#[test]
fn envelope_msgpack_corpus() {
    replay("envelope_msgpack", |data| {
        fuzz_props::envelope(data, Format::MsgPack);
    });
}

#[test]
fn zstd_corpus() {
    replay("zstd", fuzz_props::zstd);
}

#[test]
fn socketio_corpus() {
    replay("socketio", fuzz_props::socketio);
}
