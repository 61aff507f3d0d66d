//! The node's own state machine: what it advertises and whether it takes work, from operator
//! settings (cordon, drain), health (hypervisor, build failures), fencing, connection and
//! shutdown. Pure: the shell feeds it facts and reads the answer.

use placement::wire::NodeState;

/// Facts that decide the node's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mode {
    /// An operator cordoned the node.
    pub cordoned: bool,
    /// An operator is draining the node.
    pub draining: bool,
    /// The lease was lost; set while the node re-confirms its claims.
    pub fenced: Option<String>,
    /// Hypervisor down or too many failed builds in a row.
    pub unhealthy: Option<String>,
    /// Shutting down.
    pub stopping: bool,
    /// Connected to NATS.
    pub connected: bool,
    /// Adopted VMs exceed capacity.
    pub overcommitted: bool,
}

impl Mode {
    /// The advertised state; the most severe fact wins.
    pub fn state(&self) -> NodeState {
        if self.stopping {
            NodeState::Stopping
        } else if self.fenced.is_some() {
            NodeState::Fenced
        } else if self.unhealthy.is_some() {
            NodeState::Unhealthy
        } else if self.draining {
            NodeState::Draining
        } else if self.cordoned || self.overcommitted {
            NodeState::Cordoned
        } else {
            NodeState::Active
        }
    }

    /// Why the node is not active, for the advert.
    pub fn reason(&self) -> Option<String> {
        match self.state() {
            NodeState::Fenced => self.fenced.clone(),
            NodeState::Unhealthy => self.unhealthy.clone(),
            NodeState::Cordoned if self.overcommitted && !self.cordoned => {
                Some("adopted VMs exceed capacity (self-cordoned)".into())
            }
            _ => None,
        }
    }

    /// True when the node may pull and claim.
    pub fn takes_work(&self) -> bool {
        self.connected && self.state() == NodeState::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_order() {
        let mut m = Mode {
            connected: true,
            ..Default::default()
        };
        assert!(m.takes_work());
        m.cordoned = true;
        assert_eq!(m.state(), NodeState::Cordoned);
        m.draining = true;
        assert_eq!(m.state(), NodeState::Draining);
        m.unhealthy = Some("libvirt down".into());
        assert_eq!(m.state(), NodeState::Unhealthy);
        assert_eq!(m.reason().as_deref(), Some("libvirt down"));
        m.fenced = Some("lease lost".into());
        assert_eq!(m.state(), NodeState::Fenced);
        m.stopping = true;
        assert_eq!(m.state(), NodeState::Stopping);
        assert!(!m.takes_work());
    }

    #[test]
    fn disconnected_or_overcommitted_takes_nothing() {
        let m = Mode::default();
        assert_eq!(m.state(), NodeState::Active);
        assert!(!m.takes_work(), "no claims while disconnected");
        let m = Mode {
            connected: true,
            overcommitted: true,
            ..Default::default()
        };
        assert_eq!(m.state(), NodeState::Cordoned);
        assert!(m.reason().unwrap().contains("exceed capacity"));
    }
}
