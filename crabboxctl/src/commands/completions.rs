//! `crabboxctl completions <shell>`: prints a completion script generated
//! from the clap definition, so it never drifts from the real flags.

use std::io;

use clap_complete::Shell;

use crate::exit::Code;

/// Print a shell completion script.
///
/// For example: `crabboxctl completions bash > ~/.local/share/bash-completion/completions/crabboxctl`,
/// `crabboxctl completions zsh > "${fpath[1]}/_crabboxctl"`, or
/// `crabboxctl completions fish > ~/.config/fish/completions/crabboxctl.fish`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The shell to generate for.
    shell: Shell,
}

/// Runs `crabboxctl completions`.
pub fn run(args: &Args) -> anyhow::Result<Code> {
    // Generated into memory first: clap_complete panics on a write error,
    // and a closed pipe should end the command quietly.
    let mut script = Vec::new();
    generate(args.shell, &mut script);
    out!("{}", String::from_utf8_lossy(&script))?;
    Ok(Code::Ok)
}

fn generate(shell: Shell, out: &mut dyn io::Write) {
    clap_complete::generate(shell, &mut crate::cli_command(), "crabboxctl", out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum as _;

    #[test]
    fn every_shell_generates_a_script_naming_the_subcommands() {
        assert_eq!(Shell::value_variants().len(), 5);
        for shell in Shell::value_variants() {
            let mut buf = Vec::new();
            generate(*shell, &mut buf);
            let script = String::from_utf8(buf).unwrap();
            assert!(script.contains("crabboxctl"), "{shell}");
            assert!(script.contains("log-level"), "{shell}");
            if *shell == Shell::Bash {
                assert!(
                    !script.contains("crabboxctl__man"),
                    "the hidden man command leaked"
                );
            }
        }
    }
}
