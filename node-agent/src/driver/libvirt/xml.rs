//! The libvirt XML updraft writes and reads, as pure functions: domain, storage pool and
//! volume descriptions, the `<metadata>` element that marks a domain as ours, and the names
//! and identities derived from a request id.
//!
//! A domain's name and UUID derive from the request id alone, so a retry of a build finds the
//! domain instead of making a second one. Its MAC address derives from the request id *and*
//! the claim token: a duplicate built by a fenced zombie under an older claim never gets the
//! network identity of the one the record names.

use std::collections::BTreeMap;
use std::path::Path;

use placement::ids::ResourceName;
use placement::{ClaimToken, Epoch, NodeId, RequestId, Resources};
use quick_xml::escape::escape;
use quick_xml::events::Event;

/// XML namespace of updraft's domain metadata.
pub const METADATA_NS: &str = "https://updraft.dev/xmlns/instance/1";
/// Prefix of domain names updraft creates.
pub const DOMAIN_PREFIX: &str = "updraft-";
/// Namespace of the name-based (v5) UUIDs of updraft domains.
const UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1d_2c3e_9a4b_4d5e_8f60_7182_93a4_b5c6);

/// The `<domain type=...>` a driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (TCG).
    Qemu,
    /// libvirt's test driver.
    Test,
}

impl DomainType {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
            DomainType::Test => "test",
        }
    }
}

/// How a VM is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network interface.
    None,
    /// QEMU user-mode networking (no host set-up needed).
    User,
    /// A libvirt network by name.
    Named(String),
    /// A host bridge by name.
    Bridge(String),
}

impl Network {
    /// Parses `none`, `user`, `network:<name>` or `bridge:<name>`.
    pub fn parse(s: &str) -> Option<Network> {
        match s {
            "none" => Some(Network::None),
            "user" => Some(Network::User),
            _ => {
                let (kind, name) = s.split_once(':')?;
                if !is_volume_name(name) {
                    return None;
                }
                match kind {
                    "network" => Some(Network::Named(name.to_string())),
                    "bridge" => Some(Network::Bridge(name.to_string())),
                    _ => None,
                }
            }
        }
    }
}

/// True for names safe as pool, volume, network or bridge names: 1 to 128 of `[A-Za-z0-9._-]`,
/// not starting with `.` or `-`.
pub fn is_volume_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The domain name of a request.
pub fn domain_name(id: &RequestId) -> String {
    format!("{DOMAIN_PREFIX}{id}")
}

/// The domain UUID of a request (name-based, stable).
pub fn domain_uuid(id: &RequestId) -> uuid::Uuid {
    uuid::Uuid::new_v5(&UUID_NAMESPACE, id.as_str().as_bytes())
}

/// The name of a request's disk volume.
pub fn volume_name(id: &RequestId) -> String {
    format!("{DOMAIN_PREFIX}{id}.qcow2")
}

/// The MAC address of a request's interface under one claim (locally administered, in
/// QEMU's `52:54:00` range).
pub fn mac_address(id: &RequestId, token: ClaimToken) -> String {
    let h = placement::ids::stable_hash(&[b"mac", id.as_str().as_bytes(), &token.0.to_le_bytes()]);
    let b = h.to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// What updraft records in a domain's metadata: whose it is and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The request.
    pub request: RequestId,
    /// The node that built it.
    pub node: NodeId,
    /// The epoch it was built under.
    pub epoch: Epoch,
    /// The claim token it was built under.
    pub token: ClaimToken,
    /// What the request asked for (reconcile adopts exactly this into the ledger).
    pub resources: Resources,
    /// The request's metadata, for operators reading `virsh dumpxml`.
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// The `<updraft:instance>` element.
    pub fn to_xml(&self) -> String {
        let mut x = format!(
            "<updraft:instance xmlns:updraft=\"{METADATA_NS}\">\
             <updraft:request>{}</updraft:request>\
             <updraft:node>{}</updraft:node>\
             <updraft:epoch>{}</updraft:epoch>\
             <updraft:token>{}</updraft:token>\
             <updraft:vcpus>{}</updraft:vcpus>\
             <updraft:memory_mib>{}</updraft:memory_mib>\
             <updraft:disk_gib>{}</updraft:disk_gib>",
            escape(self.request.as_str()),
            escape(self.node.as_str()),
            self.epoch.0,
            self.token,
            self.resources.vcpus,
            self.resources.memory_mib,
            self.resources.disk_gib,
        );
        for (name, amount) in &self.resources.extended {
            x.push_str(&format!(
                "<updraft:extended name=\"{}\">{amount}</updraft:extended>",
                escape(name.as_str())
            ));
        }
        for (k, v) in &self.metadata {
            x.push_str(&format!(
                "<updraft:meta key=\"{}\">{}</updraft:meta>",
                escape(clean(k).as_str()),
                escape(clean(v).as_str())
            ));
        }
        x.push_str("</updraft:instance>");
        x
    }

    /// Reads the element back (as libvirt returns it: any prefix, same namespace). The fields
    /// it needs are ids and numbers; user metadata is not read back.
    pub fn parse(xml: &str) -> Result<Instance, String> {
        let mut reader = quick_xml::Reader::from_str(xml);
        reader.config_mut().trim_text(true);
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut extended: Vec<(String, String)> = Vec::new();
        let mut current: Option<(String, Option<String>)> = None;
        loop {
            match reader.read_event() {
                Ok(Event::Start(e)) => {
                    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                    let attr = e
                        .try_get_attribute("name")
                        .ok()
                        .flatten()
                        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()));
                    current = Some((name, attr));
                }
                Ok(Event::Text(t)) => {
                    if let Some((name, attr)) = &current {
                        let text = t.decode().map_err(|e| e.to_string())?.into_owned();
                        if name == "extended" {
                            if let Some(a) = attr {
                                extended.push((a.clone(), text));
                            }
                        } else {
                            fields.insert(name.clone(), text);
                        }
                    }
                }
                Ok(Event::End(_)) => current = None,
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("metadata is not XML: {e}")),
            }
        }
        let get = |k: &str| {
            fields
                .get(k)
                .map(String::as_str)
                .ok_or_else(|| format!("metadata lacks <{k}>"))
        };
        let num = |k: &str| -> Result<u64, String> {
            get(k)?
                .parse::<u64>()
                .map_err(|e| format!("metadata <{k}>: {e}"))
        };
        let request = RequestId::new(get("request")?).map_err(|e| format!("request: {e}"))?;
        let node = NodeId::new(get("node")?).map_err(|e| format!("node: {e}"))?;
        let token = u64::from_str_radix(get("token")?, 16)
            .map(ClaimToken)
            .map_err(|e| format!("metadata <token>: {e}"))?;
        let vcpus = u32::try_from(num("vcpus")?).map_err(|e| format!("vcpus: {e}"))?;
        let mut resources = Resources::new(vcpus, num("memory_mib")?, num("disk_gib")?);
        for (name, amount) in extended {
            let n = ResourceName::new(name.as_str()).map_err(|e| format!("extended: {e}"))?;
            let a = amount
                .parse::<u64>()
                .map_err(|e| format!("extended {name}: {e}"))?;
            resources.extended.insert(n, a);
        }
        Ok(Instance {
            request,
            node,
            epoch: Epoch(num("epoch")?),
            token,
            resources,
            metadata: BTreeMap::new(),
        })
    }
}

/// Control characters are not XML; user metadata is validated, this is a second guard.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Initrd.
    pub initrd: Option<&'a Path>,
    /// Command line.
    pub cmdline: &'a str,
}

/// Everything a domain description needs.
#[derive(Debug, Clone)]
pub struct DomainSpec<'a> {
    /// Domain type.
    pub kind: DomainType,
    /// Who it is.
    pub instance: &'a Instance,
    /// Its disk (a volume's path), if any.
    pub disk: Option<&'a str>,
    /// Its disk's format (`qcow2`).
    pub disk_format: &'a str,
    /// Network.
    pub network: &'a Network,
    /// Kernel boot instead of disk boot.
    pub kernel: Option<KernelBoot<'a>>,
    /// Serial console log file.
    pub console_log: &'a Path,
    /// Machine type.
    pub machine: Option<&'a str>,
}

/// The domain description of a request.
pub fn domain_xml(d: &DomainSpec<'_>) -> String {
    let inst = d.instance;
    let machine = d
        .machine
        .map(|m| format!(" machine=\"{}\"", escape(m)))
        .unwrap_or_default();
    let os_boot = match &d.kernel {
        Some(k) => {
            let initrd = k
                .initrd
                .map(|i| format!("<initrd>{}</initrd>", escape(i.to_string_lossy())))
                .unwrap_or_default();
            format!(
                "<kernel>{}</kernel>{initrd}<cmdline>{}</cmdline>",
                escape(k.kernel.to_string_lossy()),
                escape(k.cmdline)
            )
        }
        None => "<boot dev=\"hd\"/>".to_string(),
    };
    let cpu = if d.kind == DomainType::Kvm {
        "<cpu mode=\"host-passthrough\"/>"
    } else {
        ""
    };
    let disk = d
        .disk
        .map(|path| {
            format!(
                "<disk type=\"file\" device=\"disk\"><driver name=\"qemu\" type=\"{}\"/>\
                 <source file=\"{}\"/><target dev=\"vda\" bus=\"virtio\"/></disk>",
                escape(d.disk_format),
                escape(path)
            )
        })
        .unwrap_or_default();
    let mac = mac_address(&inst.request, inst.token);
    let nic = match d.network {
        Network::None => String::new(),
        Network::User => format!(
            "<interface type=\"user\"><mac address=\"{mac}\"/><model type=\"virtio\"/></interface>"
        ),
        Network::Named(n) => format!(
            "<interface type=\"network\"><mac address=\"{mac}\"/><source network=\"{}\"/>\
             <model type=\"virtio\"/></interface>",
            escape(n.as_str())
        ),
        Network::Bridge(b) => format!(
            "<interface type=\"bridge\"><mac address=\"{mac}\"/><source bridge=\"{}\"/>\
             <model type=\"virtio\"/></interface>",
            escape(b.as_str())
        ),
    };
    format!(
        "<domain type=\"{kind}\">\
         <name>{name}</name>\
         <uuid>{uuid}</uuid>\
         <title>updraft request {id}</title>\
         <metadata>{meta}</metadata>\
         <memory unit=\"MiB\">{mem}</memory>\
         <vcpu placement=\"static\">{vcpus}</vcpu>\
         <os><type arch=\"x86_64\"{machine}>hvm</type>{os_boot}</os>\
         <features><acpi/><apic/></features>{cpu}\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices>{disk}{nic}\
         <serial type=\"pty\"><log file=\"{log}\" append=\"off\"/><target port=\"0\"/></serial>\
         <console type=\"pty\"><target type=\"serial\" port=\"0\"/></console>\
         </devices></domain>",
        kind = d.kind.as_str(),
        name = escape(domain_name(&inst.request)),
        uuid = domain_uuid(&inst.request),
        id = escape(inst.request.as_str()),
        meta = inst.to_xml(),
        mem = inst.resources.memory_mib,
        vcpus = inst.resources.vcpus,
        log = escape(d.console_log.to_string_lossy()),
    )
}

/// A directory storage pool at `path`.
pub fn pool_xml(name: &str, path: &Path) -> String {
    format!(
        "<pool type=\"dir\"><name>{}</name><target><path>{}</path>\
         <permissions><mode>0755</mode></permissions></target></pool>",
        escape(name),
        escape(path.to_string_lossy())
    )
}

/// A qcow2 volume of `bytes`, optionally an overlay on `backing` (path, format).
pub fn volume_xml(name: &str, bytes: u64, backing: Option<(&str, &str)>) -> String {
    let backing = backing
        .map(|(path, format)| {
            format!(
                "<backingStore><path>{}</path><format type=\"{}\"/></backingStore>",
                escape(path),
                escape(format)
            )
        })
        .unwrap_or_default();
    format!(
        "<volume><name>{}</name><capacity unit=\"bytes\">{bytes}</capacity>\
         <target><format type=\"qcow2\"/><permissions><mode>0600</mode></permissions></target>\
         {backing}</volume>",
        escape(name)
    )
}

/// The `<target><format type=...>` of a volume description (`raw` when it names none).
pub fn volume_format(vol_xml: &str) -> String {
    let mut reader = quick_xml::Reader::from_str(vol_xml);
    let mut depth_target = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if e.local_name().as_ref() == b"target" => depth_target = true,
            Ok(Event::End(e)) if e.local_name().as_ref() == b"target" => depth_target = false,
            Ok(Event::Empty(e)) | Ok(Event::Start(e))
                if depth_target && e.local_name().as_ref() == b"format" =>
            {
                if let Ok(Some(a)) = e.try_get_attribute("type")
                    && let Ok(v) = a.unescape_value()
                {
                    return v.into_owned();
                }
            }
            Ok(Event::Eof) | Err(_) => return "raw".into(),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            request: RequestId::new("web-1").unwrap(),
            node: NodeId::new("node-a").unwrap(),
            epoch: Epoch(7),
            token: ClaimToken(0xdead_beef),
            resources: Resources::new(2, 4096, 20)
                .with_extended(ResourceName::new("gpu").unwrap(), 1),
            metadata: [("owner".to_string(), "a<b>&\"c\"".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn metadata_round_trips_under_any_prefix() {
        let i = instance();
        let x = i.to_xml();
        assert!(x.contains("a&lt;b&gt;&amp;&quot;c&quot;"), "{x}");
        let back = Instance::parse(&x).unwrap();
        assert_eq!(back.request, i.request);
        assert_eq!(back.token, i.token);
        assert_eq!(back.epoch, i.epoch);
        assert_eq!(back.resources, i.resources);
        // libvirt may hand it back under another prefix
        let other = x
            .replace("updraft:", "u:")
            .replace("xmlns:updraft", "xmlns:u");
        assert_eq!(Instance::parse(&other).unwrap().request, i.request);
        assert!(
            Instance::parse("<x/>")
                .unwrap_err()
                .contains("lacks <request>")
        );
        let bad_token = x.replace(&format!(">{}<", i.token), ">not-hex<");
        assert!(Instance::parse(&bad_token).unwrap_err().contains("token"));
    }

    #[test]
    fn identities_derive_from_the_request() {
        let a = RequestId::new("web-1").unwrap();
        let b = RequestId::new("web-2").unwrap();
        assert_eq!(domain_uuid(&a), domain_uuid(&a));
        assert_ne!(domain_uuid(&a), domain_uuid(&b));
        assert_eq!(domain_name(&a), "updraft-web-1");
        // a duplicate under another claim gets another MAC
        assert_ne!(
            mac_address(&a, ClaimToken(1)),
            mac_address(&a, ClaimToken(2))
        );
        assert!(mac_address(&a, ClaimToken(1)).starts_with("52:54:00:"));
    }

    #[test]
    fn domain_description_has_what_it_needs() {
        let i = instance();
        let net = Network::Named("default".into());
        let x = domain_xml(&DomainSpec {
            kind: DomainType::Qemu,
            instance: &i,
            disk: Some("/var/lib/updraft/instances/updraft-web-1.qcow2"),
            disk_format: "qcow2",
            network: &net,
            kernel: Some(KernelBoot {
                kernel: Path::new("/boot/vmlinux"),
                initrd: Some(Path::new("/boot/initrd.gz")),
                cmdline: "console=ttyS0",
            }),
            console_log: Path::new("/var/log/updraft/console/updraft-web-1.log"),
            machine: None,
        });
        for want in [
            "<domain type=\"qemu\">",
            "<name>updraft-web-1</name>",
            "<memory unit=\"MiB\">4096</memory>",
            "<vcpu placement=\"static\">2</vcpu>",
            "<kernel>/boot/vmlinux</kernel>",
            "<source network=\"default\"/>",
            "updraft-web-1.log",
            METADATA_NS,
        ] {
            assert!(x.contains(want), "missing {want} in {x}");
        }
        assert!(
            !x.contains("host-passthrough"),
            "TCG guests get no host CPU"
        );
        // well-formed
        let mut r = quick_xml::Reader::from_str(&x);
        loop {
            match r.read_event() {
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{e}: {x}"),
            }
        }
    }

    #[test]
    fn names_and_networks_are_checked() {
        assert!(is_volume_name("base.qcow2"));
        assert!(!is_volume_name("../etc/passwd"));
        assert!(!is_volume_name("a/b"));
        assert!(!is_volume_name(""));
        assert_eq!(Network::parse("none"), Some(Network::None));
        assert_eq!(
            Network::parse("bridge:br0"),
            Some(Network::Bridge("br0".into()))
        );
        assert_eq!(Network::parse("network:"), None);
        assert_eq!(Network::parse("wifi:x"), None);
    }

    #[test]
    fn volume_formats_are_read() {
        let x =
            "<volume><name>b</name><target><path>/p</path><format type='qcow2'/></target></volume>";
        assert_eq!(volume_format(x), "qcow2");
        assert_eq!(volume_format("<volume><target/></volume>"), "raw");
        let v = volume_xml("updraft-x.qcow2", 1 << 30, Some(("/p/base", "raw")));
        assert!(v.contains("<backingStore><path>/p/base</path><format type=\"raw\"/>"));
    }
}
