//! `cargo xtask package`: two packages, each as a .deb (dpkg-deb) and an .rpm (rpmbuild)
//! from one staged tree: `usher` (the host agent: usherd, usher, usher-shell, and the RDP
//! worker usher-rdp) and
//! `usher-collector` (the central service). `USHER_PKG_RELEASE` sets the package release
//! (default 1), so an upgrade can be tested.

use crate::util::{build_binaries, release_dir, run, workspace_root, Profile};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEB_DEPENDS: &str = "passwd, openssh-sftp-server, login";
/// asciinema plays terminal recordings; RDP desktops want an X server, a window manager and
/// a terminal (usherd's default desktop), and ffmpeg exports desktop recordings to video.
const DEB_RECOMMENDS: &str = "asciinema, xvfb, openbox, xterm";
const DEB_SUGGESTS: &str = "ffmpeg";
/// useradd when systemd-sysusers is not there; runuser for `usher-collector init`.
const COLLECTOR_DEB_DEPENDS: &str = "passwd, util-linux";

fn copy(from: &Path, to: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
    std::fs::copy(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

pub fn run_package() -> Result<(), String> {
    let release = std::env::var("USHER_PKG_RELEASE").unwrap_or_else(|_| "1".into());
    build_binaries(Profile::Release)?;
    // The replay page's player, shipped in the service's package.
    crate::setup::player_assets()?;
    agent_packages(&release)?;
    collector_packages(&release)
}

fn agent_packages(release: &str) -> Result<(), String> {
    let root = workspace_root();
    let out = root.join("target/package");
    let stage = out.join("root");
    let _ = std::fs::remove_dir_all(&stage);
    let bin = release_dir();
    let p = root.join("packaging");
    for (name, dest) in [
        ("usherd", "usr/sbin/usherd"),
        ("usher", "usr/bin/usher"),
        ("usher-shell", "usr/libexec/usher/usher-shell"),
        // Found by usherd through `[rdp] worker` (the packaged usherd.toml names it).
        ("usher-rdp", "usr/libexec/usher/usher-rdp"),
    ] {
        copy(&bin.join(name), &stage.join(dest), 0o755)?;
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg(stage.join(dest)))?;
    }
    copy(
        &p.join("usherd.service"),
        &stage.join("lib/systemd/system/usherd.service"),
        0o644,
    )?;
    copy(
        &p.join("tmpfiles.conf"),
        &stage.join("usr/lib/tmpfiles.d/usher.conf"),
        0o644,
    )?;
    copy(
        &p.join("usherd.toml"),
        &stage.join("etc/usher/usherd.toml"),
        0o644,
    )?;
    copy(
        &root.join("README.md"),
        &stage.join("usr/share/doc/usher/README.md"),
        0o644,
    )?;
    copy(
        &root.join("LICENSE"),
        &stage.join("usr/share/doc/usher/copyright"),
        0o644,
    )?;
    // Tells the host's own sshd to refuse usher's accounts (DenyUsers jit-*).
    copy(
        &p.join("sshd_config.d/usher.conf"),
        &stage.join("etc/ssh/sshd_config.d/usher.conf"),
        0o644,
    )?;
    let mut conffiles = vec![
        "/etc/usher/usherd.toml".to_string(),
        "/etc/ssh/sshd_config.d/usher.conf".to_string(),
    ];
    std::fs::create_dir_all(stage.join("etc/usher/policies")).map_err(|e| e.to_string())?;
    let mut policies: Vec<PathBuf> = std::fs::read_dir(root.join("policies"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        })
        .unwrap_or_default();
    policies.sort();
    for policy in &policies {
        let name = policy.file_name().unwrap().to_string_lossy().into_owned();
        copy(policy, &stage.join("etc/usher/policies").join(&name), 0o644)?;
        conffiles.push(format!("/etc/usher/policies/{name}"));
    }

    // .deb
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian).map_err(|e| e.to_string())?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&p.join("deb").join(script), &debian.join(script), 0o755)?;
    }
    std::fs::write(debian.join("conffiles"), conffiles.join("\n") + "\n")
        .map_err(|e| e.to_string())?;
    let size_kib = dir_size(&stage) / 1024;
    let control = format!(
        "Package: usher\nVersion: {v}-{release}\nArchitecture: amd64\nMaintainer: Usher developers <usher@localhost>\n\
         Installed-Size: {size_kib}\nDepends: {DEB_DEPENDS}\nRecommends: {DEB_RECOMMENDS}\nSuggests: {DEB_SUGGESTS}\nSection: admin\nPriority: optional\n\
         Description: just-in-time access host agent\n usherd turns signed, time-bounded grants into ephemeral local accounts,\n \
         terminates SSH and RDP itself, runs every session in its own cgroup and\n records terminal sessions as asciicasts and desktops as screen recordings.\n",
        v = version()
    );
    std::fs::write(debian.join("control"), control).map_err(|e| e.to_string())?;
    let deb = out.join(format!("usher_{}-{release}_amd64.deb", version()));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    println!("{}", deb.display());

    // .rpm, from the same tree. The policies are conffiles too; rpm wants them named.
    let filelist = out.join("rpm-policies.list");
    let lines: Vec<String> = conffiles
        .iter()
        .filter(|c| c.starts_with("/etc/usher/policies/"))
        .map(|c| format!("%config(noreplace) {c}"))
        .collect();
    std::fs::write(&filelist, lines.join("\n") + "\n").map_err(|e| e.to_string())?;
    let dest = rpmbuild(
        &p.join("rpm/usher.spec"),
        "usher",
        &stage,
        release,
        &[("usher_filelist", filelist.display().to_string())],
    )?;
    println!("{}", dest.display());
    Ok(())
}

/// `usher-collector`: the binary, its hardened unit, a default config (a conffile), its
/// system user (sysusers.d) and state directory (tmpfiles.d), asciinema-player's files;
/// the first install makes the user and a self-signed TLS pair (`usher-collector init`).
fn collector_packages(release: &str) -> Result<(), String> {
    let root = workspace_root();
    let out = root.join("target/package");
    let stage = out.join("collector-root");
    let _ = std::fs::remove_dir_all(&stage);
    let p = root.join("packaging/collector");
    let dest = "usr/bin/usher-collector";
    copy(
        &release_dir().join("usher-collector"),
        &stage.join(dest),
        0o755,
    )?;
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg(stage.join(dest)))?;
    for (from, to, mode) in [
        (
            p.join("usher-collector.service"),
            "lib/systemd/system/usher-collector.service",
            0o644,
        ),
        (
            p.join("tmpfiles.conf"),
            "usr/lib/tmpfiles.d/usher-collector.conf",
            0o644,
        ),
        (
            p.join("sysusers.conf"),
            "usr/lib/sysusers.d/usher-collector.conf",
            0o644,
        ),
        (p.join("collector.toml"), "etc/usher/collector.toml", 0o644),
        (
            root.join("README.md"),
            "usr/share/doc/usher-collector/README.md",
            0o644,
        ),
        (
            root.join("collector/API.md"),
            "usr/share/doc/usher-collector/API.md",
            0o644,
        ),
        (
            root.join("collector/WORKFLOW.md"),
            "usr/share/doc/usher-collector/WORKFLOW.md",
            0o644,
        ),
        (
            root.join("LICENSE"),
            "usr/share/doc/usher-collector/copyright",
            0o644,
        ),
    ] {
        copy(&from, &stage.join(to), mode)?;
    }
    let assets = root.join("target/web-assets");
    let mut players: Vec<PathBuf> = std::fs::read_dir(&assets)
        .map_err(|e| format!("{}: {e}", assets.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("asciinema-player"))
        })
        .collect();
    players.sort();
    for player in &players {
        let name = player.file_name().unwrap_or_default();
        copy(
            player,
            &stage.join("usr/share/usher-collector/assets").join(name),
            0o644,
        )?;
    }

    // .deb
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian).map_err(|e| e.to_string())?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&p.join("deb").join(script), &debian.join(script), 0o755)?;
    }
    std::fs::write(debian.join("conffiles"), "/etc/usher/collector.toml\n")
        .map_err(|e| e.to_string())?;
    let size_kib = dir_size(&stage) / 1024;
    let control = format!(
        "Package: usher-collector\nVersion: {v}-{release}\nArchitecture: amd64\nMaintainer: Usher developers <usher@localhost>\n\
         Installed-Size: {size_kib}\nDepends: {COLLECTOR_DEB_DEPENDS}\nSection: admin\nPriority: optional\n\
         Description: Usher service: just-in-time access workflow and session recordings\n \
         People sign in with OpenID Connect and request access, approvers approve, the\n \
         service signs grants that Usher agents fetch; agents ship their recordings here,\n \
         where they are verified, stored, indexed and replayed.\n",
        v = version()
    );
    std::fs::write(debian.join("control"), control).map_err(|e| e.to_string())?;
    let deb = out.join(format!("usher-collector_{}-{release}_amd64.deb", version()));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    println!("{}", deb.display());

    // .rpm, from the same tree
    let dest = rpmbuild(
        &root.join("packaging/rpm/usher-collector.spec"),
        "usher-collector",
        &stage,
        release,
        &[],
    )?;
    println!("{}", dest.display());
    Ok(())
}

/// Builds `spec` (package `name`) from the staged tree with rpmbuild in a scratch top dir
/// under target/package, and moves the .rpm next to the .deb; answers where it is.
fn rpmbuild(
    spec: &Path,
    name: &str,
    stage: &Path,
    release: &str,
    defines: &[(&str, String)],
) -> Result<PathBuf, String> {
    crate::setup::ensure_packages(&["rpm"])?;
    let out = workspace_root().join("target/package");
    let rpm_top = out.join(format!("rpmbuild-{name}"));
    let _ = std::fs::remove_dir_all(&rpm_top);
    let mut cmd = Command::new("rpmbuild");
    cmd.arg("-bb").arg(spec);
    let standard = [
        ("_topdir", rpm_top.display().to_string()),
        ("usher_version", version()),
        ("usher_release", release.to_string()),
        ("usher_stage", stage.display().to_string()),
        ("__os_install_post", "%{nil}".to_string()),
        ("debug_package", "%{nil}".to_string()),
    ];
    for (key, value) in standard.iter().chain(defines) {
        cmd.arg("--define").arg(format!("{key} {value}"));
    }
    run(&mut cmd)?;
    let file = format!("{name}-{}-{release}.x86_64.rpm", version());
    let rpm = rpm_top.join("RPMS/x86_64").join(&file);
    let dest = out.join(&file);
    std::fs::rename(&rpm, &dest).map_err(|e| format!("{}: {e}", rpm.display()))?;
    Ok(dest)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let m = e.metadata().ok();
                    match m {
                        Some(m) if m.is_dir() => dir_size(&e.path()),
                        Some(m) => m.len(),
                        None => 0,
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
