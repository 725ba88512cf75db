//! What this workspace builds for the host to embed and for the tests to
//! load, built by `build.rs` with one nested cargo (see there):
//!
//! - [`shipped`]: the policy components the host embeds (`per-user`,
//!   `per-thread`): bytes, path and SHA-256;
//! - [`fixtures`]: the test-only components of `tests/fixtures/` (the
//!   hostile, broken, other-world and 0.3-world policies): path and SHA-256 only, so
//!   their bytes never reach a binary;
//! - [`AGENT`]: `sandbox-agent`, static, for the target being built;
//! - [`ALL`]: every one of them, with its kind.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// One built file.
#[derive(Debug, Clone, Copy)]
pub struct Artifact {
    /// The cargo package it is built from.
    pub package: &'static str,
    /// What it is, and so what its bytes must look like.
    pub kind: Kind,
    /// Absolute path of the built file.
    pub path: &'static str,
    /// SHA-256 (hex) of the built file, computed when it was built.
    pub sha256: &'static str,
}

/// What an [`Artifact`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A policy component the host embeds.
    Shipped,
    /// A test-only policy component.
    Fixture,
    /// The in-container helper executable.
    Agent,
}

/// Whether `bytes` start with the header of a WebAssembly component (the
/// component layer), not of a core module.
pub fn is_component(bytes: &[u8]) -> bool {
    // Magic, then a 16-bit version and a 16-bit layer: 0 for a core module,
    // 1 for a component.
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn sha256(bytes: &[u8]) -> String {
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn every_artifact_exists_has_its_kind_and_matches_its_digest() {
        assert_eq!(ALL.len(), 7);
        for artifact in ALL {
            let bytes = std::fs::read(artifact.path)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", artifact.package, artifact.path));
            assert_eq!(sha256(&bytes), artifact.sha256, "{}", artifact.package);
            match artifact.kind {
                Kind::Shipped | Kind::Fixture => assert!(
                    is_component(&bytes),
                    "{} is not a component",
                    artifact.package
                ),
                Kind::Agent => assert_eq!(bytes[..4], *b"\x7fELF", "sandbox-agent"),
            }
        }
    }

    #[test]
    fn the_embedded_bytes_are_the_built_files() {
        for (bytes, path, digest) in [
            (
                shipped::PER_USER,
                shipped::PER_USER_PATH,
                shipped::PER_USER_SHA256,
            ),
            (
                shipped::PER_THREAD,
                shipped::PER_THREAD_PATH,
                shipped::PER_THREAD_SHA256,
            ),
            (AGENT, AGENT_PATH, AGENT_SHA256),
        ] {
            assert_eq!(bytes, std::fs::read(path).unwrap(), "{path}");
            assert_eq!(sha256(bytes), digest, "{path}");
        }
    }

    #[test]
    fn a_core_module_is_not_a_component() {
        assert!(!is_component(b"\0asm\x01\0\0\0"));
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
        assert!(!is_component(b"\0asm"));
    }
}
