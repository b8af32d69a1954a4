//! The command-line grammar of the C programs the drop-in modes stand in for: glibc's
//! `getopt_long`, with its error words, so that a caller sees the same message for the same
//! mistake. Long options as `--name=V` or `--name V`, short ones as `-xV`, `-x V` or in a
//! cluster (`-qf`), `--` ending the options.

use std::ffi::OsString;

/// One option: its long name, its short letter if any, whether it takes a value.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    pub long: &'static str,
    pub short: Option<char>,
    pub value: bool,
}

/// An option that takes no value.
pub const fn flag(long: &'static str, short: Option<char>) -> Opt {
    Opt { long, short, value: false }
}

/// An option that takes a value.
pub const fn valued(long: &'static str, short: Option<char>) -> Opt {
    Opt { long, short, value: true }
}

/// Where the positional arguments may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positionals {
    /// Anywhere among the options (glibc's default permutation): slirp4netns.
    Anywhere,
    /// The first one ends the options, the rest is a command line (`+` in the option
    /// string): pasta, whose `pasta -q sh -c ...` gives `-c` to the shell.
    EndOptions,
}

/// The options given, in order, by long name with their value; then the positionals.
#[derive(Debug, Default, PartialEq)]
pub struct Given {
    pub options: Vec<(&'static str, Option<String>)>,
    pub positionals: Vec<OsString>,
}

/// Parses `args` (without the program name) against `opts`; an error is glibc's message,
/// prefixed with `program`.
pub fn parse(program: &str, opts: &[Opt], args: &[OsString], positionals: Positionals) -> Result<Given, String> {
    let mut given = Given::default();
    let mut it = args.iter();
    while let Some(raw) = it.next() {
        let arg = raw.to_string_lossy();
        if arg == "--" {
            given.positionals.extend(it.by_ref().cloned());
            break;
        }
        if arg == "-" || !arg.starts_with('-') {
            given.positionals.push(raw.clone());
            if positionals == Positionals::EndOptions {
                given.positionals.extend(it.by_ref().cloned());
                break;
            }
            continue;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let Some(opt) = opts.iter().find(|o| o.long == name) else {
                return Err(format!("{program}: unrecognized option '--{name}'"));
            };
            let value = match (opt.value, inline) {
                (true, Some(v)) => Some(v),
                (true, None) => Some(
                    it.next()
                        .map(|v| v.to_string_lossy().into_owned())
                        .ok_or_else(|| format!("{program}: option '--{name}' requires an argument"))?,
                ),
                (false, Some(_)) => return Err(format!("{program}: option '--{name}' doesn't allow an argument")),
                (false, None) => None,
            };
            given.options.push((opt.long, value));
            continue;
        }
        // A cluster of short options, the last of which may take a value.
        let shorts: Vec<char> = arg[1..].chars().collect();
        for (i, &c) in shorts.iter().enumerate() {
            let Some(opt) = opts.iter().find(|o| o.short == Some(c)) else {
                return Err(format!("{program}: invalid option -- '{c}'"));
            };
            if !opt.value {
                given.options.push((opt.long, None));
                continue;
            }
            let rest: String = shorts[i + 1..].iter().collect();
            let value = if rest.is_empty() {
                it.next()
                    .map(|v| v.to_string_lossy().into_owned())
                    .ok_or_else(|| format!("{program}: option requires an argument -- '{c}'"))?
            } else {
                rest
            };
            given.options.push((opt.long, Some(value)));
            break;
        }
    }
    Ok(given)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: &[Opt] = &[flag("quiet", Some('q')), flag("foreground", Some('f')), valued("mtu", Some('m'))];

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn forms_of_options() {
        let g = parse("p", OPTS, &args("-qf -m1500 --mtu=9000 --mtu 1400 -m 576 x"), Positionals::Anywhere).unwrap();
        let names: Vec<_> = g.options.iter().map(|(n, v)| (*n, v.as_deref())).collect();
        assert_eq!(
            names,
            [
                ("quiet", None),
                ("foreground", None),
                ("mtu", Some("1500")),
                ("mtu", Some("9000")),
                ("mtu", Some("1400")),
                ("mtu", Some("576"))
            ]
        );
        assert_eq!(g.positionals, args("x"));
    }

    #[test]
    fn positionals_anywhere_or_ending_the_options() {
        let g = parse("p", OPTS, &args("a -q b"), Positionals::Anywhere).unwrap();
        assert_eq!((g.options.len(), g.positionals), (1, args("a b")));
        let g = parse("p", OPTS, &args("-q sh -c -q"), Positionals::EndOptions).unwrap();
        assert_eq!((g.options.len(), g.positionals), (1, args("sh -c -q")));
        let g = parse("p", OPTS, &args("-q -- -f x"), Positionals::Anywhere).unwrap();
        assert_eq!((g.options.len(), g.positionals), (1, args("-f x")));
    }

    #[test]
    fn glibc_error_words() {
        let err = |s: &str| parse("prog", OPTS, &args(s), Positionals::Anywhere).unwrap_err();
        assert_eq!(err("--nope"), "prog: unrecognized option '--nope'");
        assert_eq!(err("--mtu"), "prog: option '--mtu' requires an argument");
        assert_eq!(err("--quiet=1"), "prog: option '--quiet' doesn't allow an argument");
        assert_eq!(err("-x"), "prog: invalid option -- 'x'");
        assert_eq!(err("-qm"), "prog: option requires an argument -- 'm'");
    }
}
