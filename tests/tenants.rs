//! Tenants: a source's rules in `rules/<source>/` see only that source's events, and the
//! source's read token opens `/users`, `/aggregates`, `/explain` and `/status` for its own rules
//! only. One tenant never reads another's data, on any endpoint.

mod common;

use common::Server;
use serde_json::{Value, json};
use std::path::Path;

const ACME: &str = "acme-send-token-0123456789";
const ACME_READ: &str = "acme-read-token-0123456789";
const GLOBEX: &str = "globex-send-token-0123456789";
const GLOBEX_READ: &str = "globex-read-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

const CONFIG: &str = r#"
[sources.acme]
bearer_token_env = ["ACME_TOKEN"]
read_token_env = ["ACME_READ"]
[sources.globex]
bearer_token_env = ["GLOBEX_TOKEN"]
read_token_env = ["GLOBEX_READ"]
"#;

/// A tenant's rule: counts sign-ups per plan and remembers them.
fn rule(name: &str) -> String {
    format!(
        "name = \"{name}\"\n[when]\nevent = \"signed_up\"\n[aggregate]\nby = \"properties.plan\"\n[remember]\nkeep_last = 10\nkeep_for = \"7 days\"\nlabel = \"Signed up\"\n"
    )
}

fn start() -> (Server, tempfile::TempDir) {
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("tripline.toml");
    std::fs::write(&file, CONFIG).unwrap();
    let server = Server::launch(
        &["--config", file.to_str().unwrap()],
        &[
            ("ACME_TOKEN", ACME),
            ("ACME_READ", ACME_READ),
            ("GLOBEX_TOKEN", GLOBEX),
            ("GLOBEX_READ", GLOBEX_READ),
            ("TRIPLINE_ADMIN_TOKEN", ADMIN),
        ],
        |root: &Path| {
            for tenant in ["acme", "globex"] {
                std::fs::create_dir(root.join("rules").join(tenant)).unwrap();
                let path = root.join(format!("rules/{tenant}/signups.toml"));
                std::fs::write(path, rule(&format!("{tenant}-signups"))).unwrap();
            }
        },
    );
    (server, config)
}

fn signup(server: &Server, token: &str, uuid: &str) -> Value {
    let body = json!({"event": "signed_up", "uuid": uuid, "distinct_id": "shared-user",
                      "properties": {"plan": "pro"}});
    let reply = server.post_with(
        &[("Authorization", &format!("Bearer {token}"))],
        body.to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.json);
    reply.json
}

fn get(server: &Server, token: &str, path: &str) -> (u16, String) {
    let reply = common::client()
        .get(format!("{}{path}", server.base))
        .bearer_auth(token)
        .send()
        .unwrap();
    (reply.status().as_u16(), reply.text().unwrap())
}

#[test]
fn each_tenant_reads_its_own_rules_data_and_nothing_of_the_other() {
    let (server, _config) = start();
    // A tenant's rule sees only its source's events.
    assert_eq!(
        signup(&server, ACME, "acme-1")["fired"],
        json!(["acme-signups"])
    );
    assert_eq!(
        signup(&server, GLOBEX, "globex-1")["fired"],
        json!(["globex-signups"])
    );

    for (mine, theirs, read) in [
        ("acme", "globex", ACME_READ),
        ("globex", "acme", GLOBEX_READ),
    ] {
        // Aggregates: its rule, not the other's.
        let (status, body) = get(&server, read, &format!("/aggregates/{mine}-signups"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"totalEvents\":1"), "{body}");
        let (status, _) = get(&server, read, &format!("/aggregates/{theirs}-signups"));
        assert_eq!(status, 404, "{mine} reading {theirs}'s counts");

        // Explain: its event, not the other's.
        let (status, body) = get(&server, read, &format!("/explain/{mine}-1"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("{mine}-signups")), "{body}");
        let (status, _) = get(&server, read, &format!("/explain/{theirs}-1"));
        assert_eq!(status, 404, "{mine} reading {theirs}'s event");

        // The same person id at both sources: each sees what its own rules kept.
        let (status, body) = get(&server, read, "/users/shared-user");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("{mine}-signups")), "{body}");
        assert!(
            !body.contains(&format!("{theirs}-signups")),
            "{mine} sees {theirs}: {body}"
        );

        // The status page: its rules only, and no retry button.
        let (status, body) = get(&server, read, "/status");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("{mine}-signups")), "{body}");
        assert!(
            !body.contains(&format!("{theirs}-signups")),
            "{mine} sees {theirs}: {body}"
        );
        assert!(
            !body.contains("power-user-discount"),
            "the operator's rules: {body}"
        );

        // Everything else is the operator's.
        for path in ["/rules", "/outbox", "/metrics"] {
            let (status, body) = get(&server, read, path);
            assert_eq!(status, 403, "{path}: {body}");
            assert!(body.contains("read token opens only"), "{body}");
        }
        let erase = common::client()
            .delete(format!("{}/users/shared-user", server.base))
            .bearer_auth(read)
            .send()
            .unwrap();
        assert_eq!(erase.status(), 403);
    }
    // In a browser: the sign-in form takes the read token, and its cookie opens the tenant's
    // page, and only what the token opens.
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = client
        .post(format!("{}/status/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ACME_READ}"))
        .send()
        .unwrap();
    assert_eq!(signed.status(), 303);
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap();
    let with_cookie = |path: &str| {
        let reply = client
            .get(format!("{}{path}", server.base))
            .header("cookie", cookie)
            .send()
            .unwrap();
        (reply.status().as_u16(), reply.text().unwrap())
    };
    let (status, page) = with_cookie("/status");
    assert_eq!(status, 200);
    assert!(
        page.contains("acme-signups") && !page.contains("globex-signups"),
        "{page}"
    );
    assert_eq!(with_cookie("/explain/acme-1").0, 200);
    assert_eq!(with_cookie("/explain/globex-1").0, 404);
    assert_eq!(with_cookie("/rules").0, 403);

    // A read token sends no events.
    let refused = server.post_with(
        &[("Authorization", &format!("Bearer {ACME_READ}"))],
        json!({"event": "signed_up", "distinct_id": "x"}).to_string(),
    );
    assert_eq!(refused.status, 401);
    // The operator sees both.
    let (_, body) = get(&server, ADMIN, "/users/shared-user");
    assert!(
        body.contains("acme-signups") && body.contains("globex-signups"),
        "{body}"
    );
}

#[test]
fn a_rule_saved_in_a_sources_folder_goes_live_like_any_other() {
    let (server, _config) = start();
    std::fs::write(server.rules.join("acme/second.toml"), rule("acme-second")).unwrap();
    let status = |s: &Server| {
        let (_, body) = get(s, ADMIN, "/rules");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    server.wait_for("the new rule to load", |s| {
        status(s)["rules"].to_string().contains("acme-second")
    });
    let rules = status(&server)["rules"].as_array().unwrap().clone();
    let second = rules.iter().find(|r| r["name"] == "acme-second").unwrap();
    assert_eq!(second["source"], "acme", "{second}");
    assert_eq!(
        signup(&server, ACME, "acme-2")["fired"],
        json!(["acme-second", "acme-signups"])
    );
}

#[test]
fn a_folder_not_named_after_a_source_is_a_problem_at_check() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(rules.join("initech")).unwrap();
    std::fs::write(rules.join("initech/r.toml"), rule("r")).unwrap();
    std::fs::write(dir.path().join("tripline.toml"), CONFIG).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["check", "--config", "tripline.toml", "--rules", "rules"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("there is no source `initech`"), "{stderr}");
    // Named after one, it loads.
    std::fs::rename(rules.join("initech"), rules.join("acme")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args(["check", "--config", "tripline.toml", "--rules", "rules"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_token_given_twice_stops_the_start_in_words() {
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("tripline.toml");
    std::fs::write(&file, CONFIG).unwrap();
    // acme's read token is globex's sending token: it would read acme and send as globex.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tripline"))
        .args([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--data", config.path().join("data").to_str().unwrap()])
        .env("ACME_TOKEN", ACME)
        .env("ACME_READ", GLOBEX)
        .env("GLOBEX_TOKEN", GLOBEX)
        .env("GLOBEX_READ", GLOBEX_READ)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the same token is given twice"), "{stderr}");
}
