//! The command-line grammar of Go's `flag` package, for the drop-in modes that stand in for
//! Go programs (gvproxy): `-name value`, `-name=value`, the same with `--`; a boolean flag
//! is `-name` or `-name=true|false` (never `-name false`); a flag's value may begin with a
//! dash (`-ssh-port -1`); parsing stops at the first argument that is not a flag, and at
//! `--`. Mistakes are Go's messages, so a caller sees the same words.

use std::ffi::OsString;

/// One flag: its name and whether it is boolean.
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    pub name: &'static str,
    pub boolean: bool,
}

/// A flag that takes a value.
pub const fn value(name: &'static str) -> Flag {
    Flag { name, boolean: false }
}

/// A boolean flag.
pub const fn boolean(name: &'static str) -> Flag {
    Flag { name, boolean: true }
}

/// What was given: the flags in order (a boolean's value is "true" or "false"), and the
/// arguments after the flags.
#[derive(Debug, Default, PartialEq)]
pub struct Given {
    pub flags: Vec<(&'static str, String)>,
    pub rest: Vec<OsString>,
}

/// Why parsing stopped.
#[derive(Debug, PartialEq)]
pub enum Stop {
    /// `-h`, `-help` (not defined by the program): print the usage, exit 0.
    Help,
    /// A mistake, in Go's words: print it and the usage, exit 2.
    Mistake(String),
}

/// Parses `args` (without the program name) against `flags`.
pub fn parse(flags: &[Flag], args: &[OsString]) -> Result<Given, Stop> {
    let mut given = Given::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_string_lossy().into_owned();
        if arg.len() < 2 || !arg.starts_with('-') {
            break;
        }
        let body = arg.strip_prefix("--").unwrap_or(&arg[1..]);
        if body.is_empty() {
            // "--": the end of the flags.
            i += 1;
            break;
        }
        if body.starts_with('-') || body.starts_with('=') {
            return Err(Stop::Mistake(format!("bad flag syntax: {arg}")));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(flag) = flags.iter().find(|f| f.name == name) else {
            if name == "h" || name == "help" {
                return Err(Stop::Help);
            }
            return Err(Stop::Mistake(format!("flag provided but not defined: -{name}")));
        };
        let v = if flag.boolean {
            match inline.as_deref() {
                None => "true".to_string(),
                Some(v) => match parse_bool(v) {
                    Some(b) => b.to_string(),
                    None => return Err(Stop::Mistake(format!("invalid boolean value {v:?} for -{name}: parse error"))),
                },
            }
        } else if let Some(v) = inline {
            v
        } else {
            i += 1;
            match args.get(i) {
                Some(v) => v.to_string_lossy().into_owned(),
                None => return Err(Stop::Mistake(format!("flag needs an argument: -{name}"))),
            }
        };
        given.flags.push((flag.name, v));
        i += 1;
    }
    given.rest = args[i..].to_vec();
    Ok(given)
}

/// Go's strconv.ParseBool.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// An int flag's value as Go parses it (decimal, or 0x/0o/0b prefixed), or Go's message.
pub fn parse_int(name: &str, v: &str) -> Result<i64, String> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let parsed = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        i64::from_str_radix(h, 16)
    } else if let Some(o) = digits.strip_prefix("0o").or_else(|| digits.strip_prefix("0O")) {
        i64::from_str_radix(o, 8)
    } else if let Some(b) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        i64::from_str_radix(b, 2)
    } else {
        digits.parse::<i64>()
    };
    match parsed {
        Ok(n) if !digits.is_empty() => Ok(if neg { -n } else { n }),
        _ => Err(format!("invalid value {v:?} for flag -{name}: parse error")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: &[Flag] = &[value("mtu"), value("ssh-port"), boolean("debug"), value("listen")];

    fn p(s: &[&str]) -> Result<Given, Stop> {
        let args: Vec<OsString> = s.iter().map(OsString::from).collect();
        parse(FLAGS, &args)
    }

    #[test]
    fn forms_go_accepts() {
        let g =
            p(&["-mtu", "1500", "--ssh-port=-1", "-debug", "-listen", "unix:///a", "--listen", "tcp://x:1"]).unwrap();
        assert_eq!(
            g.flags,
            vec![
                ("mtu", "1500".into()),
                ("ssh-port", "-1".into()),
                ("debug", "true".into()),
                ("listen", "unix:///a".into()),
                ("listen", "tcp://x:1".into())
            ]
        );
        // A value may start with a dash; a boolean takes no separate value.
        assert_eq!(p(&["-ssh-port", "-1"]).unwrap().flags, vec![("ssh-port", "-1".into())]);
        let g = p(&["-debug", "false"]).unwrap();
        assert_eq!((g.flags.len(), g.rest.len()), (1, 1), "`false` ends the flags");
        assert_eq!(p(&["-debug=false"]).unwrap().flags, vec![("debug", "false".into())]);
        assert_eq!(p(&["--", "-mtu"]).unwrap().rest, vec![OsString::from("-mtu")]);
    }

    #[test]
    fn mistakes_in_gos_words() {
        assert_eq!(p(&["-nope"]), Err(Stop::Mistake("flag provided but not defined: -nope".into())));
        assert_eq!(p(&["-mtu"]), Err(Stop::Mistake("flag needs an argument: -mtu".into())));
        assert_eq!(p(&["---mtu", "1"]), Err(Stop::Mistake("bad flag syntax: ---mtu".into())));
        assert!(matches!(p(&["-debug=maybe"]), Err(Stop::Mistake(m)) if m.contains("invalid boolean value")));
        assert_eq!(p(&["-help"]), Err(Stop::Help));
        assert_eq!(p(&["-h"]), Err(Stop::Help));
        assert_eq!(parse_int("ssh-port", "-1"), Ok(-1));
        assert_eq!(parse_int("mtu", "0x10"), Ok(16));
        assert!(parse_int("mtu", "15x").unwrap_err().contains("invalid value \"15x\" for flag -mtu"));
        assert!(parse_int("mtu", "-").is_err());
    }
}
