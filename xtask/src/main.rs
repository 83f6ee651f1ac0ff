//! Workspace tasks: `cargo xtask <task>`.
//!
//! - `guest-image`: the agent built static, packed as `/init` of an initramfs.
//! - `kernel`: the guest kernel from `guest-kernel-config/` (cached build).
//! - `guest`: both.

mod initramfs;
mod oci_image;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

/// The only target this toolchain has; the agent is linked static for it.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Carapace workspace tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the guest initramfs (static agent as /init).
    GuestImage(OutArgs),
    /// Build the guest kernel (vmlinux), cached on its inputs.
    Kernel(OutArgs),
    /// Build the guest kernel and the guest initramfs.
    Guest(OutArgs),
    /// Build the busybox demo image as an OCI layout (dir and tar)
    /// [default out: <target dir>/images].
    BusyboxImage(OutArgs),
}

#[derive(Debug, clap::Args)]
struct OutArgs {
    /// Output directory [default: <target dir>/guest].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::GuestImage(args) => {
            let out = out_dir(&root, args.out)?;
            guest_image(&root, &out)?;
        }
        Task::Kernel(args) => {
            let out = out_dir(&root, args.out)?;
            kernel(&root, &out)?;
        }
        Task::BusyboxImage(args) => {
            let out = args.out.unwrap_or_else(|| target_dir(&root).join("images"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (dir, tar) = oci_image::build(&out)?;
            oci_image::verify_with_sha256sum(&dir)?;
            println!("{}\n{}", dir.display(), tar.display());
        }
        Task::Guest(args) => {
            let out = out_dir(&root, args.out)?;
            kernel(&root, &out)?;
            guest_image(&root, &out)?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn out_dir(root: &Path, out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let out = out.unwrap_or_else(|| target_dir(root).join("guest"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

fn kernel(root: &Path, out: &Path) -> anyhow::Result<()> {
    let script = root.join("guest-kernel-config/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(out)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("guest kernel build failed ({status})");
    }
    eprintln!("kernel:    {}", out.join("vmlinux").display());
    Ok(())
}

fn guest_image(root: &Path, out: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--package",
            "carapace-agent",
            "--profile",
            "guest-release",
        ])
        .args(["--target", GUEST_TARGET])
        // Only the agent (the target) is linked static; build scripts and
        // proc macros, built for the host, are not affected.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .status()
        .context("running cargo build for the agent")?;
    if !status.success() {
        bail!("building the agent failed ({status})");
    }
    let agent = target_dir(root)
        .join(GUEST_TARGET)
        .join("guest-release")
        .join("carapace-agent");
    let binary = std::fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?;
    if initramfs::has_interpreter(&binary)? {
        bail!(
            "{} is dynamically linked; the guest has no libc",
            agent.display()
        );
    }
    let image = out.join("initramfs.cpio");
    initramfs::write(&image, &binary)?;
    eprintln!(
        "initramfs: {} ({} bytes; agent {} bytes)",
        image.display(),
        std::fs::metadata(&image)?.len(),
        binary.len()
    );
    Ok(())
}
