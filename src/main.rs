//! Entry point: parse the command line, run the command, map the result to an exit code
//! (0 success, 1 some socket failed, 2 usage, privilege or config error).

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use cwreap::cli::args::{Cli, Command};
use cwreap::cli::commands::{self, Status};
use cwreap::shared::usage::UsageError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One big buffer: a 100k-line `scan --json` is one write per 64 KiB, not per line.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut err = std::io::stderr();
    let result = match &cli.command {
        Command::Scan(args) => commands::scan(args, &mut out, &mut err),
        Command::Reap(args) => commands::reap(args, &mut out, &mut err),
        Command::Explain(args) => commands::explain(args, &mut out, &mut err),
        Command::Run(args) => {
            cwreap::daemon::run(&args.config, args.dry_run, args.pid_file.as_deref())
                .map(|()| Status::Ok)
        }
        Command::Check(args) => commands::check(&args.config, &mut out, &mut err),
        Command::Completions(args) => {
            cwreap::cli::manual::completions(args.shell, &mut out);
            Ok(Status::Ok)
        }
        Command::Generate(args) => cwreap::cli::manual::generate(&args.out_dir).map(|files| {
            eprintln!("wrote {} into {}", files.join(", "), args.out_dir.display());
            Status::Ok
        }),
        Command::InjectHelper => std::process::exit(cwreap_linux::inject::helper_main()),
    };
    let result = result.and_then(|status| {
        out.flush()?;
        Ok(status)
    });
    match result {
        Ok(Status::Ok) => ExitCode::SUCCESS,
        Ok(Status::Failed) => ExitCode::from(1),
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("cwreap: {e}");
            ExitCode::from(2)
        }
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cwreap: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `cwreap scan | head` closes our stdout early; that is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
