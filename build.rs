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
    let status = plugin_cargo()
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

/// The cargo that builds the guests: this build's own when its toolchain has the wasm target
/// (a fresh machine may lack it; rustup can add it, so `cargo run` stays one command), else the
/// stable toolchain's — e.g. under `cargo +nightly fuzz`, whose nightly may have no wasm
/// target to download. Guests do not depend on which toolchain built them.
fn plugin_cargo() -> Command {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if has_target(Command::new(&rustc)) || add_target(None) {
        return Command::new(cargo);
    }
    let mut stable_rustc = Command::new("rustup");
    stable_rustc.args(["run", "stable", "rustc"]).env_remove("RUSTUP_TOOLCHAIN");
    if has_target(stable_rustc) || add_target(Some("stable")) {
        println!("cargo:warning=building plugins/ with the stable toolchain (this one has no {TARGET} target)");
        let mut c = Command::new("rustup");
        c.args(["run", "stable", "cargo"]).env_remove("RUSTC").env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC_WRAPPER");
        return c;
    }
    panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and build again");
}

fn has_target(mut rustc: Command) -> bool {
    rustc
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib").join(TARGET).exists())
        .unwrap_or(false)
}

fn add_target(toolchain: Option<&str>) -> bool {
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let mut c = Command::new("rustup");
    c.args(["target", "add", TARGET]);
    if let Some(t) = toolchain {
        c.args(["--toolchain", t]).env_remove("RUSTUP_TOOLCHAIN");
    }
    c.status().map(|s| s.success()).unwrap_or(false)
}
