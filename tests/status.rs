//! `GET /status`: the page a non-developer reads, loaded in a real headless browser (Debian's
//! chromium, installed by `scripts/test.sh`) after real events, with a screenshot kept in
//! `target/`; and who may see it.

mod common;

use common::Server;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;

/// The chromium to use: `TRIPLINE_TEST_CHROMIUM` (set by `scripts/test.sh`), else `chromium` on
/// the path; `None` when there is none (said, and the browser test is skipped).
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TRIPLINE_TEST_CHROMIUM") {
        return Some(path.into());
    }
    let found = Command::new("chromium").arg("--version").output();
    found
        .is_ok_and(|o| o.status.success())
        .then(|| "chromium".into())
}

/// Runs headless chromium on `url` with `args`; returns its standard output.
fn browse(chromium: &PathBuf, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn used(uuid: &str, who: &str, email: Option<&str>) -> serde_json::Value {
    let mut person = json!({});
    if let Some(e) = email {
        person = json!({"properties": {"email": e}});
    }
    json!({"event": "feature_used", "uuid": uuid, "distinct_id": who,
           "properties": {"feature_name": "export"}, "person": person})
}

#[test]
fn the_status_page_shows_what_the_rules_did_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        eprintln!(
            "skipped: no chromium (scripts/test.sh installs Debian's; or set TRIPLINE_TEST_CHROMIUM)"
        );
        return;
    };
    let server = Server::start();
    // Dana uses export six times: counted four times, an email at the fifth, held back after.
    for n in 1..=6 {
        server.post_json(&used(
            &format!("dana-{n}"),
            "dana",
            Some("dana@example.com"),
        ));
    }
    // Lee has no address: the email cannot be made, and is listed as failed.
    for n in 1..=5 {
        server.post_json(&used(&format!("lee-{n}"), "lee", None));
    }
    let url = format!("{}/status", server.base);
    let dom = browse(&chromium, &url, &["--dump-dom"]);
    for text in [
        "tripline status",
        "Running rule set",
        "found no problem",
        "power-user-discount",
        "Email a discount once a user has used the same feature 5 times",
        "1 by limits",
        "Latest actions",
        "href=\"/explain/dana-5?format=text\"",
        "1 failed for good",
        "email not sent",
    ] {
        assert!(dom.contains(text), "{text:?} not in the page:\n{dom}");
    }
    // The rule's row, in the last hour: 11 matched, 1 acted (Lee's email could not be made: a
    // rule none of whose actions could be made did not act), 8 counting, 1 held back, 1 failed.
    let row = dom
        .split("<strong>power-user-discount</strong>")
        .nth(1)
        .unwrap();
    let cells: Vec<&str> = row
        .split("<td class=\"n\">")
        .skip(1)
        .take(5)
        .map(|c| c.split('<').next().unwrap())
        .collect();
    assert_eq!(cells, ["11", "1", "8", "1", "1"], "{row}");
    let day: Vec<&str> = row
        .split("<td class=\"n day\">")
        .skip(1)
        .take(5)
        .map(|c| c.split('<').next().unwrap())
        .collect();
    assert_eq!(day, cells, "the same in the last day: {row}");
    // The link explains in words.
    let (status, why) = server.get("/explain/dana-5?format=text");
    assert_eq!(status, 200);
    assert!(why.contains("Acted: it ran its [email]."), "{why}");

    // As a phone shows it.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browse(
        &chromium,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=412,1600",
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn a_broken_rule_file_is_shown_in_words_and_the_old_rules_keep_running() {
    let server = Server::start();
    std::fs::write(
        server.rules.join("broken.toml"),
        "name = \"broken\"\n[when]\nevent = \"x\"\n[count]\nat_lest = 3\n",
    )
    .unwrap();
    server.wait_for("the reload to fail", |s| {
        s.rules_status()["last_reload"]["ok"] == json!(false)
    });
    let (status, page) = server.get("/status");
    assert_eq!(status, 200);
    assert!(page.contains("was not taken"), "{page}");
    assert!(page.contains("The rules before it keep running."), "{page}");
    assert!(page.contains("broken.toml:5:1"), "{page}");
    assert!(page.contains("power-user-discount"), "{page}");
}

const TOKEN: &str = "posthog-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

#[test]
fn with_sources_the_page_asks_for_the_admin_token_and_a_cookie_keeps_you_signed_in() {
    let server = Server::launch(
        &[],
        &[("TRIPLINE_TOKEN", TOKEN), ("TRIPLINE_ADMIN_TOKEN", ADMIN)],
        |_| {},
    );
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = |cookie: Option<&str>| {
        let mut request = client.get(format!("{}/status", server.base));
        if let Some(c) = cookie {
            request = request.header("cookie", c);
        }
        let reply = request.send().unwrap();
        (reply.status().as_u16(), reply.text().unwrap())
    };
    let (status, body) = page(None);
    assert_eq!(status, 401);
    let framed = client
        .get(format!("{}/status", server.base))
        .send()
        .unwrap();
    assert_eq!(
        framed.headers()["x-frame-options"],
        "DENY",
        "no other site may frame it"
    );
    assert!(
        body.contains("Admin token") && body.contains("type=\"password\""),
        "{body}"
    );
    assert!(!body.contains("power-user-discount"), "{body}");

    let login = |token: &str| {
        client
            .post(format!("{}/status/login", server.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
            .unwrap()
    };
    let wrong = login(TOKEN);
    assert_eq!(wrong.status(), 401);
    assert!(
        wrong
            .text()
            .unwrap()
            .contains("That is not the admin token, nor a read token.")
    );
    let right = login(ADMIN);
    assert_eq!(right.status(), 303);
    assert_eq!(right.headers()["location"], "/status");
    let set = right.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains(ADMIN),
        "the cookie is not the token itself: {set}"
    );
    let cookie = set.split(';').next().unwrap();

    let (status, body) = page(Some(cookie));
    assert_eq!(status, 200);
    assert!(body.contains("power-user-discount"), "{body}");
    // The same cookie opens the admin endpoints the page links to; a made-up one does not.
    let rules = client
        .get(format!("{}/rules", server.base))
        .header("cookie", cookie)
        .send()
        .unwrap();
    assert_eq!(rules.status(), 200);
    assert_eq!(page(Some("tripline_admin=00ff")).0, 401);
    // Another cookie of that name, set first by a page of the same site, does not lock out.
    assert_eq!(
        page(Some(&format!("tripline_admin=1.00ff; {cookie}"))).0,
        200
    );
    // One made more than 12 hours ago is refused.
    let value = cookie.split('=').nth(1).unwrap();
    let (issued, _) = value.split_once('.').unwrap();
    let old_issued = issued.parse::<u64>().unwrap() - 13 * 3600;
    let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        ADMIN,
    ))
    .into();
    let old = tripline::ingest::auth::cookie_value(&digest, old_issued);
    assert_eq!(page(Some(&format!("tripline_admin={old}"))).0, 401);
    // The bearer token works as well (scripts).
    let with_token = client
        .get(format!("{}/status", server.base))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(with_token.status(), 200);
}

#[test]
fn the_retry_button_is_accepted_from_the_page_itself_only() {
    let server = Server::start();
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let retry = |origin: &str| {
        client
            .post(format!("{}/outbox/999/retry", server.base))
            .header("origin", origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("go=1")
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // From tripline's own page: let through, and back to the page (there is no delivery 999).
    assert_eq!(retry(&server.base), 303);
    // From another site's page: refused.
    assert_eq!(retry("http://attacker.example"), 403);
    let port = server.address().rsplit(':').next().unwrap().to_string();
    assert_eq!(
        retry(&format!("http://localhost:{port}")),
        403,
        "another origin's name"
    );
}
