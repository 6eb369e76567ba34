//! Bucket triggers: a function invoked with an object event whenever an
//! object of one of the node's buckets is written or deleted.

use crate::names::BucketName;
use serde::{Deserialize, Serialize};

/// Which object changes a bucket trigger fires on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectChange {
    /// An object was written (created or replaced): `object.created`.
    Created,
    /// An object was deleted: `object.deleted`.
    Deleted,
}

impl ObjectChange {
    /// The CloudEvents type of the event.
    pub fn ce_type(self) -> &'static str {
        match self {
            Self::Created => "object.created",
            Self::Deleted => "object.deleted",
        }
    }
}

fn both() -> Vec<ObjectChange> {
    vec![ObjectChange::Created, ObjectChange::Deleted]
}

/// `{ bucket = "uploads", prefix = "images/", events = ["created"] }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawTrigger")]
pub struct BucketTrigger {
    pub bucket: BucketName,
    /// Only keys starting with this text (every key when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// The changes that fire (both when absent).
    pub events: Vec<ObjectChange>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    bucket: BucketName,
    #[serde(default)]
    prefix: String,
    #[serde(default = "both")]
    events: Vec<ObjectChange>,
}

impl TryFrom<RawTrigger> for BucketTrigger {
    type Error = String;
    fn try_from(r: RawTrigger) -> Result<Self, String> {
        if r.events.is_empty() {
            return Err(format!(
                "the trigger on bucket `{}` has no events: list \"created\", \"deleted\" or both, or leave `events` out for both",
                r.bucket
            ));
        }
        let mut events = r.events;
        events.sort_by_key(|e| *e as u8);
        events.dedup();
        Ok(Self {
            bucket: r.bucket,
            prefix: r.prefix,
            events,
        })
    }
}

impl BucketTrigger {
    /// Whether a `change` of `key` in `bucket` fires this trigger.
    pub fn matches(&self, bucket: &str, key: &str, change: ObjectChange) -> bool {
        self.bucket.as_str() == bucket
            && key.starts_with(&self.prefix)
            && self.events.contains(&change)
    }

    /// What identifies the trigger within a function.
    pub fn key(&self) -> String {
        format!("{}/{}", self.bucket, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_bucket_prefix_and_change() {
        let t: BucketTrigger =
            toml::from_str("bucket = \"uploads\"\nprefix = \"images/\"\nevents = [\"created\"]")
                .unwrap();
        assert!(t.matches("uploads", "images/cat.png", ObjectChange::Created));
        assert!(!t.matches("uploads", "images/cat.png", ObjectChange::Deleted));
        assert!(!t.matches("uploads", "docs/a.txt", ObjectChange::Created));
        assert!(!t.matches("other", "images/cat.png", ObjectChange::Created));
        let all: BucketTrigger = toml::from_str("bucket = \"uploads\"").unwrap();
        assert!(all.matches("uploads", "x", ObjectChange::Deleted));
        let none = toml::from_str::<BucketTrigger>("bucket = \"uploads\"\nevents = []");
        assert!(none.unwrap_err().to_string().contains("no events"));
        assert!(toml::from_str::<BucketTrigger>("bucket = \"Up\"").is_err());
        assert!(toml::from_str::<BucketTrigger>("bucket = \"up\"\nevents = [\"read\"]").is_err());
    }
}
