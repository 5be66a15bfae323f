//! The socket-local storage the TCP programs share: each socket's cgroup and the segment being
//! timed (`agent_ebpf::SockState`), in a map created with `BPF_F_CLONE`.

use agent_ebpf::SockState;
use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::{bpf_get_current_cgroup_id, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::{SockContext, SockOpsContext},
};

const IPPROTO_TCP: u32 = 6;

/// A BTF map definition in libbpf's layout, like aya-ebpf's own `SkStorage`, but with
/// `BPF_F_CLONE` so that accepted sockets inherit the listener's value.
#[repr(C)]
pub struct SkStorageClone {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; never dereferenced.
unsafe impl Sync for SkStorageClone {}

impl SkStorageClone {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    #[inline(always)]
    pub fn get(&self, sk: *mut core::ffi::c_void, create: bool) -> *mut SockState {
        let flags = if create {
            u64::from(BPF_SK_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: `sk` is a socket pointer the verifier has checked non-null; the helper
        // returns null or a pointer to this socket's value (zeroed when just created).
        unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) }.cast()
    }
}

/// Each socket's cgroup v2 id, written at `socket()` or its first packet, and the segment being
/// timed (`SockState`).
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SOCK_CGROUP")]
pub static SOCK_CGROUP: SkStorageClone = SkStorageClone::new();

/// 1 to record a listener's cgroup at `listen()` (`BPF_SOCK_OPS_TCP_LISTEN_CB`), in place of a
/// `cgroup/sock_create` program; set by user space before load, only where sock_ops programs
/// may call `bpf_get_current_cgroup_id` (not 5.10: the verifier prunes the call when it is 0).
#[unsafe(no_mangle)]
static TAG_AT_LISTEN: u32 = 0;

#[cgroup_sock(sock_create)]
pub fn nodeward_sock_create(ctx: SockContext) -> i32 {
    let _ = try_sock_create(&ctx);
    // 1 = allow: this program only observes.
    1
}

fn try_sock_create(ctx: &SockContext) -> Result<(), i64> {
    // Only TCP sockets are read by sock_ops: a UDP (or raw) socket costs no storage.
    // SAFETY: `protocol` of the UAPI `bpf_sock` context, readable at sock_create.
    if unsafe { (*ctx.sock).protocol } != IPPROTO_TCP {
        return Ok(());
    }
    let slot = SOCK_CGROUP.get(ctx.sock.cast(), true);
    if slot.is_null() {
        return Err(-1);
    }
    // SAFETY: the helper takes no arguments; sock_create runs in the creating task.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: non-null pointer to this socket's storage, valid for the program's run.
    unsafe { (*slot).cgroup_id = cgroup_id };
    Ok(())
}

/// `TAG_AT_LISTEN`: records the cgroup of the task calling `listen()` in the listener's
/// storage, so that every socket it accepts inherits it (`BPF_F_CLONE`) and is attributed at
/// `PASSIVE_ESTABLISHED`, before it has sent anything. The kernel runs this callback from
/// `inet_listen()` in that task, whatever the callback flags; a client socket needs no such
/// tag: the egress program records its cgroup from its SYN.
#[inline(always)]
pub fn tag_listener(ctx: &SockOpsContext) {
    // SAFETY: a volatile read of a read-only global set before load.
    if unsafe { core::ptr::read_volatile(&TAG_AT_LISTEN) } == 0 {
        return;
    }
    // A listener is a full socket: its `sk` is set here.
    let Some(slot) = sock_ops_storage(ctx, true) else {
        return;
    };
    // SAFETY: non-null storage pointer; the helper reads the task that called `listen()`, in
    // whose context this callback runs. A cgroup already recorded (a socket that sent before)
    // is kept.
    unsafe {
        if (*slot).cgroup_id == 0 {
            (*slot).cgroup_id = bpf_get_current_cgroup_id();
        }
    }
}

/// The storage of a sock_ops callback's socket (made if `create` and missing), if it has a
/// socket and the storage exists or could be made.
#[inline(always)]
pub fn sock_ops_storage(ctx: &SockOpsContext, create: bool) -> Option<*mut SockState> {
    // SAFETY: reading the `sk` member of the UAPI context; the verifier types it as a
    // nullable socket pointer and the null check below is what it requires.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let slot = SOCK_CGROUP.get(sk.cast(), create);
    (!slot.is_null()).then_some(slot)
}
