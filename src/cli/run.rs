//! `usernet run`: COMMAND in new namespaces, its network served by the engine.

use super::NetOpts;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub net: NetOpts,
    /// The command to run, after `--`.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

pub fn main(_args: RunArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
