//! The command line: global options and one subcommand per documented command.

mod admin;
pub mod bench;
mod chat;
pub mod serve;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ImplementationKind};
use crate::engine::{EngineHandle, EngineOptions};

#[derive(Debug, Parser)]
#[command(
    name = "moss",
    version,
    about = "A self-hostable chat service in front of one language model"
)]
pub struct Cli {
    /// Configuration file (defaults are built in; MOSS_* environment variables override both).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Database URL (sqlite://FILE or postgres://…), overriding database.url.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the web service.
    Serve(serve::ServeArgs),
    /// Operator commands (invites, waitlist, users, feedback export).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Chat in the terminal (one answer with --prompt, a REPL otherwise).
    Chat(chat::ChatArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Print the token ids of TEXT (no special tokens added) as a JSON array.
    Tokenize(TokenizeArgs),
    /// Development helpers.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

/// Options shared by every command that loads the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// GGUF model file (default: the configured model, else the default model, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to tokenize.
    pub text: String,
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Write a tiny random-weight GGUF (qwen2, llama or gemma3) for tests and load scripts.
    TinyModel {
        out: PathBuf,
        #[arg(long, default_value = "qwen2")]
        arch: String,
    },
    /// Store a question and a given answer in a new conversation of EMAIL (UI tests of rendering).
    SeedAnswer {
        #[arg(long)]
        email: String,
        #[arg(long)]
        question: String,
        #[arg(long)]
        answer: String,
    },
}

/// Starts logging to stderr (`RUST_LOG` wins over `-v`); a server logs at info by default.
pub fn init_tracing(verbose: u8, server: bool) {
    let default = match (verbose, server) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info,sqlx=warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(url) = cli.database_url {
        config.database.url = url;
    }
    match cli.command {
        Command::Serve(args) => serve::run(config, args),
        Command::Admin(cmd) => admin::run(config, cmd),
        Command::Chat(args) => chat::run(&config, args),
        Command::Bench(args) => bench::run(&config, args),
        Command::Tokenize(args) => tokenize(&config, args),
        Command::Debug(DebugCommand::TinyModel { out, arch }) => {
            let arch = match arch.as_str() {
                "qwen2" => crate::engine::Arch::Qwen2,
                "llama" => crate::engine::Arch::Llama,
                "gemma3" => crate::engine::Arch::Gemma3,
                other => anyhow::bail!("unknown architecture {other} (qwen2, llama, gemma3)"),
            };
            crate::engine::tiny::write_tiny_model(&out, &crate::engine::tiny::TinySpec::new(arch))
        }
        Command::Debug(DebugCommand::SeedAnswer {
            email,
            question,
            answer,
        }) => seed_answer(&config, &email, &question, &answer),
    }
}

/// Engine options from config and command-line overrides.
pub fn engine_options(config: &Config, args: &ModelArgs) -> anyhow::Result<EngineOptions> {
    let model = match args.model.clone().or_else(|| config.model_path()) {
        Some(path) => path,
        None => crate::models::ensure_default_model()?,
    };
    let e = &config.engine;
    Ok(EngineOptions {
        model,
        device: args.device.clone().unwrap_or_else(|| e.device.clone()),
        max_context: e.max_context,
        queue_capacity: e.queue_capacity,
        token_delay: Duration::from_millis(e.token_delay_ms),
        // The engine runs as many answers at once as the service admits as running.
        max_batch: e.max_batch.min(config.limits.max_running).max(1),
        kv_cache_bytes: e.kv_cache_mb << 20,
        nice: e.nice,
        lookup: crate::engine::lookup::LookupOptions {
            max_batch: e.lookup_max_batch,
            max_draft: e.lookup_max_draft,
        },
        implementation: match e.implementation {
            ImplementationKind::Candle => crate::engine::model::Implementation::Candle,
            ImplementationKind::Moss => crate::engine::model::Implementation::Moss,
        },
    })
}

/// Loads the engine for a command, with the error naming the file.
pub fn start_engine(config: &Config, args: &ModelArgs) -> anyhow::Result<EngineHandle> {
    Ok(EngineHandle::start(engine_options(config, args)?)?)
}

fn tokenize(config: &Config, args: TokenizeArgs) -> anyhow::Result<()> {
    // Only the tokenizer is needed: read the header, not the weights.
    let opts = engine_options(config, &args.model)?;
    let file = crate::engine::gguf::ModelFile::open(&opts.model)?;
    let tok = crate::engine::tokenizer::load(&file.path, &file.content).map_err(|source| {
        crate::engine::LoadError::Tokenizer {
            path: file.path.clone(),
            source,
        }
    })?;
    let mut plain = tok;
    plain.set_encode_special_tokens(true);
    let enc = plain
        .encode(args.text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
    println!("{}", serde_json::to_string(enc.get_ids())?);
    Ok(())
}

fn seed_answer(config: &Config, email: &str, question: &str, answer: &str) -> anyhow::Result<()> {
    use crate::db::chats::{self, NewMessage};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let db = serve::open_db(config).await?;
        let user = crate::db::accounts::user_by_email(&db, email)
            .await?
            .ok_or_else(|| anyhow::anyhow!("unknown email {email}"))?;
        let conv = chats::create_conversation(&db, user.id, question, "web").await?;
        let q = NewMessage {
            place: crate::db::chats::Place::AtLeaf,
            author: chats::Author::User,
            content: question,
            finish_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        let a = NewMessage {
            place: crate::db::chats::Place::AtLeaf,
            author: chats::Author::Model,
            content: answer,
            finish_reason: Some("stop"),
            prompt_tokens: 0,
            completion_tokens: 0,
        };
        chats::add_message(&db, user.id, conv.id, &q).await?;
        chats::add_message(&db, user.id, conv.id, &a).await?;
        println!("{}", conv.id);
        Ok(())
    })
}
