//! What the host has: discovered (libvirt's node info, else sysinfo: logical CPUs, memory; the
//! file system of the instances or state directory for disk), then overridden by config.

use std::path::Path;

use placement::Resources;
use placement::ids::ResourceName;

use crate::config::{CapacityConfig, Config, DriverKind};
use crate::driver::Driver;

/// A source of host totals.
pub trait CapacitySource: Send + Sync {
    /// The host's totals as discovered.
    fn discover(&self) -> Resources;
}

/// Discovery through sysinfo.
#[derive(Debug, Clone)]
pub struct Sysinfo {
    /// A directory on the file system VM disks live on.
    pub disk_dir: std::path::PathBuf,
}

impl CapacitySource for Sysinfo {
    fn discover(&self) -> Resources {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let vcpus = u32::try_from(cpus).unwrap_or(u32::MAX);
        let memory_mib = sys.total_memory() / (1024 * 1024);
        Resources::new(vcpus, memory_mib, disk_gib_of(&self.disk_dir))
    }
}

/// Size of the file system holding `dir`, in GiB (the longest mount point that prefixes it).
pub fn disk_gib_of(dir: &Path) -> u64 {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.total_space() / (1024 * 1024 * 1024))
        .unwrap_or(0)
}

/// Discovery through the hypervisor (CPUs and memory as libvirt reports them) plus the file
/// system of `disk_dir`.
#[derive(Debug, Clone)]
pub struct Hypervisor {
    /// Logical CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// A directory on the file system VM disks live on.
    pub disk_dir: std::path::PathBuf,
}

impl CapacitySource for Hypervisor {
    fn discover(&self) -> Resources {
        Resources::new(self.vcpus, self.memory_mib, disk_gib_of(&self.disk_dir))
    }
}

/// The capacity source for an agent: the hypervisor's own figures when its driver has any
/// (libvirt's node info), else sysinfo; disk from the file system VM disks go to.
pub async fn discover_for(cfg: &Config, driver: &dyn Driver) -> Box<dyn CapacitySource> {
    let disk_dir = match cfg.driver.kind {
        DriverKind::Libvirt => cfg.driver.libvirt.instances_dir.clone(),
        DriverKind::Memory => cfg.state_dir.clone(),
    };
    match driver.host().await {
        Ok(Some((vcpus, memory_mib))) => Box::new(Hypervisor {
            vcpus,
            memory_mib,
            disk_dir,
        }),
        Ok(None) => Box::new(Sysinfo { disk_dir }),
        Err(e) => {
            tracing::warn!(error = %e, "the hypervisor cannot say what the host has; using sysinfo");
            Box::new(Sysinfo { disk_dir })
        }
    }
}

/// Fixed totals (tests, and hosts whose capacity is all configured).
#[derive(Debug, Clone)]
pub struct Fixed(pub Resources);

impl CapacitySource for Fixed {
    fn discover(&self) -> Resources {
        self.0.clone()
    }
}

/// Discovered totals with the config's overrides applied.
pub fn totals(cfg: &CapacityConfig, source: &dyn CapacitySource) -> Resources {
    let needs_discovery = cfg.vcpus.is_none() || cfg.memory_mib.is_none() || cfg.disk_gib.is_none();
    let found = if needs_discovery {
        source.discover()
    } else {
        Resources::default()
    };
    let mut r = Resources::new(
        cfg.vcpus.unwrap_or(found.vcpus),
        cfg.memory_mib.unwrap_or(found.memory_mib),
        cfg.disk_gib.unwrap_or(found.disk_gib),
    );
    for (name, amount) in &cfg.extended {
        if let Ok(n) = ResourceName::new(name.as_str()) {
            r.extended.insert(n, *amount);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_discovery() {
        let src = Fixed(Resources::new(8, 16384, 100));
        let cfg = CapacityConfig {
            vcpus: Some(4),
            ..Default::default()
        };
        assert_eq!(totals(&cfg, &src), Resources::new(4, 16384, 100));
        let mut cfg = CapacityConfig {
            vcpus: Some(1),
            memory_mib: Some(2),
            disk_gib: Some(3),
            ..Default::default()
        };
        cfg.extended.insert("gpu".into(), 2);
        let r = totals(&cfg, &src);
        assert_eq!(r.vcpus, 1);
        assert_eq!(r.extended_amount(&ResourceName::new("gpu").unwrap()), 2);
    }

    #[test]
    fn sysinfo_finds_something() {
        let r = Sysinfo {
            disk_dir: std::env::temp_dir(),
        }
        .discover();
        assert!(r.vcpus >= 1);
        assert!(r.memory_mib > 0);
        assert!(r.disk_gib > 0);
    }
}
