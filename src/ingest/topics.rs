//! The pipeline's topics, checked before anything is consumed: the brokers answer, the
//! topics exist (created when missing, if the pipeline allows), and the state topic is
//! compacted. Why at start: a broker that cannot be reached used to leave `serve` running
//! with a healthy `/v1/health` and a log full of errors, and a state topic with the default
//! `cleanup.policy=delete` silently loses the history `restore` needs once retention
//! passes.

use super::client_config;
use crate::ingest::pipeline::Pipeline;
use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashSet;
use std::time::Duration;

/// How long the brokers have to answer at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`prepare`] did.
#[derive(Debug, Default)]
pub struct Prepared {
    pub created: Vec<String>,
}

/// Checks the brokers and the pipeline's topics, creating missing ones when
/// `kafka.create_topics` is on (the state topic compacted). Errors name the brokers or
/// the topic and what to do.
pub async fn prepare(p: &Pipeline, bootstrap: &str) -> anyhow::Result<Prepared> {
    let admin: AdminClient<DefaultClientContext> = client_config(p, bootstrap)
        .create()
        .context("creating a Kafka admin client")?;
    let admin = std::sync::Arc::new(admin);
    let existing: HashSet<String> = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|md| {
                    md.topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| t.name().to_string())
                        .collect()
                })
        })
        .await
        .context("the metadata task panicked")?
        .with_context(|| {
            format!(
                "the Kafka brokers at {bootstrap} did not answer within {} s (kafka.brokers)",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
    };
    let k = &p.kafka;
    let wanted: Vec<(&str, bool)> = [
        (k.topic.as_str(), false),
        (k.dead_letter_topic.as_str(), false),
        (k.state_topic.as_str(), true),
    ]
    .into_iter()
    .filter(|(t, _)| !t.is_empty())
    .collect();
    let missing: Vec<(&str, bool)> = wanted
        .iter()
        .copied()
        .filter(|(t, _)| !existing.contains(*t))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(CONNECT_TIMEOUT));
    let mut prepared = Prepared::default();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
        if !k.create_topics {
            bail!(
                "missing Kafka topic(s) {}: create them (the state topic with \
                 cleanup.policy=compact) or set kafka.create_topics = true",
                names.join(", ")
            );
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|&(t, compact)| {
                let n = NewTopic::new(t, k.partitions, TopicReplication::Fixed(k.replication));
                if compact {
                    n.set("cleanup.policy", "compact")
                } else {
                    n
                }
            })
            .collect();
        let results = admin
            .create_topics(new.iter(), &opts)
            .await
            .with_context(|| format!("creating Kafka topic(s) {}", names.join(", ")))?;
        for r in results {
            match r {
                Ok(t) => prepared.created.push(t),
                // Another node created it meanwhile.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => bail!("creating Kafka topic {t}: {code}"),
            }
        }
    }
    if !k.state_topic.is_empty() {
        check_compacted(&admin, &k.state_topic, &opts).await?;
    }
    Ok(prepared)
}

/// Refuses a state topic whose `cleanup.policy` does not include `compact`. A broker that
/// cannot describe topic configurations gets a warning, not a refusal.
async fn check_compacted(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    opts: &AdminOptions,
) -> anyhow::Result<()> {
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], opts)
        .await;
    let policy = match described.as_deref() {
        Ok([Ok(resource)]) => resource.get("cleanup.policy").and_then(|e| e.value.clone()),
        other => {
            eprintln!(
                "giststream: warning: could not read the configuration of the state topic \
                 {topic} ({other:?}); make sure it is compacted"
            );
            return Ok(());
        }
    };
    match policy {
        Some(policy) if policy.split(',').any(|p| p.trim() == "compact") => Ok(()),
        Some(policy) => bail!(
            "the state topic {topic} has cleanup.policy={policy}: restore needs every \
             document's latest records, which only compaction keeps. Set \
             cleanup.policy=compact on it (kafka-configs --alter --entity-type topics \
             --entity-name {topic} --add-config cleanup.policy=compact)"
        ),
        // Kafka reports every setting; a broker that reports only those set explicitly
        // (Tansu) leaves the default out, and the default is delete.
        None => bail!(
            "the state topic {topic} has no cleanup.policy set (the default is delete): \
             restore needs every document's latest records, which only compaction keeps. \
             Set cleanup.policy=compact on it"
        ),
    }
}
