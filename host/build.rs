//! Builds the shipped policy components for wasm32-wasip2 and hands them to
//! the host crate (`include_bytes!` in `src/policies.rs`), so `cargo run`
//! alone gives a binary with the per-user policy embedded.
//!
//! The nested cargo uses its own target dir: sharing the outer one deadlocks
//! on cargo's build-directory lock.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

const GUESTS: [&str; 2] = ["per-user", "per-thread"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir
        .parent()
        .expect("host/ sits in the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_root = out_dir
        .ancestors()
        .nth(4)
        .unwrap_or(&out_dir)
        .join("wasm-guests");

    ensure_wasm_target();

    let mut cmd = nested_cargo(&workspace, &target_root, "wasm32-wasip2");
    for guest in GUESTS {
        cmd.args(["-p", guest]);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest policies");
    if !status.success() {
        panic!(
            "building the policy components failed; is the wasm target installed? \
             run `rustup target add wasm32-wasip2`"
        );
    }

    let built = target_root.join("wasm32-wasip2").join("release");
    for guest in GUESTS {
        let stem = guest.replace('-', "_");
        let wasm = built.join(format!("{stem}.wasm"));
        let bytes =
            std::fs::read(&wasm).unwrap_or_else(|e| panic!("reading {}: {e}", wasm.display()));
        std::fs::write(out_dir.join(format!("{stem}.wasm")), &bytes).expect("writing to OUT_DIR");
        // The component cache keys on this digest; computing it at build time
        // spares every CLI start ~2/3 of its own instructions (callgrind).
        let digest: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(out_dir.join(format!("{stem}.sha256")), digest).expect("writing to OUT_DIR");
        rerun_if_sources_change(&built.join(format!("{stem}.d")));
    }
    build_agent(&workspace, &out_dir, &target_root);

    println!("cargo:rerun-if-changed={}", workspace.join("wit").display());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("guest").display()
    );
    println!("cargo:rerun-if-changed=build.rs");
}

/// `cargo build --release --locked --target TARGET` in the workspace with its
/// own target dir (sharing the outer one deadlocks on cargo's lock), and
/// without the outer build's flags and wrappers: they are for the host.
fn nested_cargo(workspace: &Path, target_dir: &Path, target: &str) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "--target", target])
        .env("CARGO_TARGET_DIR", target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds `sandbox-agent` statically for the host's own target (it runs in
/// the sandbox containers of this machine's engine) and hands it to the host
/// crate (`src/agent.rs`). Its own target dir: its flags differ.
fn build_agent(workspace: &Path, out_dir: &Path, guests_dir: &Path) {
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let target_dir = guests_dir.with_file_name("agent-build");
    let mut cmd = nested_cargo(workspace, &target_dir, &target);
    cmd.args(["-p", "sandbox-agent"])
        // musl targets are static already; glibc ones need crt-static.
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    let status = cmd.status().expect("failed to run cargo for sandbox-agent");
    assert!(status.success(), "building sandbox-agent failed");
    let built = target_dir
        .join(&target)
        .join("release")
        .join("sandbox-agent");
    let bytes =
        std::fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
    std::fs::write(out_dir.join("sandbox-agent"), &bytes).expect("writing to OUT_DIR");
    let digest: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(out_dir.join("sandbox-agent.sha256"), digest).expect("writing to OUT_DIR");
    for input in ["agent", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
}

/// rustup installs the targets of `rust-toolchain.toml` only together with a
/// toolchain it installs; a toolchain that was already there lacks them. Add
/// the wasm target then, so `cargo run` works on a machine that never heard of
/// it.
fn ensure_wasm_target() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else { return };
    if sysroot.join("lib/rustlib/wasm32-wasip2").is_dir() {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", "wasm32-wasip2"]);
    if let Some(toolchain) = std::env::var_os("RUSTUP_TOOLCHAIN") {
        rustup.arg("--toolchain").arg(toolchain);
    }
    match rustup.status() {
        Ok(status) if status.success() => {}
        _ => println!(
            "cargo:warning=the wasm32-wasip2 target is missing and `rustup target add \
             wasm32-wasip2` failed; install it by hand"
        ),
    }
}

/// Cargo's dep-info file lists every source of the guest: rebuild on any change.
fn rerun_if_sources_change(dep_info: &Path) {
    let Ok(text) = std::fs::read_to_string(dep_info) else {
        return;
    };
    let Some((_, deps)) = text.split_once(": ") else {
        return;
    };
    for dep in deps.split_whitespace() {
        if Path::new(dep).exists() {
            println!("cargo:rerun-if-changed={dep}");
        }
    }
}
