//! `--json`: the replies in protobuf's canonical JSON mapping, the output grpcurl prints for the
//! same call with its default options — lowerCamelCase field names, enum values by name, 64-bit
//! integers as strings, fields at their default value left out.
//!
//! The mapping is driven by the descriptors the agent already embeds for server reflection: a
//! reply is encoded, decoded as a `DynamicMessage` of its descriptor and serialised from there, so
//! a new field or enum in the proto reaches the output with no code here.

use std::io::Write;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter, Serializer};

use crate::api::pb;

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the embedded nodeward.v1 descriptors do not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("no message {0} in the embedded nodeward.v1 descriptors")]
    UnknownMessage(&'static str),
    #[error("the reply does not decode as {name}: {source}")]
    Decode {
        name: &'static str,
        source: prost::DecodeError,
    },
    #[error("cannot write JSON: {0}")]
    Write(#[from] serde_json::Error),
}

/// A reply the client prints, with its fully-qualified proto name.
pub trait Reply: prost::Message {
    const FULL_NAME: &'static str;
}

macro_rules! replies {
    ($($ty:ident),* $(,)?) => {
        $(impl Reply for pb::$ty {
            const FULL_NAME: &'static str = concat!("nodeward.v1.", stringify!($ty));
        })*
    };
}

replies!(
    GetNodeHealthResponse,
    WatchNodeHealthResponse,
    ListContainersResponse,
    ListGpusResponse,
    BeginDrainResponse,
    GetDrainStatusResponse,
    CancelDrainResponse,
);

/// Prints replies as JSON; holds the decoded descriptors so a `watch` decodes them once.
#[derive(Debug)]
pub struct Printer {
    pool: DescriptorPool,
}

impl Printer {
    pub fn new() -> Result<Self, JsonError> {
        Ok(Self {
            pool: DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET)?,
        })
    }

    fn descriptor<M: Reply>(&self) -> Result<MessageDescriptor, JsonError> {
        self.pool
            .get_message_by_name(M::FULL_NAME)
            .ok_or(JsonError::UnknownMessage(M::FULL_NAME))
    }

    fn dynamic<M: Reply>(&self, reply: &M) -> Result<DynamicMessage, JsonError> {
        DynamicMessage::decode(self.descriptor::<M>()?, reply.encode_to_vec().as_slice()).map_err(
            |source| JsonError::Decode {
                name: M::FULL_NAME,
                source,
            },
        )
    }

    fn write<M: Reply, F: Formatter>(
        &self,
        reply: &M,
        out: &mut Vec<u8>,
        formatter: F,
    ) -> Result<(), JsonError> {
        let mut ser = Serializer::with_formatter(out, formatter);
        // `new()` is the standard mapping, which is what grpcurl prints by default.
        self.dynamic(reply)?
            .serialize_with_options(&mut ser, &SerializeOptions::new())?;
        Ok(())
    }

    /// The reply as indented JSON (two spaces, as grpcurl), fields in proto order.
    pub fn pretty<M: Reply>(&self, reply: &M) -> Result<String, JsonError> {
        let mut out = Vec::new();
        self.write(reply, &mut out, PrettyFormatter::new())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The reply as one line of JSON, for streams (`watch`).
    pub fn line<M: Reply>(&self, reply: &M) -> Result<String, JsonError> {
        let mut out = Vec::new();
        self.write(reply, &mut out, CompactFormatter)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Prints the reply indented, to stdout.
    pub fn print<M: Reply>(&self, reply: &M) -> Result<(), JsonError> {
        let text = self.pretty(reply)?;
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) is not an error worth a message.
        let _ = writeln!(stdout, "{text}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> serde_json::Value {
        serde_json::from_str(text).expect("the printer writes valid JSON")
    }

    /// A reply with a nested message, enums (one at its zero value), 64-bit integers (signed and
    /// unsigned), a repeated message and fields at their default value.
    fn sample() -> pb::GetNodeHealthResponse {
        pb::GetNodeHealthResponse {
            health: Some(pb::NodeHealthReport {
                node: "n1".to_owned(),
                verdict: pb::Verdict::Degraded as i32,
                evaluated_unix_ms: 1_700_000_000_123,
                drain_recommended: false,
                drain: Some(pb::DrainInfo {
                    state: pb::DrainState::Draining as i32,
                    started_unix_ms: 9_007_199_254_740_993,
                    ..Default::default()
                }),
                conditions: vec![pb::Condition {
                    r#type: "DiskNearlyFull".to_owned(),
                    status: pb::ConditionStatus::Firing as i32,
                    severity: pb::Severity::Warning as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn replies_follow_the_canonical_json_mapping() {
        let printer = Printer::new().expect("descriptors decode");
        let v = parse(&printer.pretty(&sample()).expect("prints"));
        let h = &v["health"];
        // lowerCamelCase names; enums by their proto name.
        assert_eq!(h["verdict"], "VERDICT_DEGRADED", "{v}");
        assert_eq!(h["drain"]["state"], "DRAIN_STATE_DRAINING", "{v}");
        assert_eq!(h["conditions"][0]["type"], "DiskNearlyFull", "{v}");
        assert_eq!(h["conditions"][0]["status"], "CONDITION_STATUS_FIRING");
        assert_eq!(h["conditions"][0]["severity"], "SEVERITY_WARNING");
        // int64 as a string, exact even past 2^53 (a double would round this one).
        assert_eq!(h["evaluatedUnixMs"], "1700000000123", "{v}");
        assert_eq!(h["drain"]["startedUnixMs"], "9007199254740993", "{v}");
        // Default values (false, 0, "", empty lists) are left out, snake_case names never appear.
        let keys: Vec<&str> = h
            .as_object()
            .expect("health is an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert!(!keys.contains(&"drainRecommended"), "{keys:?}");
        assert!(!keys.contains(&"unknownReason"), "{keys:?}");
        assert!(!keys.contains(&"sources"), "{keys:?}");
        assert!(keys.iter().all(|k| !k.contains('_')), "{keys:?}");
        assert!(h["drain"].get("deadlineUnixMs").is_none(), "{v}");
    }

    #[test]
    fn uint64_fields_are_strings_and_uint32_fields_numbers() {
        let printer = Printer::new().expect("descriptors decode");
        let reply = pb::ListGpusResponse {
            available: true,
            gpus: vec![pb::Gpu {
                index: 3,
                memory_total_bytes: u64::MAX,
                ..Default::default()
            }],
        };
        let v = parse(&printer.pretty(&reply).expect("prints"));
        assert_eq!(v["available"], true, "{v}");
        assert_eq!(v["gpus"][0]["index"], 3, "{v}");
        assert_eq!(v["gpus"][0]["memoryTotalBytes"], u64::MAX.to_string(), "{v}");
    }

    #[test]
    fn an_enum_value_the_descriptors_do_not_name_prints_as_its_number() {
        let printer = Printer::new().expect("descriptors decode");
        let reply = pb::CancelDrainResponse {
            was_draining: true,
            drain: Some(pb::DrainInfo {
                state: 77,
                ..Default::default()
            }),
        };
        let v = parse(&printer.line(&reply).expect("prints"));
        assert_eq!(v["wasDraining"], true, "{v}");
        assert_eq!(v["drain"]["state"], 77, "{v}");
    }

    #[test]
    fn an_empty_reply_is_an_empty_object() {
        let printer = Printer::new().expect("descriptors decode");
        let text = printer
            .pretty(&pb::GetDrainStatusResponse::default())
            .expect("prints");
        assert_eq!(parse(&text), serde_json::json!({}));
    }

    #[test]
    fn every_printed_reply_is_named_in_the_descriptors() {
        let printer = Printer::new().expect("descriptors decode");
        fn check<M: Reply>(p: &Printer) {
            let d = p.descriptor::<M>().expect("the reply's descriptor exists");
            assert_eq!(d.full_name(), M::FULL_NAME);
        }
        check::<pb::GetNodeHealthResponse>(&printer);
        check::<pb::WatchNodeHealthResponse>(&printer);
        check::<pb::ListContainersResponse>(&printer);
        check::<pb::ListGpusResponse>(&printer);
        check::<pb::BeginDrainResponse>(&printer);
        check::<pb::GetDrainStatusResponse>(&printer);
        check::<pb::CancelDrainResponse>(&printer);
    }

    #[test]
    fn pretty_output_keeps_the_proto_field_order() {
        let printer = Printer::new().expect("descriptors decode");
        let text = printer.pretty(&sample()).expect("prints");
        let pos = |k: &str| text.find(&format!("\"{k}\"")).expect("key printed");
        // node (1) before verdict before evaluatedUnixMs: the order of the .proto, as grpcurl.
        assert!(pos("node") < pos("verdict"), "{text}");
        assert!(pos("verdict") < pos("evaluatedUnixMs"), "{text}");
    }
}
