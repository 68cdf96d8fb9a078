//! Builds the first-party plugins in plugins/ for wasm32-wasip2 (a separate workspace with its
//! own target directory, so the host's dependency graph never includes them) and tells the
//! host crate where the components are.

use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-changed=plugins");
    println!("cargo:rerun-if-changed=wit");
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("plugins"),
        None => root.join("target").join("plugins"),
    };
    ensure_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(root.join("plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The host build's flags are for the host, not for wasm guests.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("failed to run cargo for plugins/");
    if !status.success() {
        panic!("building plugins/ for {TARGET} failed (see the output above)");
    }
    let out = target_dir.join(TARGET).join("release");
    println!("cargo:rustc-env=PARLEY_PLUGIN_DIR={}", out.display());
}

/// A fresh machine may lack the wasm target; rustup can add it, so `cargo run` stays one command.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok();
    let has_target = sysroot
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib").join(TARGET).exists())
        .unwrap_or(false);
    if !has_target {
        println!("cargo:warning=installing the {TARGET} target with rustup");
        let ok = Command::new("rustup").args(["target", "add", TARGET]).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and build again");
        }
    }
}
