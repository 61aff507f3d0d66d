//! NATS users and subject permissions per role, as the `nats-server` config text that
//! `deploy/nats/accounts.conf` holds. Generated here, next to the subjects the roles use, so
//! the permissions and the code cannot drift apart (a test checks the file against this).
//!
//! What subjects can enforce, and so do:
//! * an agent pulls from the shard consumers and acks what it got, but cannot publish hints
//!   (new requests) or call the API;
//! * it writes only its own advert (its lease) and its own command keys, and reads only its
//!   own commands (watch filters and direct gets pinned to `<node>.>`);
//! * its reply inboxes carry its node id (`nats.inbox_prefix`), so no other client can
//!   subscribe to its answers.
//!
//! What subjects cannot enforce: any claimer must be able to write request records, so an
//! agent may write any key of `UPDRAFT_REQUESTS`. Claims are signed with the node's key for
//! that (ARCHITECTURE.md, trust model).

use placement::NodeId;
use placement::subjects::{
    COMMANDS_BUCKET, CONFIG_BUCKET, CONFIG_CHANGES, NODES_BUCKET, REQUESTS_BUCKET, TIMERS_STREAM,
    kv_stream,
};

/// The account every updraft user belongs to.
pub const ACCOUNT: &str = "UPDRAFT";

/// The inbox prefix an agent uses (`nats.inbox_prefix`), unique per node.
pub fn agent_inbox_prefix(node: &NodeId) -> String {
    format!("_INBOX_{node}")
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The permission block of the agent of `node`.
pub fn agent_permissions(node: &NodeId) -> String {
    let kv = kv_stream;
    let publish = vec![
        "$JS.API.INFO".to_string(),
        "$JS.API.STREAM.INFO.>".to_string(),
        "$JS.API.CONSUMER.INFO.>".to_string(),
        // pull hints from the shard consumers and answer them (subjects have no prefix
        // wildcards: every pull consumer but the dispatchers' timers, which is denied below)
        "$JS.API.CONSUMER.MSG.NEXT.*.*".to_string(),
        "$JS.ACK.*.>".to_string(),
        "$JS.FC.>".to_string(),
        // request records: any claimer writes them (claims are signed)
        format!("$KV.{REQUESTS_BUCKET}.*"),
        format!("$JS.API.DIRECT.GET.{}.>", kv(REQUESTS_BUCKET)),
        format!("$JS.API.STREAM.MSG.GET.{}", kv(REQUESTS_BUCKET)),
        // its own lease only
        format!("$KV.{NODES_BUCKET}.{node}"),
        format!(
            "$JS.API.DIRECT.GET.{}.$KV.{NODES_BUCKET}.{node}",
            kv(NODES_BUCKET)
        ),
        format!("$JS.API.STREAM.MSG.GET.{}", kv(NODES_BUCKET)),
        // its own commands only
        format!("$KV.{COMMANDS_BUCKET}.{node}.>"),
        format!(
            "$JS.API.DIRECT.GET.{}.$KV.{COMMANDS_BUCKET}.{node}.>",
            kv(COMMANDS_BUCKET)
        ),
        format!(
            "$JS.API.CONSUMER.CREATE.{}.*.$KV.{COMMANDS_BUCKET}.{node}.>",
            kv(COMMANDS_BUCKET)
        ),
        // cluster config, backlog flags and demand: read (a key, or its keys in one batch
        // read, and their changes as the bucket republishes them); affinity pins: write
        format!("$JS.API.DIRECT.GET.{}", kv(CONFIG_BUCKET)),
        format!("$JS.API.DIRECT.GET.{}.>", kv(CONFIG_BUCKET)),
        format!("$JS.API.STREAM.MSG.GET.{}", kv(CONFIG_BUCKET)),
        format!("$KV.{CONFIG_BUCKET}.group.*"),
        "$JS.API.CONSUMER.DELETE.KV_UPDRAFT_*.>".to_string(),
    ];
    let deny = vec![
        format!("$JS.API.CONSUMER.MSG.NEXT.{TIMERS_STREAM}.>"),
        format!("$JS.ACK.{TIMERS_STREAM}.>"),
    ];
    let subscribe = vec![
        format!("{}.>", agent_inbox_prefix(node)),
        format!("{CONFIG_CHANGES}.>"),
    ];
    format!(
        "{{ publish: {{ allow: {}, deny: {} }}, subscribe: {{ allow: {} }} }}",
        list(&publish),
        list(&deny),
        list(&subscribe)
    )
}

/// The `users` entry of the agent of `node`, authenticating with `password` (a literal, or
/// a `$VARIABLE` of the config).
pub fn agent_user(node: &NodeId, password: &str) -> String {
    format!(
        "{{ user: \"agent-{node}\", password: {password}, permissions: {} }}",
        agent_permissions(node)
    )
}

/// Permissions of the dispatchers: the whole account (they create the topology, publish
/// hints, own time and reaping).
pub fn dispatcher_permissions() -> String {
    "{ publish: \">\", subscribe: \">\" }".to_string()
}

/// Permissions of an operator's client (the CLI through NATS, `nats` tooling): the API and
/// read-only JetStream information.
pub fn operator_permissions() -> String {
    let publish = [
        "updraft.v1.api.>".to_string(),
        "$JS.API.INFO".to_string(),
        "$JS.API.STREAM.INFO.>".to_string(),
        "$JS.API.STREAM.LIST".to_string(),
        "$JS.API.STREAM.NAMES".to_string(),
        "$JS.API.CONSUMER.INFO.>".to_string(),
        "$JS.API.CONSUMER.LIST.>".to_string(),
    ];
    format!(
        "{{ publish: {{ allow: {} }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }}",
        list(&publish)
    )
}

/// The whole `accounts` section for the given agents (each with the password given).
pub fn accounts_conf(agents: &[(NodeId, String)]) -> String {
    let mut users = vec![
        format!(
            "      {{ user: \"dispatcher\", password: $UPDRAFT_DISPATCHER_PASSWORD, permissions: {} }}",
            dispatcher_permissions()
        ),
        format!(
            "      {{ user: \"operator\", password: $UPDRAFT_OPERATOR_PASSWORD, permissions: {} }}",
            operator_permissions()
        ),
    ];
    for (node, pw) in agents {
        users.push(format!("      {}", agent_user(node, pw)));
    }
    format!(
        "accounts {{\n  {ACCOUNT} {{\n    jetstream: enabled\n    users: [\n{}\n    ]\n  }}\n  SYS {{\n    users: [ {{ user: \"sys\", password: $UPDRAFT_SYS_PASSWORD }} ]\n  }}\n}}\nsystem_account: SYS\n",
        users.join("\n")
    )
}

/// The head of `deploy/nats/accounts.conf`.
const ACCOUNTS_HEADER: &str = "\
# updraft's NATS accounts and per-role users (generated: `updraft nats-accounts --agent <node> ...`;
# do not edit by hand). Passwords come from the environment of nats-server:
#   UPDRAFT_DISPATCHER_PASSWORD, UPDRAFT_OPERATOR_PASSWORD, UPDRAFT_SYS_PASSWORD, and one
#   variable per agent as listed below. Agents set `nats.user = \"agent-<node>\"`,
#   `nats.password` and `nats.inbox_prefix = \"_INBOX_<node>\"`.
# A large fleet is better served by NATS JWT accounts with a scoped signing key whose
# permissions use the {{name()}} template the same way (one user JWT per node, no server config
# change per node).
";

/// The whole `deploy/nats/accounts.conf` for the given agents.
pub fn accounts_file(agents: &[(NodeId, String)]) -> String {
    format!("{ACCOUNTS_HEADER}\n{}", accounts_conf(agents))
}

/// The example agents of `deploy/nats/accounts.conf`.
pub fn example_agents() -> Vec<(NodeId, String)> {
    ["compute-0001", "compute-0002"]
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            NodeId::new(*n)
                .ok()
                .map(|id| (id, format!("$UPDRAFT_AGENT_{}_PASSWORD", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_pinned_to_their_own_keys() {
        let n = NodeId::new("compute-0001").unwrap_or_else(|e| panic!("{e}"));
        let p = agent_permissions(&n);
        assert!(p.contains("\"$KV.UPDRAFT_NODES.compute-0001\""));
        assert!(p.contains("\"$KV.UPDRAFT_CMDS.compute-0001.>\""));
        assert!(p.contains("\"_INBOX_compute-0001.>\""));
        assert!(!p.contains("updraft.v1.req"), "agents never publish hints");
        assert!(!p.contains("\"$KV.UPDRAFT_NODES.*\""));
        // its config keys come on the bucket's republished subjects, without a consumer
        assert!(p.contains("\"updraft.v1.config.>\""));
        assert!(!p.contains("CONSUMER.CREATE.KV_UPDRAFT_CONFIG"));
        let conf = accounts_conf(&[(n, "$PW".into())]);
        assert!(conf.contains("system_account: SYS"));
        assert!(conf.contains("agent-compute-0001"));
    }

    #[test]
    fn the_deploy_file_is_what_the_generator_makes() {
        let file = include_str!("../../deploy/nats/accounts.conf");
        assert_eq!(
            file,
            accounts_file(&example_agents()),
            "regenerate with `updraft nats-accounts --example > deploy/nats/accounts.conf`"
        );
    }
}
