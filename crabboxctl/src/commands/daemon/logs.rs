//! `daemon logs`: the user journal when crabboxd runs as a systemd unit,
//! else the log file that launchd or `daemon start` writes.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    dirs,
    exit::{Code, Failure},
    service::Platform,
};

/// Flags of `daemon logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Keep printing new lines as they are written.
    #[arg(short, long)]
    follow: bool,

    /// How many recent lines to show.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100)]
    lines: u32,

    /// Read this log file instead of the journal or the default log file.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

/// Runs `daemon logs`.
pub async fn logs(args: &LogsArgs) -> anyhow::Result<Code> {
    let journal = Platform::native()
        .filter(|p| args.log_file.is_none() && p.installed_unit().is_some())
        .and_then(|p| p.logs_command(args.follow, args.lines));
    let argv = match journal {
        Some(argv) => argv,
        None => {
            let path = match &args.log_file {
                Some(p) => p.clone(),
                None => dirs::default_log_file()?,
            };
            if !path.is_file() {
                return Err(Failure::error(format!("there is no log file at {}", path.display()))
                    .hint("`crabboxctl daemon start` and the launchd agent write it; a crabboxd run in the foreground logs to its terminal")
                    .into());
            }
            let mut argv = vec!["tail".to_owned(), "-n".to_owned(), args.lines.to_string()];
            if args.follow {
                argv.push("-F".to_owned());
            }
            argv.push(path.display().to_string());
            argv
        }
    };
    let status = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .await
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))?;
    Ok(if status.success() {
        Code::Ok
    } else {
        Code::Error
    })
}
