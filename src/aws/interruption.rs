//! Interruption notices from an SQS queue fed by EventBridge rules: spot interruption
//! warnings, rebalance recommendations, instance state changes and AWS Health scheduled
//! changes. Optional: without a queue, cooper learns of a lost instance when it is gone
//! (the garbage collector). With one, it drains and replaces the node within the two
//! minutes a spot interruption gives.
//!
//! The EventBridge rules to create (each targeting the queue):
//! - `{"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"]}`
//! - `{"source": ["aws.ec2"], "detail-type": ["EC2 Instance Rebalance Recommendation"]}`
//! - `{"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]}`
//! - `{"source": ["aws.health"], "detail-type": ["AWS Health Event"]}`

use std::time::Duration;

use serde::Deserialize;
use tracing::{Instrument, info_span, warn};

use super::{Ec2Settings, sdk_error};
use crate::cloud::{CloudError, Interruption, InterruptionKind};

/// An EventBridge event, the parts cooper reads.
#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "detail-type")]
    detail_type: String,
    #[serde(default)]
    detail: serde_json::Value,
}

/// Why a queue message could not be read as an event.
#[derive(Debug, thiserror::Error)]
#[error("interruption queue message is not an EventBridge event: {0}")]
pub struct ParseError(#[from] serde_json::Error);

/// The interruptions one EventBridge event announces (none for events cooper does not
/// act on, such as an instance entering `running`).
pub fn parse_event(body: &str) -> Result<Vec<Interruption>, ParseError> {
    let event: Event = serde_json::from_str(body)?;
    let instance = event
        .detail
        .get("instance-id")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let one = |kind| {
        instance
            .clone()
            .map(|instance_id| Interruption { instance_id, kind })
            .into_iter()
            .collect()
    };
    Ok(match event.detail_type.as_str() {
        "EC2 Spot Instance Interruption Warning" => one(InterruptionKind::SpotInterruption),
        "EC2 Instance Rebalance Recommendation" => one(InterruptionKind::Rebalance),
        "EC2 Instance State-change Notification" => {
            let state = event
                .detail
                .get("state")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            match state {
                "stopping" | "stopped" | "shutting-down" | "terminated" => {
                    one(InterruptionKind::StateChange(state.to_string()))
                }
                _ => Vec::new(),
            }
        }
        "AWS Health Event" => {
            let scheduled = event.detail.get("service").and_then(|v| v.as_str()) == Some("EC2")
                && event
                    .detail
                    .get("eventTypeCategory")
                    .and_then(|v| v.as_str())
                    == Some("scheduledChange");
            if !scheduled {
                return Ok(Vec::new());
            }
            event
                .detail
                .get("affectedEntities")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("entityValue")?.as_str())
                .filter(|id| id.starts_with("i-"))
                .map(|id| Interruption {
                    instance_id: id.to_string(),
                    kind: InterruptionKind::ScheduledChange,
                })
                .collect()
        }
        _ => Vec::new(),
    })
}

/// The SQS queue interruption events arrive on.
pub struct InterruptionQueue {
    client: aws_sdk_sqs::Client,
    url: String,
    /// Long-poll wait per receive (SQS allows up to 20 s).
    wait: Duration,
}

impl InterruptionQueue {
    /// Connect with the same credentials, region and endpoint as EC2.
    pub async fn connect(settings: &Ec2Settings, url: String, wait: Duration) -> Self {
        let config = super::sdk_config(settings).await;
        InterruptionQueue {
            client: aws_sdk_sqs::Client::new(&config),
            url,
            wait,
        }
    }

    /// The underlying client (tests use it to send events).
    pub fn client(&self) -> &aws_sdk_sqs::Client {
        &self.client
    }

    /// One long poll: the interruptions in the messages received. Every received
    /// message is deleted, unreadable ones too (logged), so none is redelivered forever.
    pub async fn receive(&self) -> Result<Vec<Interruption>, CloudError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .wait_time_seconds(self.wait.as_secs().min(20) as i32)
            .send()
            .instrument(info_span!("sqs.receive_message"))
            .await
            .map_err(sdk_error)?;
        let mut interruptions = Vec::new();
        for message in out.messages() {
            match parse_event(message.body().unwrap_or_default()) {
                Ok(found) => interruptions.extend(found),
                Err(e) => warn!(message = ?message.message_id(), error = %e, "ignoring a message"),
            }
            if let Some(handle) = message.receipt_handle() {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(handle)
                    .send()
                    .instrument(info_span!("sqs.delete_message"))
                    .await
                    .map_err(sdk_error)?;
            }
        }
        Ok(interruptions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_interruption_warning() {
        let body = r#"{"version":"0","id":"1e5527d7-bb36-4607-3370-4164db56a40e",
            "detail-type":"EC2 Spot Instance Interruption Warning","source":"aws.ec2",
            "account":"123456789012","time":"2026-11-24T13:01:05Z","region":"us-east-1",
            "resources":["arn:aws:ec2:us-east-1b:instance/i-0b662ef9931388ba0"],
            "detail":{"instance-id":"i-0b662ef9931388ba0","instance-action":"terminate"}}"#;
        assert_eq!(
            parse_event(body).unwrap(),
            [Interruption {
                instance_id: "i-0b662ef9931388ba0".into(),
                kind: InterruptionKind::SpotInterruption
            }]
        );
    }

    #[test]
    fn rebalance_is_reported_but_does_not_act() {
        let body = r#"{"detail-type":"EC2 Instance Rebalance Recommendation","source":"aws.ec2",
            "detail":{"instance-id":"i-1"}}"#;
        let found = parse_event(body).unwrap();
        assert_eq!(found[0].kind, InterruptionKind::Rebalance);
        assert!(!found[0].kind.acts());
    }

    #[test]
    fn state_changes_act_only_when_the_instance_is_going_away() {
        let event = |state: &str| {
            format!(
                r#"{{"detail-type":"EC2 Instance State-change Notification","source":"aws.ec2",
                    "detail":{{"instance-id":"i-2","state":"{state}"}}}}"#
            )
        };
        for state in ["stopping", "stopped", "shutting-down", "terminated"] {
            let found = parse_event(&event(state)).unwrap();
            assert_eq!(
                found[0].kind,
                InterruptionKind::StateChange(state.into()),
                "{state}"
            );
            assert!(found[0].kind.acts());
        }
        for state in ["pending", "running"] {
            assert!(parse_event(&event(state)).unwrap().is_empty(), "{state}");
        }
    }

    #[test]
    fn health_scheduled_changes_name_every_affected_instance() {
        let body = r#"{"detail-type":"AWS Health Event","source":"aws.health",
            "detail":{"service":"EC2","eventTypeCategory":"scheduledChange",
                      "eventTypeCode":"AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
                      "affectedEntities":[{"entityValue":"i-3"},{"entityValue":"i-4"}]}}"#;
        let ids: Vec<String> = parse_event(body)
            .unwrap()
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        assert_eq!(ids, ["i-3", "i-4"]);
        let issue = body.replace("scheduledChange", "issue");
        assert!(parse_event(&issue).unwrap().is_empty());
    }

    #[test]
    fn other_events_are_ignored_and_garbage_is_an_error() {
        assert!(
            parse_event(r#"{"detail-type":"EC2 AMI State Change","detail":{}}"#)
                .unwrap()
                .is_empty()
        );
        let err = parse_event("not json").unwrap_err();
        assert!(
            err.to_string().contains("not an EventBridge event"),
            "{err}"
        );
    }
}
