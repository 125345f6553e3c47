//! Hand-rolled flag parsing shared by both binaries (`--flag VALUE` or
//! `--flag=VALUE`), kept dependency-free on purpose.

use std::collections::BTreeMap;

/// Parsed command line: flag name (without dashes) to value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parses `args` (without the program name). Every flag takes a value and
    /// must be listed in `known`; `--help` is reported as `Err(None)`.
    pub fn parse<I: IntoIterator<Item = String>>(
        args: I,
        known: &[&str],
    ) -> Result<Args, Option<String>> {
        let mut values = BTreeMap::new();
        let mut iter = args.into_iter();
        while let Some(arg) = iter.next() {
            if arg == "--help" || arg == "-h" {
                return Err(None);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(Some(format!("unexpected argument {arg:?}")));
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = iter
                        .next()
                        .ok_or_else(|| Some(format!("--{flag} needs a value")))?;
                    (flag.to_owned(), value)
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(Some(format!("unknown flag --{name}")));
            }
            values.insert(name, value);
        }
        Ok(Args { values })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The flag's value, else the environment variable's, else an error.
    pub fn required_or_env(&self, name: &str, env: &str) -> Result<String, String> {
        if let Some(v) = self.get(name) {
            return Ok(v.to_owned());
        }
        match std::env::var(env) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("--{name} or {env} must be set")),
        }
    }
}

/// LiveKit API credentials, shared by both services as in a real deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub key: String,
    pub secret: String,
}

impl Credentials {
    /// From `--key`/`--secret`, falling back to `LIVEKIT_KEY`/`LIVEKIT_SECRET`.
    pub fn from_args(args: &Args) -> Result<Credentials, String> {
        Ok(Credentials {
            key: args.required_or_env("key", "LIVEKIT_KEY")?,
            secret: args.required_or_env("secret", "LIVEKIT_SECRET")?,
        })
    }
}

/// Default `--listen` value: loopback, any free port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// The process exit of a binary's `run`: `Err(None)` asked for the usage (`--help`),
/// `Err(Some(message))` is a usage error (exit 2).
pub fn exit_code(
    name: &str,
    usage: &str,
    result: Result<(), Option<String>>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(None) => {
            println!("{usage}");
            std::process::ExitCode::SUCCESS
        }
        Err(Some(msg)) => {
            eprintln!("{name}: {msg}\n\n{usage}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, Option<String>> {
        Args::parse(args.iter().map(|s| s.to_string()), &["listen", "key"])
    }

    #[test]
    fn parses_both_forms() {
        let args = parse(&["--listen", "127.0.0.1:1", "--key=k"]).unwrap();
        assert_eq!(args.get("listen"), Some("127.0.0.1:1"));
        assert_eq!(args.get("key"), Some("k"));
        assert_eq!(args.get("secret"), None);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(&["--help"]), Err(None));
        assert!(parse(&["--nope", "x"]).is_err());
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["positional"]).is_err());
    }
}
