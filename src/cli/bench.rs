//! `usernet bench`: usernet against pasta, slirp4netns and a veth pair, side by side.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn main(_args: BenchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
