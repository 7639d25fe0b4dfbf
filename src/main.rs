//! `moss`: parse the command line, load config, start logging, hand over.

use clap::Parser;

fn main() {
    let cli = moss::cli::Cli::parse();
    moss::cli::init_tracing(
        cli.verbose,
        matches!(cli.command, moss::cli::Command::Serve(_)),
    );
    if let Err(e) = moss::cli::run(cli) {
        eprintln!("moss: {e:#}");
        std::process::exit(1);
    }
}
