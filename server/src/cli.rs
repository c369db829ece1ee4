//! The command line of SPEC §1 through `clap`: `serve`, `check-config`, `token`, `migrate`,
//! `user set-role`, `completions`, with help per subcommand and `--version`. Every configuration
//! key is also a flag of the commands that read the configuration (`--max-message-bytes 131072`,
//! `--rate-limits.login-per-ip 60/1m`), generated from [`config::keys`] so that no key is
//! forgotten; the configuration layer, not clap, parses and checks their values. Output goes to
//! the writers it is given.

use std::io::Write;
use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, ArgMatches};

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
    /// `completions SHELL`: a completion script on standard output.
    Completions(clap_complete::Shell),
    /// Help or version text, already rendered.
    Print(String),
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What to do.
    pub command: Command,
    /// `--config FILE`.
    pub config_file: Option<PathBuf>,
    /// Configuration flags as `(--key, value)`, in the order given.
    pub overrides: Vec<(String, String)>,
}

/// A command line that cannot run: the message to print, ending in a hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

const CONFIG_HEADING: &str =
    "Configuration (every key; `ringhub check-config` shows the effective values)";

const AFTER_HELP: &str = "\
Every configuration key can be given as a flag (`--max-message-bytes 131072`,
`--rate-limits.login-per-ip 60/1m`), as an environment variable (`RINGHUB_MAX_MESSAGE_BYTES`,
`RINGHUB_RATE_LIMITS__LOGIN_PER_IP`) or in the TOML file; flags win over the environment, which
wins over the file. `ringhub <command> --help` lists the keys with their defaults.";

/// One flag per configuration key: `--rate-limits.login-per-ip`, also spelled with underscores;
/// a flag without a value means `true`.
fn config_args() -> Vec<Arg> {
    config::keys::all()
        .into_iter()
        .map(|key| {
            let long = key.name.replace('_', "-");
            let default = match (key.name.as_str(), key.default) {
                ("shards", _) => "default: the number of CPUs".to_owned(),
                (_, Some(d)) if d.is_empty() => "default: empty".to_owned(),
                (_, Some(d)) => format!("default: {d}"),
                (_, None) => "default: unset".to_owned(),
            };
            let mut arg = Arg::new(key.name.clone())
                .long(long.clone())
                .value_name("VALUE")
                .num_args(0..=1)
                .default_missing_value("true")
                .action(ArgAction::Append)
                .help(default)
                .help_heading(CONFIG_HEADING)
                .hide_short_help(true);
            if long != key.name {
                arg = arg.alias(key.name);
            }
            arg
        })
        .collect()
}

/// The whole command line, for parsing and for completion scripts.
pub fn command() -> clap::Command {
    let keys = config_args();
    let reads_config = |cmd: clap::Command| cmd.args(keys.iter().cloned());
    clap::Command::new("ringhub")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Accounts and tokens over HTTP, real-time rooms over WebSocket")
        .after_help(AFTER_HELP)
        .subcommand_required(true)
        .arg_required_else_help(true)
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .global(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration file (or RINGHUB_CONFIG)"),
        )
        .subcommand(reads_config(
            clap::Command::new("serve").about("Run the server (default 127.0.0.1:8080)"),
        ))
        .subcommand(reads_config(clap::Command::new("check-config").about(
            "Validate and print the effective configuration, secrets masked",
        )))
        .subcommand(reads_config(
            clap::Command::new("token")
                .about("Mint an access token with the configured signing key")
                .arg(
                    Arg::new("user")
                        .long("user")
                        .value_name("ID_OR_EMAIL")
                        .required(true)
                        .help("The account (an id that names no account is used as given)"),
                )
                .arg(
                    Arg::new("ttl")
                        .long("ttl")
                        .value_name("DURATION")
                        .help("Lifetime such as 15m or 1h (default: access_ttl)"),
                ),
        ))
        .subcommand(reads_config(
            clap::Command::new("migrate").about("Apply database migrations and exit"),
        ))
        .subcommand(
            clap::Command::new("user")
                .about("Manage accounts")
                .subcommand_required(true)
                .subcommand(reads_config(
                    clap::Command::new("set-role")
                        .about("Grant or remove the global admin role")
                        .arg(Arg::new("email").value_name("EMAIL").required(true))
                        .arg(
                            Arg::new("role")
                                .value_name("ROLE")
                                .required(true)
                                .value_parser(["admin", "user"]),
                        ),
                )),
        )
        .subcommand(
            clap::Command::new("completions")
                .about("Print a shell completion script")
                .arg(
                    Arg::new("shell")
                        .value_name("SHELL")
                        .required(true)
                        .value_parser(clap::value_parser!(clap_complete::Shell)),
                ),
        )
        .subcommand(clap::Command::new("version").about("Print the version"))
}

/// The configuration flags of `matches` in the order they were written.
fn overrides(matches: &ArgMatches) -> Vec<(String, String)> {
    let mut given = Vec::new();
    for key in config::keys::all() {
        // `try_`: commands that read no configuration do not define these flags.
        let Ok(Some(values)) = matches.try_get_many::<String>(&key.name) else {
            continue;
        };
        let Some(indices) = matches.indices_of(&key.name) else {
            continue;
        };
        let flag = format!("--{}", key.name.replace('_', "-"));
        for (index, value) in indices.zip(values) {
            given.push((index, flag.clone(), value.clone()));
        }
    }
    given.sort_by_key(|(index, _, _)| *index);
    given
        .into_iter()
        .map(|(_, flag, value)| (flag, value))
        .collect()
}

fn context(error: &clap::Error, kind: ContextKind) -> Option<String> {
    match error.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}

/// A clap error as this program says it: an unknown command or configuration key by name,
/// anything else in clap's words.
fn usage_error(error: &clap::Error) -> UsageError {
    let hint = "see `ringhub --help`";
    match error.kind() {
        ErrorKind::InvalidSubcommand => {
            let name = context(error, ContextKind::InvalidSubcommand).unwrap_or_default();
            UsageError(format!("unknown command `{name}` ({hint})"))
        }
        ErrorKind::UnknownArgument => {
            let flag = context(error, ContextKind::InvalidArg).unwrap_or_default();
            let flag = flag.split('=').next().unwrap_or_default().to_owned();
            let key = flag.trim_start_matches('-').replace('-', "_");
            let suggestion = context(error, ContextKind::SuggestedArg)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            UsageError(format!(
                "unknown configuration key `{key}` (from flag {flag}){suggestion} ({hint})"
            ))
        }
        _ => UsageError(
            error
                .render()
                .to_string()
                .trim_start_matches("error: ")
                .trim_end()
                .to_owned(),
        ),
    }
}

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Invocation, UsageError> {
    let matches = match command()
        .try_get_matches_from(std::iter::once("ringhub".to_owned()).chain(args.iter().cloned()))
    {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            return Ok(Invocation {
                command: Command::Print(e.render().to_string()),
                config_file: None,
                overrides: Vec::new(),
            });
        }
        Err(e) => return Err(usage_error(&e)),
    };
    let config_file = matches.get_one::<PathBuf>("config").cloned();
    let (command, sub) = match matches.subcommand() {
        Some(("serve", sub)) => (Command::Serve, sub),
        Some(("check-config", sub)) => (Command::CheckConfig, sub),
        Some(("migrate", sub)) => (Command::Migrate, sub),
        Some(("token", sub)) => (
            Command::Token {
                user: sub.get_one::<String>("user").cloned().unwrap_or_default(),
                ttl: sub.get_one::<String>("ttl").cloned(),
            },
            sub,
        ),
        Some(("user", user)) => match user.subcommand() {
            Some(("set-role", sub)) => (
                Command::UserSetRole {
                    email: sub.get_one::<String>("email").cloned().unwrap_or_default(),
                    role: sub.get_one::<String>("role").cloned().unwrap_or_default(),
                },
                sub,
            ),
            _ => {
                return Err(UsageError(
                    "usage: ringhub user set-role EMAIL admin|user".into(),
                ));
            }
        },
        Some(("completions", sub)) => {
            let shell = sub
                .get_one::<clap_complete::Shell>("shell")
                .copied()
                .unwrap_or(clap_complete::Shell::Bash);
            (Command::Completions(shell), sub)
        }
        Some(("version", sub)) => (
            Command::Print(format!("ringhub {}\n", env!("CARGO_PKG_VERSION"))),
            sub,
        ),
        _ => (
            Command::Print(command().render_help().to_string()),
            &matches,
        ),
    };
    Ok(Invocation {
        command,
        config_file,
        overrides: overrides(sub),
    })
}

/// Why a command failed; each says which exit code it means.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The configuration (or its secrets) is invalid: exit 2.
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    /// An argument's value is invalid: exit 2.
    #[error("{flag}: {why}")]
    Argument {
        /// The flag.
        flag: &'static str,
        /// Why.
        why: String,
    },
    /// The server or a service could not start: exit 1.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    /// Storage failed while the command ran: exit 1.
    #[error(transparent)]
    Storage(#[from] storage::StoreError),
    /// No account has that e-mail: exit 1.
    #[error("no account with that e-mail")]
    NoAccount,
    /// The token could not be signed: exit 1.
    #[error("cannot mint token: {0}")]
    Mint(String),
}

impl CommandError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Argument { .. } => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
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
    match execute(inv, env, out) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "ringhub: {e}");
            e.exit_code()
        }
    }
}

fn execute(
    inv: &Invocation,
    env: Vec<(String, String)>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let version = env!("CARGO_PKG_VERSION");
    match &inv.command {
        Command::Print(text) => {
            let _ = write!(out, "{text}");
            return Ok(());
        }
        Command::Completions(shell) => {
            clap_complete::generate(*shell, &mut command(), "ringhub", out);
            return Ok(());
        }
        _ => {}
    }
    let config = load_config(inv, env)?;
    let generate = if inv.command == Command::CheckConfig {
        secrets::Generate::Forbidden
    } else {
        secrets::Generate::Allowed
    };
    let (secrets, notes) = secrets::resolve(&config, generate)?;
    if inv.command == Command::CheckConfig {
        // The certificate and key must load and belong together, as `serve` needs them.
        if let Some((cert, key)) = &config.tls {
            crate::tls::load(cert, key).map_err(|e| ConfigError(e.to_string()))?;
        }
        if config.redis_tls {
            crate::tls::client_config(config.redis_ca_file.as_deref())
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        let _ = writeln!(
            out,
            "# ringhub {version}: configuration is valid (mode = {:?})",
            config.mode
        );
        let _ = write!(out, "{}", config.to_masked_toml(&notes));
        return Ok(());
    }
    let secrets = secrets.ok_or_else(|| ConfigError("secrets are missing".into()))?;
    match &inv.command {
        Command::Serve => crate::serve::serve(&config, &secrets)?,
        Command::Token { user, ttl } => {
            let ttl = match ttl {
                Some(text) => config::parse_duration(text)
                    .map_err(|why| CommandError::Argument { flag: "--ttl", why })?,
                None => config.accounts.access_ttl,
            };
            let tokens = crate::serve::token_service(&config, &secrets)?;
            let store = crate::serve::open_store(&config)?;
            // A registered user (by id or e-mail) gets its real id and name; an id that names no
            // account mints a token for that id as given (load tools, tests), an e-mail must exist.
            let (id, name) =
                match crate::accounts::find_user(&*store, &secrets.blind_index_key, user)? {
                    Some(u) => (u.id, u.username),
                    None if !user.contains('@') => (user.clone(), user.clone()),
                    None => return Err(CommandError::NoAccount),
                };
            let (token, _) = tokens
                .mint(&id, &name, "", ttl.as_secs().max(1), None)
                .map_err(CommandError::Mint)?;
            let _ = writeln!(out, "{token}");
        }
        Command::Migrate => {
            let store = crate::serve::open_store(&config)?;
            let v = store.schema_version()?;
            let _ = writeln!(out, "ringhub: {} schema at version {v}", store.kind());
        }
        Command::UserSetRole { email, role } => {
            let role = storage::Role::parse(role).unwrap_or(storage::Role::User);
            let store = crate::serve::open_store(&config)?;
            let user = crate::accounts::find_user(&*store, &secrets.blind_index_key, email)?
                .ok_or(CommandError::NoAccount)?;
            store.set_role(&user.id, role)?;
            let _ = writeln!(
                out,
                "ringhub: user {} now has role {}",
                user.id,
                role.as_str()
            );
            // Running nodes re-read the admins every 2 s; with Redis they are told at once.
            if let Some(redis) = &config.engine.redis {
                let told = crate::announce::Announcement::AdminsChanged.encode();
                if let Err(why) = engine::tell_nodes_blocking(redis, &told) {
                    let _ = writeln!(
                        out,
                        "ringhub: the running nodes will see it within 2 s ({why})"
                    );
                }
            }
        }
        Command::CheckConfig | Command::Print(_) | Command::Completions(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }

    #[test]
    fn parses_commands_and_config_flags_in_order() {
        let inv = parse_args(&args(
            "serve --config a.toml --listen 127.0.0.1:9 --behind-proxy --shards=2 \
             --rate_limits.login_per_ip 5/1m --default-rooms a,b",
        ))
        .unwrap();
        assert_eq!(inv.command, Command::Serve);
        assert_eq!(inv.config_file, Some(PathBuf::from("a.toml")));
        assert_eq!(
            inv.overrides,
            vec![
                ("--listen".into(), "127.0.0.1:9".into()),
                ("--behind-proxy".into(), "true".into()),
                ("--shards".into(), "2".into()),
                ("--rate-limits.login-per-ip".into(), "5/1m".into()),
                ("--default-rooms".into(), "a,b".into()),
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
        assert_eq!(
            parse_args(&args("completions bash")).unwrap().command,
            Command::Completions(clap_complete::Shell::Bash)
        );
    }

    #[test]
    fn help_and_version_are_printed() {
        let Command::Print(top) = parse_args(&[]).unwrap().command else {
            panic!("no help")
        };
        assert!(
            top.contains("check-config") && top.contains("serve"),
            "{top}"
        );
        let Command::Print(serve) = parse_args(&args("serve --help")).unwrap().command else {
            panic!("no help")
        };
        assert!(serve.contains("--rate-limits.login-per-ip"), "{serve}");
        assert!(serve.contains("default: 127.0.0.1:8080"), "{serve}");
        let Command::Print(version) = parse_args(&args("--version")).unwrap().command else {
            panic!("no version")
        };
        assert_eq!(
            version.trim(),
            concat!("ringhub ", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn refuses_bad_usage() {
        assert!(parse_args(&args("token")).unwrap_err().0.contains("--user"));
        assert!(
            parse_args(&args("launch"))
                .unwrap_err()
                .0
                .contains("unknown command `launch`")
        );
        assert!(parse_args(&args("user set-role a@b.c root")).is_err());
        assert!(parse_args(&args("serve --user x")).is_err());
        assert!(parse_args(&args("serve -x")).is_err());
        let unknown = parse_args(&args("check-config --colour blue"))
            .unwrap_err()
            .0;
        assert!(
            unknown.contains("`colour`") && unknown.contains("--colour"),
            "{unknown}"
        );
    }
}
