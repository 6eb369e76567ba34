//! Validated names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid {kind} `{name}`: use 1 to 63 lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen (e.g. `hello-world`)"
)]
pub struct NameError {
    kind: &'static str,
    name: String,
}

fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_owned(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                check($kind, &s)?;
                Ok(Self(s))
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a function, unique on a node.
    FunctionName,
    "function name"
);
name_type!(
    /// The name of an app (a group of functions deployed together).
    AppName,
    "app name"
);
name_type!(
    /// The name of a bucket of the node's object storage.
    BucketName,
    "bucket name"
);

/// An environment variable name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnvName(String);

impl TryFrom<String> for EnvName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(Self(s))
        } else {
            Err(format!(
                "invalid environment variable name `{s}`: use letters, digits and underscores, not starting with a digit (e.g. `LOG_LEVEL`)"
            ))
        }
    }
}

impl From<EnvName> for String {
    fn from(n: EnvName) -> String {
        n.0
    }
}

impl EnvName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "hello", "hello-world2", "x1"] {
            assert!(good.parse::<FunctionName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "Hello",
            "1abc",
            "a_b",
            "a-",
            "-a",
            "a/b",
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<FunctionName>().is_err(), "{bad}");
        }
        assert!(EnvName::try_from("LOG_LEVEL".to_owned()).is_ok());
        assert!(EnvName::try_from("A=B".to_owned()).is_err());
    }
}
