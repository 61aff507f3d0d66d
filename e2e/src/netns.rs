//! Network namespaces made by a test, to cut one process off the network and heal it.
//!
//! Each [`Netns`] is a namespace joined to the host by a veth pair on a private /30
//! (`10.231.<i>.1` on the host side, `10.231.<i>.2` inside). The NATS server keeps listening
//! on loopback only; a [`Forwarder`] on the host side of the pair relays the namespace's
//! connections to it. [`Netns::cut`] takes the host end of the link down (packets vanish, as
//! in a real partition: no reset, no error, TCP just stalls) and [`Netns::heal`] brings it
//! back. Dropping a `Netns` deletes the namespace and its link.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};

/// One namespace and its link to the host.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
    host_if: String,
    /// The host side's address: what a process inside connects to.
    pub host_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates namespace number `index` (0–255) for this process; a leftover of the same name
    /// from a crashed run is removed first.
    pub fn create(index: u8) -> anyhow::Result<Netns> {
        let name = format!("updraft-t{}-{index}", std::process::id() % 100_000);
        let host_if = format!("udh{}x{index}", std::process::id() % 10_000);
        let ns_if = format!("udn{}x{index}", std::process::id() % 10_000);
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            host_if,
            host_addr: Ipv4Addr::new(10, 231, index, 1),
        };
        let host_cidr = format!("10.231.{index}.1/30");
        let ns_cidr = format!("10.231.{index}.2/30");
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.exec_ip(&["addr", "add", &ns_cidr, "dev", &ns_if])?;
        ns.exec_ip(&["link", "set", &ns_if, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec_ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// True when this machine lets the test make namespaces (root, `ip` installed).
    pub fn available() -> bool {
        match Netns::create(255) {
            Ok(ns) => {
                drop(ns);
                true
            }
            Err(_) => false,
        }
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }

    /// Cuts the link: nothing goes in or out until [`Netns::heal`].
    pub fn cut(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    /// Brings the link back.
    pub fn heal(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // deleting the namespace deletes its end of the pair, and with it the host end
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Relays TCP connections accepted on the host side of a namespace's link to a loopback
/// address (the NATS server), until dropped.
#[derive(Debug)]
pub struct Forwarder {
    /// Where the namespace connects.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listens on `on` (port 0 picks one) and relays each connection to `to`.
    pub async fn start(on: Ipv4Addr, to: SocketAddr) -> anyhow::Result<Forwarder> {
        let listener = TcpListener::bind((on, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut inside, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut server).await;
                    }
                });
            }
        });
        Ok(Forwarder { addr, task })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
