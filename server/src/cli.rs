//! The command line of SPEC §1: `serve`, `token`, `migrate`, `check-config`, `user set-role`.
//! Parses arguments (every `--key value` that is not a command's own option is a configuration
//! flag), loads the configuration and dispatches. Output goes to the writers it is given.

use std::io::Write;
use std::path::PathBuf;

use crate::config::{self, Config, ConfigError, secrets};

/// Exit code of a usage or configuration error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code of a command that failed while running.
pub const EXIT_FAILURE: i32 = 1;

/// A subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `serve`.
    Serve,
    /// `check-config`.
    CheckConfig,
    /// `token --user ID_OR_EMAIL [--ttl 15m]`.
    Token {
        /// User id or e-mail.
        user: String,
        /// Lifetime.
        ttl: Option<String>,
    },
    /// `migrate`.
    Migrate,
    /// `user set-role EMAIL admin|user`.
    UserSetRole {
        /// The account's e-mail.
        email: String,
        /// `admin` or `user`.
        role: String,
    },
    /// `version`, `--version`, `-V`.
    Version,
    /// `help`, `--help`, `-h`, or no arguments.
    Help,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What to do.
    pub command: Command,
    /// `--config FILE`.
    pub config_file: Option<PathBuf>,
    /// Configuration flags, in order.
    pub overrides: Vec<(String, String)>,
}

/// The help text.
pub const USAGE: &str = "\
ringhub — accounts and tokens over HTTP, real-time rooms over WebSocket

USAGE:
    ringhub serve [--config FILE] [--KEY VALUE ...]   run the server (default 127.0.0.1:8080)
    ringhub check-config [--config FILE] [...]        validate and print the effective configuration
    ringhub token --user ID_OR_EMAIL [--ttl 15m]      mint an access token with the configured key
    ringhub migrate [--config FILE]                   apply database migrations and exit
    ringhub user set-role EMAIL admin|user            grant or remove the global admin role
    ringhub version

Every configuration key can be given as a flag (`--max-message-bytes 131072`,
`--rate-limits.login-per-ip 60/1m`), as an environment variable (`RINGHUB_MAX_MESSAGE_BYTES`,
`RINGHUB_RATE_LIMITS__LOGIN_PER_IP`) or in the TOML file; flags win over the environment, which
wins over the file. `ringhub check-config` lists every key with its effective value.
";

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Invocation, String> {
    let mut positional = Vec::new();
    let mut config_file = None;
    let mut overrides = Vec::new();
    let mut user = None;
    let mut ttl = None;
    let mut i = 0;
    let mut wants_help = false;
    let mut wants_version = false;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        match arg.as_str() {
            "-h" | "--help" => wants_help = true,
            "-V" | "--version" => wants_version = true,
            _ if arg.starts_with("--") => {
                let (name, value) = match arg.split_once('=') {
                    Some((n, v)) => (n.to_owned(), v.to_owned()),
                    None => {
                        // A flag followed by another flag (or nothing) is a boolean switch.
                        let value = match args.get(i) {
                            Some(next) if !next.starts_with("--") => {
                                i += 1;
                                next.clone()
                            }
                            _ => "true".to_owned(),
                        };
                        (arg.clone(), value)
                    }
                };
                match name.as_str() {
                    "--config" => config_file = Some(PathBuf::from(value)),
                    "--user" => user = Some(value),
                    "--ttl" => ttl = Some(value),
                    _ => overrides.push((name, value)),
                }
            }
            _ if arg.starts_with('-') && arg.len() > 1 => {
                return Err(format!("unknown option `{arg}`"));
            }
            _ => positional.push(arg.clone()),
        }
    }
    let words: Vec<&str> = positional.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        _ if wants_help => Command::Help,
        _ if wants_version => Command::Version,
        [] | ["help"] => Command::Help,
        ["version"] => Command::Version,
        ["serve"] => Command::Serve,
        ["check-config"] => Command::CheckConfig,
        ["migrate"] => Command::Migrate,
        ["token"] => Command::Token {
            user: user
                .take()
                .ok_or("`ringhub token` needs --user ID_OR_EMAIL")?,
            ttl: ttl.take(),
        },
        ["user", "set-role", email, role] => {
            if !matches!(*role, "admin" | "user") {
                return Err(format!("role must be `admin` or `user`, not `{role}`"));
            }
            Command::UserSetRole {
                email: (*email).to_owned(),
                role: (*role).to_owned(),
            }
        }
        ["user", ..] => return Err("usage: ringhub user set-role EMAIL admin|user".into()),
        [other, ..] => return Err(format!("unknown command `{other}` (see `ringhub help`)")),
    };
    if user.is_some() || ttl.is_some() {
        return Err("--user and --ttl belong to `ringhub token`".into());
    }
    Ok(Invocation {
        command,
        config_file,
        overrides,
    })
}

fn load_config(inv: &Invocation, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let (raw, layers) = config::load(inv.config_file.clone(), env, &inv.overrides)?;
    Config::validate(raw, &layers)
}

/// Runs a parsed invocation; returns the process exit code.
pub fn run(
    inv: &Invocation,
    env: Vec<(String, String)>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let version = env!("CARGO_PKG_VERSION");
    match &inv.command {
        Command::Help => {
            let _ = write!(out, "{USAGE}");
            return 0;
        }
        Command::Version => {
            let _ = writeln!(out, "ringhub {version}");
            return 0;
        }
        _ => {}
    }
    let config = match load_config(inv, env) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "ringhub: configuration error: {e}");
            return EXIT_USAGE;
        }
    };
    let generate = if inv.command == Command::CheckConfig {
        secrets::Generate::Forbidden
    } else {
        secrets::Generate::Allowed
    };
    let (secrets, notes) = match secrets::resolve(&config, generate) {
        Ok(resolved) => resolved,
        Err(e) => {
            let _ = writeln!(err, "ringhub: configuration error: {e}");
            return EXIT_USAGE;
        }
    };
    if inv.command == Command::CheckConfig {
        let _ = writeln!(
            out,
            "# ringhub {version}: configuration is valid (mode = {:?})",
            config.mode
        );
        let _ = write!(out, "{}", config.to_masked_toml(&notes));
        return 0;
    }
    let Some(secrets) = secrets else {
        let _ = writeln!(err, "ringhub: secrets are missing");
        return EXIT_USAGE;
    };
    match &inv.command {
        Command::Serve => match crate::serve::serve(&config, &secrets) {
            Ok(()) => 0,
            Err(e) => {
                let _ = writeln!(err, "ringhub: {e}");
                EXIT_FAILURE
            }
        },
        Command::Token { user, ttl } => {
            let ttl = match ttl.as_deref().map(config::parse_duration).transpose() {
                Ok(ttl) => ttl.unwrap_or(config.access_ttl),
                Err(e) => {
                    let _ = writeln!(err, "ringhub: --ttl: {e}");
                    return EXIT_USAGE;
                }
            };
            let tokens = match crate::serve::token_service(&config, &secrets) {
                Ok(t) => t,
                Err(e) => {
                    let _ = writeln!(err, "ringhub: {e}");
                    return EXIT_FAILURE;
                }
            };
            // A registered user (by id or e-mail) gets its real id and name; an id that names no
            // account mints a token for that id as given (load tools, tests), an e-mail must exist.
            let found = match crate::serve::open_store(&config) {
                Ok(store) => crate::accounts::find_user(&*store, &secrets.blind_index_key, user)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let (id, name) = match found {
                Ok(Some(u)) => (u.id, u.username),
                Ok(None) if !user.contains('@') => (user.clone(), user.clone()),
                Ok(None) => {
                    let _ = writeln!(err, "ringhub: no account with that e-mail");
                    return EXIT_FAILURE;
                }
                Err(e) => {
                    let _ = writeln!(err, "ringhub: {e}");
                    return EXIT_FAILURE;
                }
            };
            match tokens.mint(&id, &name, "", ttl.as_secs().max(1), None) {
                Ok((token, _)) => {
                    let _ = writeln!(out, "{token}");
                    0
                }
                Err(e) => {
                    let _ = writeln!(err, "ringhub: cannot mint token: {e}");
                    EXIT_FAILURE
                }
            }
        }
        Command::Migrate => match crate::serve::open_store(&config) {
            Ok(store) => match store.schema_version() {
                Ok(v) => {
                    let _ = writeln!(out, "ringhub: {} schema at version {v}", store.kind());
                    0
                }
                Err(e) => {
                    let _ = writeln!(err, "ringhub: {e}");
                    EXIT_FAILURE
                }
            },
            Err(e) => {
                let _ = writeln!(err, "ringhub: {e}");
                EXIT_FAILURE
            }
        },
        Command::UserSetRole { email, role } => {
            let role = storage::Role::parse(role).unwrap_or(storage::Role::User);
            let result = crate::serve::open_store(&config).and_then(|store| {
                let user = crate::accounts::find_user(&*store, &secrets.blind_index_key, email)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "no account with that e-mail".to_owned())?;
                store.set_role(&user.id, role).map_err(|e| e.to_string())?;
                Ok(user.id)
            });
            match result {
                Ok(id) => {
                    let _ = writeln!(out, "ringhub: user {id} now has role {}", role.as_str());
                    0
                }
                Err(e) => {
                    let _ = writeln!(err, "ringhub: {e}");
                    EXIT_FAILURE
                }
            }
        }
        Command::CheckConfig | Command::Help | Command::Version => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_commands_and_config_flags() {
        let inv = parse_args(&args(
            "serve --config a.toml --listen 127.0.0.1:9 --behind-proxy --shards=2",
        ))
        .unwrap();
        assert_eq!(inv.command, Command::Serve);
        assert_eq!(inv.config_file, Some(PathBuf::from("a.toml")));
        assert_eq!(
            inv.overrides,
            vec![
                ("--listen".into(), "127.0.0.1:9".into()),
                ("--behind-proxy".into(), "true".into()),
                ("--shards".into(), "2".into())
            ]
        );
        let inv = parse_args(&args("token --user alice@example.com --ttl 1h")).unwrap();
        assert_eq!(
            inv.command,
            Command::Token {
                user: "alice@example.com".into(),
                ttl: Some("1h".into())
            }
        );
        assert_eq!(
            parse_args(&args("user set-role a@b.c admin"))
                .unwrap()
                .command,
            Command::UserSetRole {
                email: "a@b.c".into(),
                role: "admin".into()
            }
        );
        assert_eq!(parse_args(&[]).unwrap().command, Command::Help);
        assert_eq!(
            parse_args(&args("serve --help")).unwrap().command,
            Command::Help
        );
    }

    #[test]
    fn refuses_bad_usage() {
        assert!(parse_args(&args("token")).unwrap_err().contains("--user"));
        assert!(
            parse_args(&args("launch"))
                .unwrap_err()
                .contains("unknown command `launch`")
        );
        assert!(parse_args(&args("user set-role a@b.c root")).is_err());
        assert!(parse_args(&args("serve --user x")).is_err());
        assert!(parse_args(&args("serve -x")).is_err());
    }
}
