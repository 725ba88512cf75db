//! `sandbox-agent`: the host's helper inside every sandbox container,
//! bind-mounted read-only at `/.sandbox/agent`
//! ([`sandbox_agent::protocol::AGENT_MOUNT`]; statically linked: any image
//! works).
//!
//! ```text
//! sandbox-agent init [--user UID:GID] [--egress-port P]  init.rs
//! sandbox-agent serve [--user UID:GID] [--egress-port P] serve.rs, relay.rs
//! sandbox-agent respawn                                  respawn.rs
//! sandbox-agent reap [--timeout-ms N] [--user UID:GID --group GID] [--tty]
//!                    [--report-fd FD] -- PROGRAM [ARGS...]   reap.rs
//! sandbox-agent kill MARKER                              kill.rs
//! sandbox-agent connect PORT                             connect.rs
//! ```
//!
//! `init` is the container's main process (pid 1 and root, with `--user`;
//! see `identity.rs` for who runs what): it keeps `serve`
//! running, which takes the host's requests on the container's attach
//! stream and the plane (`sandbox_agent::protocol`) and runs each exec as
//! the sandbox user, supervising it itself (`serve/supervise.rs`).
//! `respawn` kills a `serve` that stopped answering, for `init` to start
//! anew. `reap` runs one call as its own subreaper and ends its whole
//! process tree at the deadline (the host's `docker exec` fallback, and
//! background processes); `kill` ends a call the host gave up on.
//! The `/proc` walk they share is `procs.rs`.
//!
//! The command line is an interface too: a container keeps the agent it was
//! created with across host upgrades, and a host runs `reap`, `kill` and
//! `respawn` in it through `docker exec` (its fallback when the agent's
//! wire is of another version). So these verbs and their arguments only
//! ever grow.
//!
//! Untrusted surroundings: with `--user` the workload runs as another user
//! with no capability and cannot reach the agent; without it (containers
//! of older hosts, the `docker exec` fallback) it runs as the same user and
//! may kill the agent. Either way the host keeps its own deadline and kill
//! as a fallback, and takes nothing from the agent but the call's output
//! and exit status.

use sandbox_agent::protocol::EXIT_AGENT_FAILED;

mod connect;
mod identity;
mod init;
mod kill;
mod procs;
mod reap;
mod relay;
mod respawn;
mod seccomp;
mod serve;

/// Exit status when the agent itself cannot run the call.
const AGENT_FAILED: i32 = EXIT_AGENT_FAILED as i32;

const USAGE: &str = "usage: sandbox-agent init [--user UID:GID] [--egress-port PORT] \
                     | serve [--user UID:GID] [--egress-port PORT] \
                     | respawn | kill MARKER | connect PORT \
                     | reap [--timeout-ms N] [--user UID:GID --group GID] [--tty] -- PROGRAM [ARGS...]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verb = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or_default();
    std::process::exit(match (verb, rest.is_empty()) {
        (Some("init"), _) => init::init(rest),
        (Some("serve"), _) => serve::serve(rest),
        (Some("respawn"), true) => respawn::respawn(),
        (Some("kill"), _) => kill::main(rest),
        (Some("connect"), _) => connect::main(rest),
        (Some("reap"), _) => reap::main(rest),
        _ => {
            eprintln!("{USAGE}");
            AGENT_FAILED
        }
    });
}
