//! The `[log]` action, for tests only: the smallest kind there can be, to show what adding a kind
//! takes. Its files are this folder and one line in the action list of `actions/mod.rs` (with
//! `#[cfg(test)]` above it); the rule file's parser, the engine, the committer, the outbox and the
//! status endpoints need no change.
//!
//! `[log] message = "..."` queues the message as a delivery; its sender appends it to `log.txt`
//! in the folder deliveries go to.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use toml::Spanned;

use super::{Action, Attempt, Compile, Delivery, Destinations, Input, Kind, Output, Sender};
use crate::store::queue::OutboxRecord;

pub struct Log;

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    message: String,
}

#[derive(Debug)]
struct LogAction {
    message: String,
}

impl Kind for Log {
    type Config = LogConfig;

    fn compile(config: Spanned<LogConfig>, _cx: &mut Compile) -> Option<Box<dyn Action>> {
        let message = config.into_inner().message;
        Some(Box::new(LogAction { message }))
    }

    fn sender(to: &Destinations) -> anyhow::Result<Option<Arc<dyn Sender>>> {
        Ok(match to {
            Destinations::Files(dir) => Some(Arc::new(LogFile(dir.join("log.txt")))),
            Destinations::Settings(_) => None,
        })
    }
}

impl Action for LogAction {
    fn kind(&self) -> &'static str {
        "log"
    }

    fn run(&self, _input: &Input) -> Result<Output, String> {
        let mut payload = Map::new();
        payload.insert("message".into(), Value::from(self.message.clone()));
        Ok(Output::Delivery(Delivery {
            kind: "log",
            to: "log.txt".into(),
            lane: None,
            person: None,
            event: None,
            payload,
        }))
    }

    fn summary(&self) -> Value {
        json!({"kind": "log"})
    }
}

struct LogFile(PathBuf);

impl Sender for LogFile {
    fn attempt<'a>(
        &'a self,
        _id: u64,
        record: &'a OutboxRecord,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(async move {
            let line = format!("{}: {}\n", record.rule, record.payload["message"]);
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.0)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            match written {
                Ok(()) => Attempt::Delivered,
                Err(e) => Attempt::Temporary(e.to_string()),
            }
        })
    }

    fn max_in_flight(&self) -> super::Bound {
        super::Bound::Kind(1)
    }
}

#[cfg(test)]
mod tests {
    use crate::actions::jsonl::JsonlFiles;
    use crate::actions::{self, Destinations};
    use crate::clock::Clock;
    use crate::pipeline::committer::{Committer, Retention};
    use crate::pipeline::outbox;
    use crate::rules::RuleSet;
    use crate::store::Backend;
    use crate::store::redb::Db;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_log_rule_runs_from_its_file_to_its_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("rules")).unwrap();
        std::fs::write(
            root.join("rules/hello.toml"),
            "name = \"hello\"\n[when]\nevent = \"signed_up\"\n[log]\nmessage = \"someone signed up\"\n",
        )
        .unwrap();
        let rules = Arc::new(RuleSet::load(&crate::config::Declared::folders(&root.join("rules"), &root.join("t"), root)).unwrap());
        assert_eq!(rules.rules()[0].summary["actions"][0]["kind"], "log");

        let db: Arc<dyn Backend> = Arc::new(Db::open(root).unwrap());
        let (committer, thread) = Committer::start(
            db.clone(),
            JsonlFiles::new(root),
            "t <t@localhost>".parse().unwrap(),
            Retention {
                event_ids: Duration::from_secs(60),
                idle_state: Duration::from_secs(60),
            },
            crate::config::WaitSettings::default(),
            64 << 20,
            Arc::new(tokio::sync::Notify::new()),
            Clock::wall(),
            crate::config::Durability::Sync,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let events = crate::ingest::event::decode(
            br#"{"event":"signed_up","uuid":"u1"}"#,
            Clock::wall().now(),
            &crate::ingest::event::BodyLimits::LOCAL_FILES,
        )
        .unwrap();
        let report = runtime
            .block_on(committer.submit(rules.clone(), events, None))
            .unwrap();
        assert_eq!(report.fired(&rules), ["hello"]);
        drop(committer);
        thread.join().unwrap();

        let senders = actions::senders(&Destinations::Files(root)).unwrap();
        runtime
            .block_on(outbox::deliver_due(db.clone(), senders, Clock::wall()))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("log.txt")).unwrap(),
            "hello: \"someone signed up\"\n"
        );
        let status = db.outbox_status(5).unwrap();
        assert_eq!(
            (status.pending, status.recent[0].1.kind.as_str()),
            (0, "log")
        );
    }
}
