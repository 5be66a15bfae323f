//! `cargo xtask image`: the container image, built offline with buildah from the RPM of the
//! release binary (`packaging/image/build.sh`): no base image and no registry, only the files
//! the RPM installs, the shared libraries the binary loads and the metadata of
//! `packaging/Containerfile` (the production build on Anolis OS 23, which installs the same RPM
//! on a base image from a registry).

use std::path::{Path, PathBuf};

use crate::{as_root, cargo, say, setup, step};

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Image name and tag [default: localhost/nodeward:<version>].
    #[arg(long)]
    tag: Option<String>,
    /// Also write the image as an OCI archive here, for `podman load` or
    /// `ctr images import` on a node [default: target/image/nodeward-<version>.oci.tar].
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(root: &Path, args: &ImageArgs) -> anyhow::Result<()> {
    setup::ensure_build_tools()?;
    setup::ensure_image_tools()?;
    step(
        "building nodeward in release mode (the binary the image ships)",
        cargo().args(["build", "--release", "-p", "nodeward"]),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    let tag = args
        .tag
        .clone()
        .unwrap_or_else(|| format!("localhost/nodeward:{version}"));
    let archive = args
        .out
        .clone()
        .unwrap_or_else(|| root.join(format!("target/image/nodeward-{version}.oci.tar")));
    let rpm = crate::rpm::build(
        root,
        &crate::rpm::RpmArgs::prebuilt(root.join("target/release/nodeward"), None),
    )?;
    say(&format!("packaged {}", rpm.display()));
    let mut build = as_root(&root.join("packaging/image/build.sh"))?;
    build.arg(&rpm).arg(&tag).arg(&archive);
    step("building the image with buildah", &mut build)?;
    say(&format!(
        "image {tag} (buildah images / podman images), archive {}",
        archive.display()
    ));
    Ok(())
}
