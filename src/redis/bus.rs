//! The invalidation bus over Redis pub/sub: [`RedisBus`] publishes what
//! [`Invalidator::invalidate`] hands it, and [`subscribe`] runs the task that hands what the
//! other replicas published to [`Invalidator::apply`].
//!
//! The wire format, one JSON object per message on the channel `{key_prefix}v1:invalidations`:
//! `{"v":1,"from":"<replica>","scope":"all"}`,
//! `{"v":1,"from":"<replica>","scope":"type","type":"provider"}`,
//! `{"v":1,"from":"<replica>","scope":"extension","type":"provider","name":"aws"}`.
//! `v` is the schema version (a message of another version is ignored), `from` the
//! publishing replica (which ignores its own messages: it dropped its entries already).
//!
//! Pub/sub delivers to those subscribed at the time only. When the subscription is lost
//! (Redis restarted or unreachable) it is renewed once a second, and on renewal this replica
//! drops everything it holds, since it may have missed invalidations meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Redis, SCHEMA_VERSION};
use crate::invalidation::{Bus, Invalidator, Scope};
use crate::registry::{ExtensionKey, ExtensionName, ExtensionType};

/// How long to wait before subscribing again after the subscription was lost.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// One message on the channel.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The schema version.
    pub v: u32,
    /// The publishing replica.
    pub from: String,
    #[serde(flatten)]
    pub scope: WireScope,
}

/// A [`Scope`] as it travels.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scope", rename_all = "lowercase")]
pub enum WireScope {
    All,
    Type {
        #[serde(rename = "type")]
        ty: ExtensionType,
    },
    Extension {
        #[serde(rename = "type")]
        ty: ExtensionType,
        name: String,
    },
}

impl From<&Scope> for WireScope {
    fn from(scope: &Scope) -> Self {
        match scope {
            Scope::All => Self::All,
            Scope::Type(ty) => Self::Type { ty: *ty },
            Scope::Extension(key) => Self::Extension {
                ty: key.ty,
                name: key.name.as_str().to_owned(),
            },
        }
    }
}

impl WireScope {
    /// The scope, if the name is a valid extension name.
    pub fn scope(&self) -> Option<Scope> {
        Some(match self {
            Self::All => Scope::All,
            Self::Type { ty } => Scope::Type(*ty),
            Self::Extension { ty, name } => Scope::Extension(ExtensionKey {
                ty: *ty,
                name: ExtensionName::parse(name).ok()?,
            }),
        })
    }
}

/// Publishes invalidations to the other replicas.
pub struct RedisBus {
    redis: Redis,
    /// This replica's name on the bus.
    replica: Arc<str>,
    channel: String,
}

impl RedisBus {
    pub fn new(redis: Redis) -> Self {
        Self {
            channel: channel(&redis),
            replica: format!("{:016x}", fastrand::u64(..)).into(),
            redis,
        }
    }

    /// Starts the task handing the other replicas' invalidations to `invalidator`.
    pub fn subscribe(&self, invalidator: Invalidator) {
        tokio::spawn(listen(
            self.redis.clone(),
            self.channel.clone(),
            self.replica.clone(),
            invalidator,
        ));
    }
}

/// The channel of invalidations.
pub fn channel(redis: &Redis) -> String {
    redis.key("invalidations")
}

impl Bus for RedisBus {
    fn publish<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, bool> {
        let message = Message {
            v: SCHEMA_VERSION,
            from: self.replica.to_string(),
            scope: scope.into(),
        };
        Box::pin(async move {
            let text = serde_json::to_string(&message).expect("a message of strings serialises");
            let publish = redis::cmd("PUBLISH").arg(&self.channel).arg(text).clone();
            let sent = self.redis.run::<i64>(&publish).await.is_some();
            let outcome = if sent { "ok" } else { "failed" };
            metrics::counter!("redis_invalidations_sent_total", "outcome" => outcome).increment(1);
            sent
        })
    }
}

/// Subscribes, hands each message on, and subscribes again when the subscription is lost.
async fn listen(redis: Redis, channel: String, replica: Arc<str>, invalidator: Invalidator) {
    let mut lost = false;
    loop {
        match subscription(&redis, &channel).await {
            Ok(mut pubsub) => {
                if lost {
                    tracing::info!(
                        "invalidation bus subscribed again; dropping what may have been missed"
                    );
                    invalidator.apply(&Scope::All);
                }
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Ok(text) = message.get_payload::<String>() else {
                        continue;
                    };
                    receive(&text, &replica, &invalidator);
                }
                tracing::warn!("invalidation bus subscription lost");
            }
            Err(e) if !lost => {
                tracing::warn!(error = %e, "cannot subscribe to the invalidation bus");
            }
            Err(_) => {}
        }
        lost = true;
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

async fn subscription(redis: &Redis, channel: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let connect = async {
        let mut pubsub = redis.client().get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    tokio::time::timeout(
        Duration::from_secs(1).max(redis.config().timeout()),
        connect,
    )
    .await
    .unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )))
    })
}

/// Applies one message from the channel, unless it is this replica's own or unreadable.
fn receive(text: &str, replica: &str, invalidator: &Invalidator) {
    let message = match serde_json::from_str::<Message>(text) {
        Ok(message) if message.v == SCHEMA_VERSION => message,
        Ok(message) => {
            tracing::debug!(
                version = message.v,
                "invalidation of another schema version ignored"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable invalidation ignored");
            return;
        }
    };
    if message.from == replica {
        return;
    }
    let Some(scope) = message.scope.scope() else {
        tracing::warn!("invalidation naming an invalid extension ignored");
        return;
    };
    metrics::counter!("redis_invalidations_received_total", "scope" => scope.label()).increment(1);
    invalidator.apply(&scope);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_scopes_travel_and_come_back() {
        let aws = ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").unwrap(),
        };
        for (scope, wire) in [
            (Scope::All, r#"{"v":1,"from":"a","scope":"all"}"#),
            (
                Scope::Type(ExtensionType::Taskserv),
                r#"{"v":1,"from":"a","scope":"type","type":"taskserv"}"#,
            ),
            (
                Scope::Extension(aws),
                r#"{"v":1,"from":"a","scope":"extension","type":"provider","name":"aws"}"#,
            ),
        ] {
            let message = Message {
                v: 1,
                from: "a".into(),
                scope: (&scope).into(),
            };
            assert_eq!(serde_json::to_string(&message).unwrap(), wire);
            let back: Message = serde_json::from_str(wire).unwrap();
            assert_eq!(back.scope.scope(), Some(scope));
        }
        let bad: Message = serde_json::from_str(
            r#"{"v":1,"from":"a","scope":"extension","type":"provider","name":"../x"}"#,
        )
        .unwrap();
        assert_eq!(bad.scope.scope(), None);
    }
}
