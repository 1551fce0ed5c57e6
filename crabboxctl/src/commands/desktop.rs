//! `crabboxctl desktop launch --id L --browser [--url U] --egress [PROFILE]`:
//! the lease's browser, detached in its display, through the lease's
//! running egress helper (refused when none runs).

use crabbox_api::v1::LaunchBrowserRequest;

use crate::{Ctx, connect, exit::Code, exit::Failure, output};

/// Launch things in a lease's desktop.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Launch the lease's browser through its egress helper.
    Launch {
        /// The lease id or slug.
        #[arg(long)]
        id: String,
        /// Launch the browser (from /var/lib/crabbox/browser.env, else chromium or google-chrome).
        #[arg(long)]
        browser: bool,
        /// The page to open.
        #[arg(long)]
        url: Option<String>,
        /// Send the browser through the lease's egress (started with `egress start`); the
        /// profile name is optional and only informs.
        #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "PROFILE")]
        egress: Option<String>,
        /// Print JSON (unstable format).
        #[arg(long)]
        json: bool,
    },
}

/// Runs `crabboxctl desktop …`.
pub async fn run(ctx: &Ctx, args: &Args) -> anyhow::Result<Code> {
    let Command::Launch {
        id,
        browser,
        url,
        egress,
        json,
    } = &args.command;
    if !*browser {
        return Err(Failure {
            code: Code::Usage,
            message: "desktop launch needs --browser (the browser is what it launches)".into(),
            hints: vec![format!(
                "crabboxctl desktop launch --id {id} --browser --egress"
            )],
        }
        .into());
    }
    let Some(profile) = egress else {
        return Err(Failure {
            code: Code::Usage,
            message: "desktop launch launches the browser through the lease's egress; pass --egress".into(),
            hints: vec![format!(
                "crabboxctl egress start --id {id} --profile <profile>, then crabboxctl desktop launch --id {id} --browser --egress"
            )],
        }
        .into());
    };
    let client = connect::connect(&ctx.socket).await?;
    let req = LaunchBrowserRequest {
        lease_id: id.clone(),
        url: url.clone().unwrap_or_default(),
        egress_profile: profile.clone(),
        agent_socket: super::exec::agent_socket(),
    };
    let l = connect::call_coordinator(
        &ctx.socket,
        "LaunchBrowser",
        client.desktop().launch_browser(req),
    )
    .await?
    .into_inner();
    if *json {
        output::print_json(&serde_json::json!({
            "lease_id": id,
            "argv": l.argv,
            "pid": l.pid,
            "proxy": l.proxy,
            "session_id": l.session_id,
            "profile_dir": l.profile_dir,
        }))?;
    } else {
        outln!("launched: {}", l.argv.join(" "))?;
        outln!(
            "browser pid {} on lease {id}, through {} (egress session {}), profile {}",
            l.pid,
            l.proxy,
            l.session_id,
            l.profile_dir
        )?;
    }
    Ok(Code::Ok)
}
