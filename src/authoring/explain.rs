//! `tripline explain UUID`: asks the running service why each rule did or did not act on one
//! event (`GET /explain/{uuid}`, see `explain.rs`) and prints the answer. The service holds its
//! database, so the command reads it through the service, as an operator's curl would.

use clap::Args;
use std::process::ExitCode;

/// Arguments of `tripline explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The event's `uuid`, as PostHog sent it.
    pub uuid: String,
    /// Where the service listens.
    #[arg(long, env = "TRIPLINE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The admin token, once sources are configured.
    #[arg(long, env = "TRIPLINE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Print the record as JSON instead of sentences.
    #[arg(long)]
    pub json: bool,
}

/// Prints the explanation; exit code 0, 1 when the service has no record of the event, 2 when
/// the service cannot be asked.
pub fn run(args: &ExplainArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(ask(args)) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            eprintln!("{message}");
            if status == 404 {
                ExitCode::FAILURE
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The service's status and body.
async fn ask(args: &ExplainArgs) -> Result<(u16, String), String> {
    let mut url = url::Url::parse(&args.url).map_err(|e| {
        format!(
            "`{}` is not an address such as http://127.0.0.1:8080: {e}",
            args.url
        )
    })?;
    url.path_segments_mut()
        .map_err(|()| format!("`{}` cannot have a path", args.url))?
        .pop_if_empty()
        .extend(["explain", args.uuid.as_str()]);
    if !args.json {
        url.set_query(Some("format=text"));
    }
    // reqwest here has no TLS crypto of its own (see Cargo.toml): ring, as the HTTP action uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.get(url.clone());
    if let Some(token) = &args.admin_token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| {
        format!(
            "cannot ask tripline at {}: {e} (is it running? see --url)",
            args.url
        )
    })?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}
