//! MIG (Multi-Instance GPU) against the fake NVML (`tests/fake-nvml`): a GPU in MIG mode lists
//! its MIG devices (UUID, GPU and compute instance ids, memory) under it; a GPU with MIG mode
//! off or without MIG lists none. As on a real driver, a GPU in MIG mode gives no utilisation
//! of itself nor of its processes: the source reads that as "not supported", counts no error,
//! and still lists the processes. No GPU and no root needed.

use nodeward::sources::gpu::{check, model::MigDeviceStats, Reading};
use nodeward_tests::fake_nvml::{device, fake};

const GIB: u64 = 1 << 30;

#[test]
fn a_gpu_in_mig_mode_lists_its_mig_devices_and_reads_its_utilisation_as_not_supported() {
    let Some(fake) = fake("mig", &[]) else {
        return;
    };
    fake.script(&format!(
        "devices = 4
         all.util.gpu = 87
         all.procs.compute = 4242:{one}
         all.procs.graphics =
         all.procutil = 4242:50:10:0:0:5
         dev.0.mig.mode = 1
         dev.0.mig.count = 2
         dev.0.mig.0.uuid = MIG-11111111-2222-4333-8444-555555555555
         dev.0.mig.0.name = NVIDIA A100-SXM4-80GB MIG 3g.40gb
         dev.0.mig.0.gi = 2
         dev.0.mig.0.ci = 0
         dev.0.mig.0.mem.total = {forty}
         dev.0.mig.0.mem.used = {one}
         dev.0.mig.1.uuid = MIG-66666666-7777-4888-8999-aaaaaaaaaaaa
         dev.0.mig.1.gi = 1
         dev.0.mig.1.ci = 1
         dev.0.mig.1.mem.total = {forty}
         dev.0.mig.1.mem.used = 0
         dev.1.mig.mode = 0
         dev.1.mig.count = 2
         dev.2.mig.mode = 1
         dev.2.mig.count = 2
         dev.2.mig.0.handle = ERR:999
         ",
        one = GIB,
        forty = 40 * GIB,
    ));
    let snapshot = fake.open().poll();

    // MIG on: the two MIG devices, each with its own identity and memory.
    let mig = device(&snapshot, 0);
    assert_eq!(mig.mig_mode, Reading::Supported(true));
    assert_eq!(
        mig.mig_devices,
        [
            MigDeviceStats {
                index: 0,
                uuid: Reading::Supported("MIG-11111111-2222-4333-8444-555555555555".to_owned()),
                name: Reading::Supported("NVIDIA A100-SXM4-80GB MIG 3g.40gb".to_owned()),
                gpu_instance_id: Reading::Supported(2),
                compute_instance_id: Reading::Supported(0),
                memory_used_bytes: Reading::Supported(GIB),
                memory_total_bytes: Reading::Supported(40 * GIB),
            },
            MigDeviceStats {
                index: 1,
                uuid: Reading::Supported("MIG-66666666-7777-4888-8999-aaaaaaaaaaaa".to_owned()),
                name: Reading::NotSupported,
                gpu_instance_id: Reading::Supported(1),
                compute_instance_id: Reading::Supported(1),
                memory_used_bytes: Reading::Supported(0),
                memory_total_bytes: Reading::Supported(40 * GIB),
            },
        ]
    );
    // The driver gives no utilisation in MIG mode: not supported, not 0, not an error; the
    // process is still listed, unsampled.
    assert_eq!(mig.utilization_gpu_percent, Reading::NotSupported);
    let procs = mig.processes.value().expect("processes listed");
    assert_eq!(procs.iter().map(|p| p.pid).collect::<Vec<_>>(), [4242]);
    assert_eq!(procs[0].sample, None, "no per-process samples in MIG mode");
    assert!(
        mig.nvml_errors_total.is_empty(),
        "\"not supported\" is no failure: {:?}",
        mig.nvml_errors_total
    );

    // MIG off: the GPU reads as before and lists no MIG device, whatever instances the
    // script describes.
    let off = device(&snapshot, 1);
    assert_eq!(off.mig_mode, Reading::Supported(false));
    assert!(off.mig_devices.is_empty(), "{:?}", off.mig_devices);
    assert_eq!(off.utilization_gpu_percent, Reading::Supported(87));
    let sampled = off.processes.value().expect("processes")[0].sample.clone();
    assert_eq!(sampled.map(|s| s.sm_percent), Some(50));

    // A MIG device whose handle fails is left out and counted on its GPU.
    let failing = device(&snapshot, 2);
    assert_eq!(
        failing
            .mig_devices
            .iter()
            .map(|m| m.index)
            .collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(failing.nvml_errors_total.get("unknown"), Some(&1));

    // A GPU without MIG.
    let plain = device(&snapshot, 3);
    assert_eq!(plain.mig_mode, Reading::NotSupported);
    assert!(plain.mig_devices.is_empty());

    // `nodeward gpu-check` prints them.
    let text = check::render(&snapshot);
    assert!(
        text.contains(
            "MIG device 0: MIG-11111111-2222-4333-8444-555555555555 (NVIDIA A100-SXM4-80GB MIG \
             3g.40gb), GPU instance 2, compute instance 0, memory 1073741824 bytes of \
             42949672960 bytes"
        ),
        "{text}"
    );
    assert_eq!(text.matches("MIG mode: yes").count(), 2, "{text}");
}
