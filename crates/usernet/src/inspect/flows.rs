//! `usernet flows`: the connections of a running usernet, one line each: protocol, the
//! guest's end, the other end as the guest sees it, the host socket's far end, state,
//! bytes each way, age and idle time (`/v1/flows`). `--json` prints the API's answer.

use clap::Args;

use usernet_host::api::FlowView;

use super::{InstanceOpt, get, human_bytes, human_duration, table};

#[derive(Args, Debug)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub instance: InstanceOpt,
    /// Print `/v1/flows` as JSON (exact byte counts and milliseconds).
    #[arg(long)]
    pub json: bool,
}

/// The column titles of a flow table.
pub const HEADER: [&str; 9] = ["PROTO", "GUEST", "REMOTE", "HOST", "STATE", "TO-GUEST", "FROM-GUEST", "AGE", "IDLE"];

/// One flow's cells, in [`HEADER`]'s order.
pub fn row(f: &FlowView) -> Vec<String> {
    vec![
        f.proto.clone(),
        f.guest.clone(),
        f.remote.clone(),
        f.host.clone().unwrap_or_else(|| "-".into()),
        f.state.clone(),
        human_bytes(f.bytes_to_guest),
        human_bytes(f.bytes_from_guest),
        human_duration(f.age_ms),
        human_duration(f.idle_ms),
    ]
}

pub fn main(args: FlowsArgs) -> anyhow::Result<i32> {
    let socket = args.instance.socket()?;
    let mut flows: Vec<FlowView> = get(&socket, "/v1/flows")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&flows)?);
        return Ok(0);
    }
    flows.sort_by(|a, b| (&a.proto, &a.guest, &a.remote).cmp(&(&b.proto, &b.guest, &b.remote)));
    let mut rows = vec![HEADER.map(String::from).to_vec()];
    rows.extend(flows.iter().map(row));
    print!("{}", table(&rows));
    Ok(0)
}
