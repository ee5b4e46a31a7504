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
    let elf = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    if !is_static(&elf) {
        bail!(
            "{} is not statically linked (it names a program interpreter)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Whether a little-endian ELF64 executable has no program interpreter (no PT_INTERP program
/// header): it runs without a loader or shared libraries, as `FROM scratch` needs.
fn is_static(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let bytes = |o: usize, n: usize| elf.get(o..o + n);
    let u16_at = |o| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o| bytes(o, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |o| bytes(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    elf.starts_with(b"\x7fELF\x02\x01")
        && (0..count).all(|i| u32_at(phoff + i * size).is_some_and(|t| t != PT_INTERP))
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_dynamic_executable_is_not_static() {
        // This test's own executable is linked against glibc: it names ld-linux.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!super::is_static(&me));
        assert!(!super::is_static(b"\x7fELF"));
    }
}
