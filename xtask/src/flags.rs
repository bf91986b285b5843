//! `--name VALUE` flags, as the long-running sub-commands (`soak`,
//! `deploy`) take them: each flag is followed by its value, and a missing,
//! malformed or unknown one is an error that ends with the sub-command's
//! usage line.

use std::str::FromStr;

/// One `--name VALUE` pair of a sub-command's arguments.
pub struct Flag<'a> {
    pub name: &'a str,
    value: &'a str,
    usage: &'a str,
}

impl Flag<'_> {
    /// The value, parsed as the option it sets.
    pub fn value<T: FromStr>(&self) -> Result<T, String> {
        self.value.parse().map_err(|_| {
            format!(
                "bad value {:?} for {}\n{}",
                self.value, self.name, self.usage
            )
        })
    }

    /// The error for a flag the sub-command does not take.
    pub fn unknown(&self) -> String {
        self.usage.to_owned()
    }
}

/// The `--name VALUE` pairs of `args`, in order; a flag without its value
/// is an error (naming it, then `usage`).
pub fn pairs<'a>(
    args: &'a [String],
    usage: &'a str,
) -> impl Iterator<Item = Result<Flag<'a>, String>> {
    let mut args = args.iter();
    std::iter::from_fn(move || {
        let name = args.next()?;
        Some(match args.next() {
            Some(value) => Ok(Flag { name, value, usage }),
            None => Err(format!("{name} needs a value\n{usage}")),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::pairs;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn pairs_parse_values_and_name_what_is_wrong() {
        let a = args(&["--workers", "4", "--minutes", "0.5"]);
        let flags: Vec<_> = pairs(&a, "usage").collect::<Result<_, _>>().unwrap();
        assert_eq!(flags[0].name, "--workers");
        assert_eq!(flags[0].value::<u32>(), Ok(4));
        assert_eq!(flags[1].value::<f64>(), Ok(0.5));

        let a = args(&["--workers", "four"]);
        let flag = pairs(&a, "usage").next().unwrap().unwrap();
        assert_eq!(
            flag.value::<u32>(),
            Err("bad value \"four\" for --workers\nusage".into())
        );

        let a = args(&["--workers"]);
        let missing = pairs(&a, "usage").next().unwrap().err();
        assert_eq!(missing, Some("--workers needs a value\nusage".into()));
    }
}
