//! The topic protocol of one connection: client frames parsed, checked
//! (topic names, authorization, the publish rate, the violation budget) and
//! acted on — subscribe (with resume), unsubscribe, publish. The socket's
//! lifecycle is the parent module's; this only queues replies.

use std::time::Instant;

use switchyard_protocol::topic::validate_topic;
use switchyard_protocol::{ClientFrame, CloseCode, ErrorCode, Position, ServerFrame};

use super::Connection;
use crate::outbox::Slow;

impl Connection {
    pub(super) async fn on_text(&mut self, text: &str) {
        match ClientFrame::parse(text) {
            Err(err) => {
                let kind = match err.code() {
                    ErrorCode::UnknownOp => "unknown_op",
                    _ => "bad_frame",
                };
                self.violation(kind, err.code(), err.to_string(), None);
            }
            Ok(ClientFrame::Subscribe { topic, since }) => self.subscribe(topic, since).await,
            Ok(ClientFrame::Unsubscribe { topic }) => self.unsubscribe(topic),
            Ok(ClientFrame::Publish { topic, data }) => self.publish(topic, &data).await,
            Ok(ClientFrame::Ping) => self.send(&ServerFrame::Pong),
        }
    }

    /// Reports a protocol violation; enough of them close the connection with 4500.
    pub(super) fn violation(
        &mut self,
        kind: &str,
        code: ErrorCode,
        message: String,
        topic: Option<String>,
    ) {
        self.gateway
            .metrics
            .protocol_violations
            .with_label_values(&[kind])
            .inc();
        tracing::debug!(kind, %message, "protocol violation");
        self.send_error(code, message, topic);
        self.violations += 1;
        if self.violations >= self.gateway.config.connection.max_violations {
            self.close(CloseCode::ProtocolViolation, "too many protocol violations");
        }
    }

    /// Refuses a topic the session may not use: an error frame, and after
    /// `max_violations` refusals a 4502 close (the client keeps asking for
    /// what its token does not allow; retrying will not help).
    fn deny(&mut self, action: &'static str, code: ErrorCode, topic: String) {
        self.gateway
            .metrics
            .authorization_denied
            .with_label_values(&[action])
            .inc();
        tracing::debug!(action, %topic, "topic not allowed for this session");
        self.send_error(
            code,
            format!("this session may not {action} on this topic"),
            Some(topic),
        );
        self.denied += 1;
        if self.denied >= self.gateway.config.connection.max_violations {
            self.close(CloseCode::NotAllowed, "topic not allowed");
        }
    }

    /// Takes a publish token; an empty bucket gets a `rate_limited` error,
    /// and `max_violations` of them in a row close the connection with 4002.
    fn publish_allowed(&mut self, topic: &str) -> bool {
        if self.publish_bucket.try_take(Instant::now()) {
            self.rate_limited = 0;
            return true;
        }
        self.gateway.metrics.publishes_rate_limited.inc();
        self.rate_limited += 1;
        let rate = self.gateway.config.connection.publish_rate;
        self.send_error(
            ErrorCode::RateLimited,
            format!("at most {rate} publishes per second"),
            Some(topic.to_owned()),
        );
        if self.rate_limited >= self.gateway.config.connection.max_violations {
            self.close_slow(Slow::PublishRate);
        }
        false
    }

    fn check_topic(&mut self, topic: &str) -> bool {
        match validate_topic(topic, self.gateway.config.topics.max_topic_length) {
            Ok(()) => true,
            Err(err) => {
                self.violation(
                    "invalid_topic",
                    ErrorCode::InvalidTopic,
                    err.to_string(),
                    Some(topic.chars().take(64).collect()),
                );
                false
            }
        }
    }

    async fn subscribe(&mut self, topic: String, since: Option<Position>) {
        if !self.check_topic(&topic) {
            return;
        }
        if !self.session.may_subscribe(&topic) {
            return self.deny("subscribe", ErrorCode::SubscribeNotAllowed, topic);
        }
        let already = self.topics.contains(&topic);
        if already {
            // A second subscribe restarts the subscription from its `since`.
            self.gateway.broker.unsubscribe(&topic, self.handle.id);
        } else if self.topics.len() >= self.gateway.config.connection.max_subscriptions {
            let max = self.gateway.config.connection.max_subscriptions;
            // A client that keeps subscribing past its limit is misbehaving:
            // it counts towards the 4500 close like any other violation.
            return self.violation(
                "too_many_subscriptions",
                ErrorCode::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
                Some(topic),
            );
        }
        match self
            .gateway
            .broker
            .subscribe(&topic, since, self.handle.clone())
            .await
        {
            Ok(outcome) => {
                if since.is_some() {
                    let label = if outcome.recovered { "true" } else { "false" };
                    self.gateway
                        .metrics
                        .resume
                        .with_label_values(&[label])
                        .inc();
                }
                tracing::debug!(%topic, position = %outcome.position, recovered = outcome.recovered, replayed = outcome.replayed, "subscribed");
                if !already {
                    self.topics.push(topic);
                    self.gateway.metrics.subscriptions.inc();
                }
            }
            Err(err) => {
                if already {
                    self.forget_topic(&topic);
                }
                self.send_error(err.code(), err.to_string(), Some(topic));
            }
        }
    }

    fn forget_topic(&mut self, topic: &str) {
        if let Some(index) = self.topics.iter().position(|t| t == topic) {
            self.topics.swap_remove(index);
            self.gateway.metrics.subscriptions.dec();
        }
    }

    fn unsubscribe(&mut self, topic: String) {
        if !self.topics.contains(&topic) {
            self.send_error(
                ErrorCode::NotSubscribed,
                "not subscribed to this topic".into(),
                Some(topic),
            );
            return;
        }
        self.gateway.broker.unsubscribe(&topic, self.handle.id);
        self.forget_topic(&topic);
        self.send(&ServerFrame::Unsubscribed { topic });
    }

    async fn publish(&mut self, topic: String, data: &serde_json::value::RawValue) {
        if !self.check_topic(&topic) {
            return;
        }
        if !self.session.may_publish(&topic) {
            return self.deny("publish", ErrorCode::PublishNotAllowed, topic);
        }
        if !self.publish_allowed(&topic) {
            return;
        }
        match self.gateway.publish(&topic, data).await {
            Ok(position) => self.send(&ServerFrame::Published { topic, position }),
            Err(err) => self.send_error(err.code(), err.to_string(), Some(topic)),
        }
    }
}
