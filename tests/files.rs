//! File transfer against the real engine: batches, typed per-file errors,
//! confinement to /workspace, binary safety, modes, a 50 MB file.

mod support;

use support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_move_in_batches_with_typed_per_file_errors() {
    use sandbox_host::files::{FileError, Upload};
    let h = Harness::new("files");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("mkdir adir; ln -s /etc/passwd outlink; echo s > secret; chmod 000 secret")
        .await
        .unwrap();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let up = |path: &str, content: &[u8], mode: Option<u32>| Upload {
        path: path.into(),
        content: content.to_vec(),
        mode,
    };
    let results = b
        .upload_files(vec![
            up("a.txt", b"hello", None),
            up("/workspace/sub/dir/b.bin", &binary, Some(0o750)),
            up("../escape", b"x", None),
            up("/etc/evil", b"x", None),
            up("adir", b"x", None),
            up("outlink", b"x", None),
        ])
        .await
        .unwrap();
    let errors: Vec<_> = results.iter().map(|r| r.error).collect();
    assert_eq!(
        errors,
        [
            None,
            None,
            Some(FileError::InvalidPath),
            Some(FileError::InvalidPath),
            Some(FileError::IsDirectory),
            Some(FileError::InvalidPath)
        ]
    );
    let r = b
        .execute("cat a.txt; stat -c '%a %u' sub/dir/b.bin")
        .await
        .unwrap();
    let uid = sandbox.config().sandbox_user().uid;
    assert_eq!(r.output, format!("hello750 {uid}\n"));
    assert!(!std::path::Path::new("/etc/evil").exists());

    let paths: Vec<String> = [
        "a.txt",
        "sub/dir/b.bin",
        "missing",
        "adir",
        "outlink",
        "secret",
        "/etc/passwd",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = b.download_files(&paths).await.unwrap();
    assert_eq!(got[0].content.as_deref(), Some(&b"hello"[..]));
    assert_eq!(got[1].content.as_deref(), Some(&binary[..]));
    assert_eq!(got[1].mode, Some(0o750));
    let errors: Vec<_> = got.iter().map(|r| r.error).collect();
    assert_eq!(
        errors,
        [
            None,
            None,
            Some(FileError::FileNotFound),
            Some(FileError::IsDirectory),
            Some(FileError::InvalidPath),
            Some(FileError::PermissionDenied),
            Some(FileError::InvalidPath)
        ]
    );
    // Uploads land in the user's workspace on the host too.
    assert_eq!(
        std::fs::read(h.root.path().join("alice/a.txt")).unwrap(),
        b"hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_50_mb_file_round_trips_intact() {
    use sandbox_host::files::Upload;
    let h = Harness::new("bigfile");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    let content: Vec<u8> = (0..50 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let up = b
        .upload_files(vec![Upload {
            path: "big.bin".into(),
            content: content.clone(),
            mode: None,
        }])
        .await
        .unwrap();
    assert_eq!(up[0].error, None);
    assert_eq!(
        b.execute("wc -c < big.bin").await.unwrap().output.trim(),
        "52428800"
    );
    let down = b.download_files(&["big.bin".into()]).await.unwrap();
    assert!(
        down[0].content.as_deref() == Some(&content[..]),
        "bytes differ"
    );
}
