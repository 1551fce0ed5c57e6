//! `crabboxctl man --out-dir DIR` (hidden): writes roff man pages for
//! crabboxctl and each subcommand with clap_mangen; packaging calls it.

use std::{fs, path::PathBuf};

use anyhow::Context as _;

use crate::exit::Code;

/// Write man pages (crabboxctl.1, crabboxctl-status.1, …) into a directory.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the pages; created if missing.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// Runs `crabboxctl man`.
pub fn run(args: &Args) -> anyhow::Result<Code> {
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    clap_mangen::generate_to(crate::cli_command(), &args.out_dir)
        .with_context(|| format!("cannot write man pages into {}", args.out_dir.display()))?;
    Ok(Code::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_page_per_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        run(&Args {
            out_dir: dir.path().join("man1"),
        })
        .unwrap();
        let man1 = dir.path().join("man1");
        for page in [
            "crabboxctl.1",
            "crabboxctl-status.1",
            "crabboxctl-tasks.1",
            "crabboxctl-daemon.1",
            "crabboxctl-daemon-install.1",
            "crabboxctl-doctor.1",
        ] {
            assert!(man1.join(page).is_file(), "{page} missing");
        }
        assert!(!man1.join("crabboxctl-man.1").exists());
        let root = fs::read_to_string(man1.join("crabboxctl.1")).unwrap();
        assert!(
            root.contains("Exit status"),
            "exit codes belong in the man page"
        );
    }
}
