//! `outbox-relay`: the standalone relay process. See the crate README.

use std::io::IsTerminal;
use std::process::ExitCode;

use outbox_relay::{cli::USAGE, Command, Config, ConfigError, StartError};

/// Prints the one error line and returns exit code 2 (or the error's own).
fn fail(message: &str, secrets: &[String], code: u8) -> ExitCode {
    let line = outbox_relay::redact::scrub(message, secrets).replace(['\n', '\r'], " ");
    eprintln!("outbox-relay: error: {line}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "outbox-relay: error: internal error{at}: {}",
            message.replace('\n', " ")
        );
    }));

    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(a) => args.push(a),
            Err(_) => {
                return fail(
                    &ConfigError::Usage("an argument is not valid UTF-8".into()).to_string(),
                    &[],
                    2,
                )
            }
        }
    }
    let (file, check) = match Command::parse(args) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("outbox-relay {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run { config, check }) => (config, check),
        Err(e) => return fail(&e.to_string(), &[], 2),
    };

    let config = match Config::from_env(file.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string(), &[], 2),
    };
    let secrets = config.secrets();

    // Logs go to stdout; stderr carries only the error line of a failed start.
    match tracing_subscriber::EnvFilter::builder().parse(&config.log) {
        Ok(filter) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stdout)
                .with_ansi(std::io::stdout().is_terminal())
                .try_init();
        }
        Err(e) => return fail(&format!("log filter: {e}"), &secrets, 2),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), &secrets, 2),
    };
    let result: Result<(), StartError> = runtime.block_on(outbox_relay::run(config, check));
    // Background tasks (listeners, reconnecting clients) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), &secrets, e.exit_code()),
    }
}
