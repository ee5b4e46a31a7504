//! `cargo xtask image`: the container image. A statically linked tcptrace (musl target, the
//! eBPF programs embedded, no debug info) in an image with nothing else (`FROM scratch`, see
//! deploy/container/Containerfile), built by Debian's podman without network: no base image to
//! pull, no registry to reach. Tagged with the name deploy/kubernetes/daemonset.yaml runs.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, sh, workspace_root};

/// The Rust target of the static build.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The image's name, as the DaemonSet names it.
pub fn name() -> String {
    format!("ghcr.io/tcptrace/tcptrace:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the static binary (cargo profile `image`); returns its path.
pub fn build_static() -> Result<PathBuf> {
    sh(cargo().args([
        "build",
        "--profile",
        "image",
        "--target",
        MUSL,
        "-p",
        "tcptrace",
    ]))?;
    let bin = workspace_root()
        .join("target")
        .join(MUSL)
        .join("image/tcptrace");
    let file = Command::new("file")
        .arg(&bin)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !file.contains("statically linked") && !file.contains("static-pie linked") {
        bail!("{} is not statically linked: {file}", bin.display());
    }
    Ok(bin)
}

/// Builds the static binary and the image; returns (image name, binary).
pub fn build() -> Result<(String, PathBuf)> {
    let bin = build_static()?;
    let root = workspace_root();
    let ctx = root.join("target/image-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).with_context(|| format!("creating {}", ctx.display()))?;
    std::fs::copy(&bin, ctx.join("tcptrace")).context("copying the binary into the context")?;
    std::fs::copy(
        root.join("deploy/container/Containerfile"),
        ctx.join("Containerfile"),
    )
    .context("copying deploy/container/Containerfile")?;
    let name = name();
    sh(Command::new("podman")
        .args([
            "build",
            "--pull=never",
            "--network=none",
            "--quiet",
            "--tag",
            &name,
        ])
        .arg("--file")
        .arg(ctx.join("Containerfile"))
        .arg(&ctx))?;
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask image: {name} built: {} ({:.1} MiB, static) and nothing else",
        bin.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok((name, bin))
}
