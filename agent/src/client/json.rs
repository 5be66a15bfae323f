//! `--json`: the replies in protobuf's canonical JSON mapping, the output grpcurl prints for the
//! same call with its default options — lowerCamelCase field names, enum values by name, 64-bit
//! integers as strings, fields at their default value left out.
//!
//! The mapping is driven by the descriptors the agent already embeds for server reflection: a
//! reply is encoded, decoded as a `DynamicMessage` of its descriptor and serialised from there, so
//! a new field or enum in the proto reaches the output with no code here.

use std::io::{self, Write};

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

/// Writes doubles as protobuf's JSON mapping (and JavaScript) does, `2` rather than serde's
/// `2.0`, so the output matches grpcurl's to the byte; everything else is the inner formatter's.
struct ProtoNumbers<F>(F);

impl<F: Formatter> ProtoNumbers<F> {
    /// Plain decimal digits (Rust's `Display`: shortest round-trip, no exponent) in the range
    /// where the mapping uses them; outside it both use an exponent and only its spelling differs
    /// (`1e21` here, `1e+21` in Go), which JSON readers do not see.
    fn plain(v: f64) -> Option<String> {
        let a = v.abs();
        (v.is_finite() && (a == 0.0 || (1e-6..1e21).contains(&a))).then(|| v.to_string())
    }
}

impl<F: Formatter> Formatter for ProtoNumbers<F> {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, v: f64) -> io::Result<()> {
        match Self::plain(v) {
            Some(text) => w.write_all(text.as_bytes()),
            None => self.0.write_f64(w, v),
        }
    }
    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, v: f32) -> io::Result<()> {
        // Display of the f32 itself: its shortest digits, not those of the widened f64.
        match Self::plain(f64::from(v)) {
            Some(_) => w.write_all(v.to_string().as_bytes()),
            None => self.0.write_f32(w, v),
        }
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

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
        let mut ser = Serializer::with_formatter(out, ProtoNumbers(formatter));
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
            reason: String::new(),
            gpus: vec![pb::Gpu {
                index: 3,
                memory_total_bytes: u64::MAX,
                ..Default::default()
            }],
        };
        let v = parse(&printer.pretty(&reply).expect("prints"));
        assert_eq!(v["available"], true, "{v}");
        assert_eq!(v["gpus"][0]["index"], 3, "{v}");
        assert_eq!(
            v["gpus"][0]["memoryTotalBytes"],
            u64::MAX.to_string(),
            "{v}"
        );
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
    fn doubles_print_as_the_json_mapping_spells_them() {
        let printer = Printer::new().expect("descriptors decode");
        let reply = pb::ListGpusResponse {
            available: true,
            reason: String::new(),
            gpus: vec![
                pb::Gpu {
                    temperature_celsius: 41.0,
                    power_watts: 72.5,
                    utilization_percent: 0.1,
                    ..Default::default()
                },
                pb::Gpu {
                    index: 1,
                    temperature_celsius: 1e21,
                    power_watts: -0.000_000_5,
                    ..Default::default()
                },
            ],
        };
        let text = printer.line(&reply).expect("prints");
        // Integral doubles without `.0`, as grpcurl prints them.
        assert!(text.contains(r#""temperatureCelsius":41,"#), "{text}");
        assert!(text.contains(r#""powerWatts":72.5"#), "{text}");
        assert!(text.contains(r#""utilizationPercent":0.1"#), "{text}");
        // Outside [1e-6, 1e21) an exponent; the value survives either way.
        let v = parse(&text);
        assert_eq!(
            v["gpus"][1]["temperatureCelsius"].as_f64(),
            Some(1e21),
            "{text}"
        );
        assert_eq!(v["gpus"][1]["powerWatts"].as_f64(), Some(-5e-7), "{text}");
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
