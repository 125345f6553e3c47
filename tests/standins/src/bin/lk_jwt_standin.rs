//! `lk-jwt-standin`: serves the lk-jwt-service API (see `vlg_standins::lkjwt`).

use std::process::ExitCode;
use std::sync::Arc;

use vlg_standins::cli::{exit_code, Args, Credentials, DEFAULT_LISTEN};
use vlg_standins::http::serve;
use vlg_standins::lkjwt::{Config, SfuGetShapes};

const USAGE: &str = "\
usage: lk-jwt-standin [--listen ADDR] [--key KEY] [--secret SECRET]
                      [--livekit-url URL] [--sfu-get-shapes both|legacy]

  --listen ADDR            bind address (default 127.0.0.1:0 = any free port)
  --key, --secret          LiveKit API credentials (default: $LIVEKIT_KEY, $LIVEKIT_SECRET)
  --livekit-url URL        returned to clients as `url` (default ws://127.0.0.1:7880)
  --sfu-get-shapes MODE    both: /sfu/get takes both body shapes (v0.4.0..v0.5.0, default)
                           legacy: /sfu/get takes the legacy shape only (current HEAD)

OpenID tokens are simulated: access_token `openid:@user:server` is valid for
@user:server when matrix_server_name is `server`.
Prints `listening on http://ADDR` once bound.";

fn run() -> Result<(), Option<String>> {
    let args = Args::parse(
        std::env::args().skip(1),
        &["listen", "key", "secret", "livekit-url", "sfu-get-shapes"],
    )?;
    let config = Config {
        credentials: Credentials::from_args(&args)?,
        livekit_url: args
            .get("livekit-url")
            .unwrap_or("ws://127.0.0.1:7880")
            .to_owned(),
        sfu_get_shapes: args
            .get("sfu-get-shapes")
            .unwrap_or("both")
            .parse::<SfuGetShapes>()?,
    };
    let listen = args.get("listen").unwrap_or(DEFAULT_LISTEN).to_owned();
    eprintln!(
        "lk-jwt-standin: key={} livekit_url={} sfu_get_shapes={:?}",
        config.credentials.key, config.livekit_url, config.sfu_get_shapes
    );
    Ok(serve(
        "lk-jwt-standin",
        &listen,
        Arc::new(move |req| config.handle(req)),
    )?)
}

fn main() -> ExitCode {
    exit_code("lk-jwt-standin", USAGE, run())
}
