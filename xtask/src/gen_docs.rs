//! `cis490-gen-docs OUT_DIR`: writes the man pages (one per binary and one per subcommand) and
//! the bash, zsh and fish completions of both daemons, from their real `clap` definitions, for
//! the Debian packages (`scripts/package.sh` compresses the pages and packs them).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// Both daemons: their installed name and their command line.
fn commands() -> [(&'static str, clap::Command); 2] {
    [
        ("cis490-shipper", cis490_shipper::cli::Cli::command()),
        ("cis490-receiver", cis490_receiver::cli::Cli::command()),
    ]
}

fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("failed to create {}", d.display()))?;
    }
    let mut written = Vec::new();
    for (name, cmd) in commands() {
        // The page footer names the package version, not the build's commit: the same source
        // gives the same pages.
        let cmd = cmd.version(env!("CARGO_PKG_VERSION")).name(name);
        clap_mangen::generate_to(cmd.clone(), &man)
            .with_context(|| format!("failed to write the man pages of {name}"))?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut cmd = cmd.clone();
            let path = clap_complete::generate_to(shell, &mut cmd, name, &completions)
                .with_context(|| format!("failed to write the {shell} completion of {name}"))?;
            written.push(path);
        }
    }
    for e in std::fs::read_dir(&man).with_context(|| format!("failed to list {}", man.display()))? {
        written.push(e?.path());
    }
    written.sort();
    Ok(written)
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let run = || -> Result<()> {
        let [out] = args.as_slice() else {
            bail!("usage: cis490-gen-docs OUT_DIR");
        };
        for path in generate(Path::new(out))? {
            println!("{}", path.display());
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cis490-gen-docs: {e:#}");
            ExitCode::from(2)
        }
    }
}
