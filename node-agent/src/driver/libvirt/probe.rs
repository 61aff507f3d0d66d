//! Choosing the domain type by running a guest, not by looking for `/dev/kvm`.
//!
//! Some hosts expose a `/dev/kvm` that libvirt advertises but that cannot run guests at any
//! useful speed (a software KVM backend without VMX: guests hang or die with an emulation
//! failure). So the driver boots a probe guest, a boot sector that enters long mode, runs a
//! short compute loop and prints a marker on its serial port (`probe.S`), first under `kvm`,
//! then under `qemu` (TCG). `kvm` wins only when its marker appears within the timeout and
//! sooner than under emulation; anything else means `qemu`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use virt::connect::Connect;

use super::xml::DomainType;

/// The marker the probe guest prints.
pub const MARKER: &str = "UPDRAFT-PROBE-OK";

/// The assembled `probe.S` (its first 209 bytes; the rest of the sector is zero but for the
/// boot signature).
const PROBE_CODE: [u8; 209] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xbf, 0x00, 0x10, 0x66,
    0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x66, 0xf3, 0xab, 0x66, 0xc7, 0x06, 0x00, 0x10, 0x03, 0x20, 0x00,
    0x00, 0x66, 0xc7, 0x06, 0x00, 0x20, 0x03, 0x30, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x00, 0x30, 0x83,
    0x00, 0x00, 0x00, 0x0f, 0x01, 0x16, 0xb8, 0x7c, 0x0f, 0x20, 0xe0, 0x66, 0x83, 0xc8, 0x20, 0x0f,
    0x22, 0xe0, 0x66, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x66, 0xb9, 0x80, 0x00, 0x00,
    0xc0, 0x0f, 0x32, 0x66, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x66, 0x0d,
    0x01, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x6f, 0x7c, 0x00, 0x00, 0x08, 0x00, 0x66,
    0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xd0, 0xb9, 0x80, 0xf0, 0xfa, 0x02, 0x48, 0xc7, 0xc7, 0x00,
    0x50, 0x00, 0x00, 0x48, 0x01, 0x0f, 0xff, 0xc9, 0x75, 0xf9, 0x48, 0x8d, 0x35, 0x2d, 0x00, 0x00,
    0x00, 0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xf4, 0xeb, 0xfd,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x17, 0x00, 0xa0, 0x7c, 0x00, 0x00, 0x55, 0x50,
    0x44, 0x52, 0x41, 0x46, 0x54, 0x2d, 0x50, 0x52, 0x4f, 0x42, 0x45, 0x2d, 0x4f, 0x4b, 0x0d, 0x0a,
    0x00,
];

/// The probe's boot sector: code, zero padding, `0x55 0xaa`.
pub fn boot_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// What the probe found, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The type to use.
    pub kind: DomainType,
    /// Why.
    pub why: String,
}

/// Probes which domain type runs guests on this connection. Blocking: call it off the async
/// runtime. Never fails: when in doubt the answer is `qemu`.
pub fn choose(conn: &Connect, scratch: &Path, timeout: Duration) -> ProbeOutcome {
    let driver = conn.driver_type().unwrap_or_default();
    if driver.eq_ignore_ascii_case("test") {
        return ProbeOutcome {
            kind: DomainType::Test,
            why: "libvirt's test driver".into(),
        };
    }
    if let Err(e) = conn.domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0) {
        return ProbeOutcome {
            kind: DomainType::Qemu,
            why: format!("kvm not offered by libvirt: {}", e.message()),
        };
    }
    let kvm_time = match run(conn, scratch, DomainType::Kvm, timeout) {
        Ok(t) => t,
        Err(e) => {
            return ProbeOutcome {
                kind: DomainType::Qemu,
                why: format!("the kvm probe guest did not run: {e}"),
            };
        }
    };
    match run(conn, scratch, DomainType::Qemu, timeout) {
        Ok(tcg_time) if tcg_time <= kvm_time => ProbeOutcome {
            kind: DomainType::Qemu,
            why: format!(
                "kvm ran the probe in {kvm_time:?}, no faster than emulation ({tcg_time:?})"
            ),
        },
        Ok(tcg_time) => ProbeOutcome {
            kind: DomainType::Kvm,
            why: format!("kvm ran the probe in {kvm_time:?} (emulation: {tcg_time:?})"),
        },
        Err(e) => ProbeOutcome {
            kind: DomainType::Kvm,
            why: format!("kvm ran the probe in {kvm_time:?} (emulation failed: {e})"),
        },
    }
}

fn paths(scratch: &Path, kind: DomainType) -> (PathBuf, PathBuf) {
    (
        scratch.join("probe.img"),
        scratch.join(format!("probe-{}.log", kind.as_str())),
    )
}

fn probe_xml(kind: DomainType, image: &Path, log: &Path) -> String {
    use quick_xml::escape::escape;
    format!(
        "<domain type=\"{k}\"><name>updraft-probe-{k}-{pid}</name>\
         <memory unit=\"MiB\">16</memory><vcpu>1</vcpu>\
         <os><type arch=\"x86_64\">hvm</type><boot dev=\"hd\"/></os>\
         <on_crash>destroy</on_crash><devices>\
         <disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"raw\"/>\
         <source file=\"{img}\"/><target dev=\"hda\" bus=\"ide\"/></disk>\
         <serial type=\"pty\"><log file=\"{log}\" append=\"off\"/><target port=\"0\"/></serial>\
         </devices></domain>",
        k = kind.as_str(),
        pid = std::process::id(),
        img = escape(image.to_string_lossy()),
        log = escape(log.to_string_lossy()),
    )
}

/// Boots the probe under `kind`; the time to its marker, or why it did not appear.
fn run(
    conn: &Connect,
    scratch: &Path,
    kind: DomainType,
    timeout: Duration,
) -> Result<Duration, String> {
    let (image, log) = paths(scratch, kind);
    std::fs::create_dir_all(scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
    std::fs::write(&image, boot_sector()).map_err(|e| format!("write {}: {e}", image.display()))?;
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    let dom = conn
        .create_domain_xml(&probe_xml(kind, &image, &log), 0)
        .map_err(|e| format!("start: {}", e.message()))?;
    let result = loop {
        if std::fs::read_to_string(&log).is_ok_and(|s| s.contains(MARKER)) {
            break Ok(t0.elapsed());
        }
        if !dom.is_active().unwrap_or(false) {
            break Err("the probe guest stopped".to_string());
        }
        if t0.elapsed() >= timeout {
            break Err(format!("no marker within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = dom.destroy();
    let _ = std::fs::remove_file(&log);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_sector_is_bootable_and_carries_the_marker() {
        let s = boot_sector();
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        let text = String::from_utf8_lossy(&s);
        assert!(text.contains(MARKER));
        assert_eq!(s[0], 0xfa, "starts with cli");
    }

    #[test]
    fn the_test_driver_needs_no_probe() {
        let conn = Connect::open(Some("test:///default")).unwrap();
        let out = choose(&conn, &std::env::temp_dir(), Duration::from_secs(1));
        assert_eq!(out.kind, DomainType::Test);
    }
}
