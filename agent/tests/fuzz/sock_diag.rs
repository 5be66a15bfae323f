//! sock_diag netlink replies (binary from the kernel, read by the TCP source's fallback when
//! eBPF is off) and the GPU source's `/proc/<pid>/cgroup` helpers.

use nodeward::sources::{
    gpu::procs::{cgroup_path_from_proc, container_for_cgroup},
    tcp::diag::parse_reply,
};
use proptest::prelude::*;

use crate::cases;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_CGROUP_ID: u16 = 21;

/// A netlink message: 16-byte header (length, type, flags, seq, pid) and its payload, padded
/// to 4 bytes.
fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&[0; 10]);
    m.extend_from_slice(payload);
    m.resize((m.len() + 3) & !3, 0);
    m
}

/// An `inet_diag_msg` (72 bytes, random) followed by an `INET_DIAG_CGROUP_ID` attribute.
fn socket(body: &[u8; 72], cgroup_id: u64) -> Vec<u8> {
    let mut p = body.to_vec();
    p.extend_from_slice(&12u16.to_ne_bytes());
    p.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
    p.extend_from_slice(&cgroup_id.to_ne_bytes());
    p
}

fn bodies() -> impl Strategy<Value = Vec<([u8; 72], u64)>> {
    prop::collection::vec((prop::array::uniform32(any::<u8>()), any::<u64>()), 0..16).prop_map(
        |v| {
            v.into_iter()
                .map(|(half, id)| {
                    let mut b = [0u8; 72];
                    b[..32].copy_from_slice(&half);
                    b[40..72].copy_from_slice(&half);
                    (b, id)
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn any_netlink_bytes_parse_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_reply(&bytes);
    }

    #[test]
    fn messages_with_lying_lengths_parse_without_panic(
        msgs in prop::collection::vec(
            (any::<u32>(), prop::sample::select(vec![2u16, 3, 20, 0, 0xffff]), prop::collection::vec(any::<u8>(), 0..200)),
            0..10,
        ),
    ) {
        let mut buf = Vec::new();
        for (len, kind, payload) in msgs {
            let mut m = message(kind, &payload);
            m[..4].copy_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&m);
        }
        let _ = parse_reply(&buf);
    }

    #[test]
    fn a_well_formed_dump_gives_every_socket_with_its_cgroup(sockets in bodies()) {
        let mut buf = Vec::new();
        for (body, id) in &sockets {
            buf.extend(message(SOCK_DIAG_BY_FAMILY, &socket(body, *id)));
        }
        buf.extend(message(NLMSG_DONE, &[0; 4]));
        let (got, done) = parse_reply(&buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(done);
        prop_assert_eq!(got.len(), sockets.len());
        for (s, (body, id)) in got.iter().zip(&sockets) {
            prop_assert_eq!(s.cgroup_id, Some(*id));
            prop_assert_eq!(s.family, body[0]);
        }
        // Cut anywhere: never a panic, never more sockets than were whole.
        for cut in (0..buf.len()).step_by(7) {
            if let Ok((part, _)) = parse_reply(&buf[..cut]) {
                prop_assert!(part.len() <= sockets.len());
            }
        }
    }

    #[test]
    fn gpu_process_cgroup_helpers_never_panic(text in "\\PC*", path in "[a-z0-9/._:-]{0,120}") {
        if let Some(p) = cgroup_path_from_proc(&text) {
            let _ = container_for_cgroup(&p);
        }
        let _ = container_for_cgroup(&path);
        let _ = container_for_cgroup(&text);
    }
}
