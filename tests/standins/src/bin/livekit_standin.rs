//! `livekit-standin`: serves LiveKit's `ListParticipants` and a test control
//! API (see `vlg_standins::livekit`).

use std::process::ExitCode;
use std::sync::Arc;

use vlg_standins::cli::{exit_code, Args, Credentials, DEFAULT_LISTEN};
use vlg_standins::http::serve;
use vlg_standins::livekit::{admin_token, LiveKit};

const USAGE: &str = "\
usage: livekit-standin [--listen ADDR] [--key KEY] [--secret SECRET]
       livekit-standin --mint-admin-token ROOM [--key KEY] [--secret SECRET]

  --listen ADDR              bind address (default 127.0.0.1:0 = any free port)
  --key, --secret            LiveKit API credentials (default: $LIVEKIT_KEY, $LIVEKIT_SECRET)
  --mint-admin-token ROOM    print a roomAdmin token for ROOM (valid 1 h) and exit

Serves POST /twirp/livekit.RoomService/ListParticipants (JSON) and the control
API under /_standin/ (rooms, join, leave, config, stats, reset).
Prints `listening on http://ADDR` once bound.";

fn run() -> Result<(), Option<String>> {
    let args = Args::parse(
        std::env::args().skip(1),
        &["listen", "key", "secret", "mint-admin-token"],
    )?;
    let credentials = Credentials::from_args(&args)?;
    if let Some(room) = args.get("mint-admin-token") {
        println!("{}", admin_token(&credentials, room)?);
        return Ok(());
    }
    let listen = args.get("listen").unwrap_or(DEFAULT_LISTEN).to_owned();
    eprintln!("livekit-standin: key={}", credentials.key);
    let livekit = LiveKit::new(&credentials);
    Ok(serve(
        "livekit-standin",
        &listen,
        Arc::new(move |req| livekit.handle(req)),
    )?)
}

fn main() -> ExitCode {
    exit_code("livekit-standin", USAGE, run())
}
