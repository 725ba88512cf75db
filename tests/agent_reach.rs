//! The agent out of the workload's reach (issue 20), tried as an attacker
//! would, against the real engine: every test runs a workload of its own in
//! a sandbox and measures what it achieved against its own sandbox's agent.
//!
//! - the agent's processes (init as pid 1, serve, the call's own parent:
//!   serve, which supervises each call itself, or a `reap`) are
//!   root, and the workload gets EPERM/EACCES on their memory, their fds,
//!   their environment, their signals and ptrace;
//! - the workload holds nothing: no capability, `no-new-privileges`, the
//!   sandbox user, and a call group of its own that it cannot leave;
//! - a timeout or a cancel kills everything the call started, whatever it
//!   did to escape (its reap killed, setsid, nohup, double forks, a fork
//!   loop at the pids limit, a process that hops from pid to pid);
//! - forged frames sprayed at every fd of the agent never land, and a
//!   sibling thread's commands each run once and answer their own output;
//! - a container made by an older host is replaced by a new one (the agent
//!   as root) when next idle.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_host::config::UserIds;
use sandbox_host::exec::{EndReason, ExecOptions, ExecResponse};
use sandbox_host::{Backend, Config, PolicySource, Sandbox};
use support::{docker, Harness};

// ---------------------------------------------------------------- helpers

/// The uid-0 processes among `found`, asserting that init and the call's
/// own parent (serve, which supervises the call itself, or a `reap` on the
/// engine's path) are among them (the agent runs as root, out of the
/// workload's uid); `context` is shown when they are not.
fn agent_roots<'a>(found: &'a [Target], context: &str) -> Vec<&'a Target> {
    let roots: Vec<&Target> = found.iter().filter(|t| t.root).collect();
    let roles: BTreeSet<&str> = roots.iter().map(|t| t.role.as_str()).collect();
    assert!(
        roots.len() >= 2 && ["init", "own-parent"].iter().all(|r| roles.contains(r)),
        "the agent does not run as root, out of the workload's uid: {} uid-0 process(es) \
         (roles {roles:?}){context}",
        roots.len(),
    );
    roots
}

fn container_of(h: &Harness, user: &str) -> String {
    h.container_of(user)
}

fn sandbox_user(h: &Harness) -> UserIds {
    h.config().sandbox_user()
}

fn with_timeout(secs: f64) -> ExecOptions {
    ExecOptions {
        timeout: Some(Duration::from_secs_f64(secs)),
        ..Default::default()
    }
}

fn python_image() -> String {
    support::python_image()
}

async fn python_sandbox(h: &Harness) -> Sandbox {
    let config = Config {
        image: python_image(),
        ..h.config()
    };
    h.sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await
}

/// Runs a Python program (fed on stdin) in the sandbox.
async fn python(b: &Backend, program: &str) -> ExecResponse {
    b.execute_with(
        "python3 -",
        ExecOptions {
            stdin: Some(program.as_bytes().to_vec()),
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await
    .expect("the Python workload ran")
}

/// The first execute of a backend: it creates the container, and must run
/// through the agent (the tests attack the agent, not a `docker exec`).
async fn warm(b: &Backend) {
    let r = b.execute("true").await.expect("the first execute");
    assert!(
        r.via_agent,
        "the agent does not serve this container: {}",
        brief(&r)
    );
}

/// An execute's result in one line (no byte dumps).
fn brief(r: &ExecResponse) -> String {
    format!(
        "exit {} timed_out {} reason {:?} via_agent {} output {:?}",
        r.exit_code, r.timed_out, r.reason, r.via_agent, r.output
    )
}

fn brief_result(r: &sandbox_host::Result<ExecResponse>) -> String {
    match r {
        Ok(r) => brief(r),
        Err(e) => format!("error: {e}"),
    }
}

/// The host's view of a container's processes (`docker top`), one
/// `PID ARGS` line each: it costs no pid of the container's own budget.
fn host_view(container: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["top", container, "-o", "pid,args"])
        .output()
        .expect("docker top");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// [`host_view`] sampled `n` times 100 ms apart, merged: a process that
/// hops from pid to pid can fall between the engine's pid list and its `ps`
/// in one sample, never in all of them.
async fn host_views(container: &str, n: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    for i in 0..n {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen.extend(host_view(container));
    }
    seen.into_iter().collect()
}

/// A unique-ish 64-bit number (no RNG crate among the dependencies).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

/// The call group in a `Groups:` line of /proc/PID/status: the one group
/// besides the sandbox gid.
fn call_groups(text: &str, gid: u32) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("Groups:"))
        .flat_map(|g| g.split_whitespace().filter_map(|n| n.parse::<u32>().ok()))
        .filter(|g| *g != gid)
        .collect()
}

/// Busy-agnostic shell prelude: sets `targets` to `PID:ROLE` of every
/// process of the agent, that is every process that is root (any of its
/// uids 0), runs the agent's binary, or is pid 1, and prints one `TARGET`
/// line for each. Roles: `init` (pid 1), `own-parent` (this shell's parent:
/// `serve`, or the call's `reap`),
/// `serve`, `reap` (another call's), `agent-init`, `other`.
const FIND_AGENT: &str = r#"
targets=
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = "$$" ] && continue
  uid=
  while read -r k a b c e; do
    if [ "$k" = Uid: ]; then uid="$a $b $c $e"; break; fi
  done 2>/dev/null < $d/status
  [ -n "$uid" ] || continue
  cmd=$(tr '\0\n' '  ' 2>/dev/null < $d/cmdline | cut -c1-160)
  root=no
  case " $uid " in *" 0 "*) root=yes;; esac
  agent=no
  case "$cmd" in /.sandbox/agent*) agent=yes;; esac
  if [ $root = yes ] || [ $agent = yes ] || [ "$p" = 1 ]; then
    if [ "$p" = 1 ]; then role=init
    elif [ "$p" = "$PPID" ]; then role=own-parent
    else
      case "$cmd" in
        *" serve"*) role=serve;;
        *" reap"*) role=reap;;
        *" init"*) role=agent-init;;
        *) role=other;;
      esac
    fi
    echo "TARGET $p $role root=$root uid=$uid cmd=$cmd"
    targets="$targets $p:$role"
  fi
done
"#;

/// One `TARGET` line of [`FIND_AGENT`].
#[derive(Debug, Clone)]
struct Target {
    pid: u32,
    role: String,
    root: bool,
    line: String,
}

fn targets(output: &str) -> Vec<Target> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("TARGET ")?;
            let mut f = rest.split(' ');
            Some(Target {
                pid: f.next()?.parse().ok()?,
                role: f.next()?.to_owned(),
                root: f.next()? == "root=yes",
                line: l.to_owned(),
            })
        })
        .collect()
}

/// One process as a later exec sees it.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    uid: String,
    groups: Vec<u32>,
    cmd: String,
}

/// Every process of the container but the lister itself, with its uid,
/// groups and command line. The script names no marker, so its own
/// subshells never match one.
async fn processes(b: &Backend) -> Result<Vec<Proc>, String> {
    let script = r#"
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  [ "$p" = "$$" ] && continue
  u=; g=
  while read -r k a rest; do
    case "$k" in Uid:) u=$a;; Groups:) g="$a $rest";; esac
  done 2>/dev/null < $d/status
  [ -n "$u" ] || continue
  c=$(tr '\0' ' ' 2>/dev/null < $d/cmdline)
  echo "P|$p|$u|$g|$c"
done
echo listed
"#;
    let r = b
        .execute_with(script, with_timeout(30.0))
        .await
        .map_err(|e| format!("the listing exec failed: {e}"))?;
    if r.exit_code != 0 || !r.stdout.ends_with("listed\n") {
        return Err(format!(
            "the listing exec did not run: exit {} {:?}",
            r.exit_code, r.output
        ));
    }
    Ok(r.stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("P|")?.splitn(4, '|');
            Some(Proc {
                pid: f.next()?.parse().ok()?,
                uid: f.next()?.to_owned(),
                groups: f
                    .next()?
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect(),
                cmd: f.next()?.trim_end().to_owned(),
            })
        })
        .collect())
}

/// Whether `text` holds the number `marker` on its own (not inside a
/// longer number, such as a call group on a reap's command line).
fn holds_number(text: &str, marker: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(marker).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + marker.len()).copied();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

/// The processes left of a call: its marker number in their command line,
/// or its call group among their groups.
fn leftovers(procs: &[Proc], marker: &str, group: Option<u32>) -> Vec<String> {
    procs
        .iter()
        .filter(|p| holds_number(&p.cmd, marker) || group.is_some_and(|g| p.groups.contains(&g)))
        .map(|p| {
            format!(
                "pid {} uid {} groups {:?}: {}",
                p.pid, p.uid, p.groups, p.cmd
            )
        })
        .collect()
}

// ------------------------------------------------- 1. the agent's processes

/// Whether a refusal message is EPERM or EACCES (busybox spells them out).
fn refused_by_privilege(message: &str) -> bool {
    message.contains("Permission denied") || message.contains("Operation not permitted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workload_gets_eperm_or_eacces_on_every_part_of_its_agent() {
    let h = Harness::new("rch-proc");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;

    // Every attempt is logged into the workspace as it is made, so a lost
    // reply (an attacker that killed its agent) still tells what happened.
    let attack = format!(
        r#"log=/workspace/reach.log
: > $log
exec 4>&1 >> $log 2>&1
{FIND_AGENT}
try() {{
  p=$1; role=$2; what=$3; shift 3
  if err=$( {{ eval "$*"; }} 2>&1 >/dev/null ); then
    echo "ATTEMPT $p $role $what ACHIEVED"
    return 0
  else
    echo "ATTEMPT $p $role $what refused: $(echo $err | tr '\n' ' ')"
    return 1
  fi
}}
# Reading and writing first, then signals, the kills last (own parent last).
ordered=
for t in $targets; do case $t in *:own-parent) ;; *) ordered="$ordered $t";; esac; done
for t in $targets; do case $t in *:own-parent) ordered="$ordered $t";; esac; done
for t in $ordered; do
  p=${{t%%:*}}; role=${{t#*:}}
  try $p $role read-mem "exec 3< /proc/$p/mem"
  try $p $role read-maps "cat /proc/$p/maps"
  try $p $role read-environ "cat /proc/$p/environ"
  try $p $role list-fd "ls /proc/$p/fd"
  try $p $role write-fd1 ": > /proc/$p/fd/1"
  try $p $role kill-0 "kill -0 $p"
done
for t in $ordered; do
  p=${{t%%:*}}; role=${{t#*:}}
  try $p $role kill-STOP "kill -STOP $p" && kill -CONT $p
done
for t in $ordered; do
  p=${{t%%:*}}; role=${{t#*:}}
  try $p $role kill-9 "kill -9 $p"
done
echo DONE
cat $log >&4
"#
    );
    let reply = b.execute_with(&attack, with_timeout(60.0)).await;
    let log_path = h.root.path().join("alice").join("reach.log");
    let give_up = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("DONE") || Instant::now() > give_up {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("attack exec: {}\n--- log ---\n{log}", brief_result(&reply));
    let found = targets(&log);
    for t in &found {
        println!("{}", t.line);
    }

    let reply = reply.unwrap_or_else(|e| {
        panic!("the attacker broke its own call's reply (it reached its agent): {e}\n{log}")
    });
    assert!(
        reply.via_agent,
        "the attack did not run through the agent: {}",
        brief(&reply)
    );
    let processes: Vec<&str> = found.iter().map(|t| t.line.as_str()).collect();
    let roots = agent_roots(
        &found,
        &format!(
            "; the agent's processes as the workload sees them:\n{}",
            processes.join("\n")
        ),
    );
    let attempts: Vec<&str> = log.lines().filter(|l| l.starts_with("ATTEMPT ")).collect();
    assert_eq!(
        attempts.len(),
        found.len() * 8,
        "not every attempt was made (the attacker's shell died?):\n{log}"
    );
    let achieved: Vec<&&str> = attempts
        .iter()
        .filter(|l| !l.contains(" refused: ") || !refused_by_privilege(l))
        .collect();
    assert!(
        achieved.is_empty(),
        "the workload reached its agent ({} of {} attempts not refused with EPERM/EACCES):\n{}",
        achieved.len(),
        attempts.len(),
        achieved
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(log.contains("DONE"), "the attacker's shell did not finish");

    // The agent is untouched: the same serve, and it still answers.
    // (The call's own parent, when serve supervises the call itself.)
    let serve = roots
        .iter()
        .find(|t| t.line.contains("cmd=/.sandbox/agent serve"))
        .unwrap()
        .pid;
    let r = b
        .execute(&format!(
            "tr '\\0' ' ' < /proc/{serve}/cmdline; echo; echo alive"
        ))
        .await
        .expect("an exec after the attack");
    assert!(
        r.via_agent && r.exit_code == 0 && r.stdout.ends_with("alive\n"),
        "after the attack the agent no longer answers: {}",
        brief(&r)
    );
    assert!(
        r.stdout.starts_with("/.sandbox/agent serve"),
        "the attacker replaced or restarted serve (pid {serve}): {}",
        brief(&r)
    );
}

const PTRACE_PROGRAM: &str = r#"
import ctypes, errno, os, signal, sys, time

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                                  ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]

PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 16, 17, 0x4206, 0x4207
WALL = 0x40000000
SECRET = b"reach-secret-0123456789"
secret = ctypes.create_string_buffer(SECRET, 32)

def errname(e):
    return errno.errorcode.get(e, str(e))

def ptrace(req, pid):
    ctypes.set_errno(0)
    r = libc.ptrace(req, pid, None, None)
    return r, ctypes.get_errno()

def readv(pid, addr, n):
    local = ctypes.create_string_buffer(n)
    liov = IoVec(ctypes.cast(local, ctypes.c_void_p), n)
    riov = IoVec(addr, n)
    ctypes.set_errno(0)
    got = libc.process_vm_readv(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    return got, ctypes.get_errno(), local.raw[:max(got, 0)]

def release(pid, seized):
    # Leave a process we reached as it was.
    if seized:
        ptrace(PTRACE_INTERRUPT, pid)
    try:
        os.waitpid(pid, WALL)
    except OSError:
        pass
    ptrace(PTRACE_DETACH, pid)
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass

def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(l.rstrip("\n").split(":\t", 1) for l in f if ":\t" in l)

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()

def mapped(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            for l in f:
                start, perms = l.split()[:2]
                if perms.startswith("r"):
                    return int(start.split("-")[0], 16)
    except OSError:
        pass
    return 0x400000

me = os.getpid()
ancestors = []
pid = me
while pid > 1:
    pid = int(status(pid)["PPid"])
    ancestors.append(pid)
# The agent process this call runs under: serve, or a reap.
own_parent = next((p for p in ancestors if cmdline(p).startswith("/.sandbox/agent")), None)

# Control: the same calls on a child of our own work, so refusals below
# come from privilege, not from a seccomp profile or a broken program.
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
r, e = ptrace(PTRACE_SEIZE, child)
print("CONTROL seize", "ok" if r == 0 else errname(e))
got, e, data = readv(child, ctypes.addressof(secret), len(SECRET))
print("CONTROL readv", "ok" if data == SECRET else f"failed {errname(e)} {data!r}")
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)

for name in sorted(os.listdir("/proc"), key=lambda n: int(n) if n.isdigit() else 0):
    if not name.isdigit() or int(name) in (me, child):
        continue
    pid = int(name)
    try:
        uids = status(pid)["Uid"].split()
        cmd = cmdline(pid)
    except (OSError, KeyError):
        continue
    root = "0" in uids
    if not (root or pid == 1 or cmd.startswith("/.sandbox/agent")):
        continue
    if pid == 1:
        role = "init"
    elif pid == own_parent:
        role = "own-parent"
    elif " serve" in cmd:
        role = "serve"
    elif " reap" in cmd:
        role = "reap"
    else:
        role = "other"
    print(f"TARGET {pid} {role} root={'yes' if root else 'no'} uids={','.join(uids)} cmd={cmd}")
    for what, req in (("ptrace-attach", PTRACE_ATTACH), ("ptrace-seize", PTRACE_SEIZE)):
        r, e = ptrace(req, pid)
        if r == 0:
            print(f"ATTEMPT {pid} {role} {what} ACHIEVED")
            release(pid, req == PTRACE_SEIZE)
        else:
            print(f"ATTEMPT {pid} {role} {what} refused {errname(e)}")
    got, e, data = readv(pid, mapped(pid), 16)
    if got >= 0:
        print(f"ATTEMPT {pid} {role} process_vm_readv ACHIEVED {data!r}")
    else:
        print(f"ATTEMPT {pid} {role} process_vm_readv refused {errname(e)}")
print("DONE")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workload_cannot_ptrace_or_read_the_memory_of_its_agent() {
    let h = Harness::new("rch-ptrace");
    let sandbox = python_sandbox(&h).await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;

    let r = python(&b, PTRACE_PROGRAM).await;
    println!("{}", r.output);
    assert!(
        r.via_agent,
        "the attack did not run through the agent: {}",
        brief(&r)
    );
    assert!(
        r.exit_code == 0 && r.stdout.contains("DONE"),
        "the ptrace program failed: {}",
        brief(&r)
    );
    // ptrace works on the workload's own child, so its refusals below come
    // from privilege. (process_vm_readv may be refused to everyone by the
    // engine's seccomp profile: Docker 20.10's allows it only with
    // CAP_SYS_PTRACE. Its control is printed, not required.)
    assert!(
        r.stdout.contains("CONTROL seize ok"),
        "ptrace fails even on the workload's own child, so the refusals below prove \
         nothing: {}",
        r.output
    );
    let found = targets(&r.stdout);
    agent_roots(&found, &format!(":\n{}", r.output));
    let attempts: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("ATTEMPT "))
        .collect();
    assert_eq!(attempts.len(), found.len() * 3, "{}", r.output);
    let achieved: Vec<&&str> = attempts
        .iter()
        .filter(|l| !l.ends_with(" refused EPERM"))
        .collect();
    assert!(
        achieved.is_empty(),
        "the workload traced or read its agent ({} of {} attempts not refused with EPERM):\n{}",
        achieved.len(),
        attempts.len(),
        achieved
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let after = b.execute("echo alive").await.unwrap();
    assert!(
        after.via_agent && after.output == "alive\n",
        "after the ptrace attempts the agent no longer answers: {}",
        brief(&after)
    );
}

// -------------------------------------------------- 2. the workload's rights

const STATUS_PROBE: &str = r#"sleep "$1"
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/$$/status
sleep 5 &
echo "CHILD $(grep '^Groups:' /proc/$!/status)"
kill $!
"#;

/// What a command holds, from its /proc/self/status: every failure an
/// attacker gains from.
fn check_status(r: &ExecResponse, ids: UserIds) -> (u32, Vec<String>) {
    let mut wrong = Vec::new();
    let field = |key: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "(absent)".into())
    };
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let v = field(cap);
        if v != "0000000000000000" {
            wrong.push(format!("the command holds capabilities: {cap} {v}"));
        }
    }
    if field("NoNewPrivs") != "1" {
        wrong.push(format!(
            "the command may gain privileges (setuid binaries, file capabilities): NoNewPrivs {}",
            field("NoNewPrivs")
        ));
    }
    for (key, want) in [("Uid", ids.uid), ("Gid", ids.gid)] {
        let v = field(key);
        let all: Vec<&str> = v.split_whitespace().collect();
        if all.len() != 4 || all.iter().any(|x| *x != want.to_string()) {
            wrong.push(format!(
                "the command runs with other ids than the sandbox user's: {key} {v} (want {want} x4)"
            ));
        }
    }
    let groups: Vec<u32> = field("Groups")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let others: Vec<u32> = groups.iter().copied().filter(|g| *g != ids.gid).collect();
    if !groups.contains(&ids.gid) || others.len() != 1 {
        wrong.push(format!(
            "the command is not in exactly the sandbox gid and one call group: Groups {groups:?}"
        ));
    }
    let group = others.first().copied().unwrap_or(0);
    if others.len() == 1 && group < 1 << 30 {
        wrong.push(format!(
            "the call group {group} is in the range of the image's ordinary groups (below 2^30)"
        ));
    }
    let child = call_groups(
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix("CHILD "))
            .unwrap_or(""),
        ids.gid,
    );
    if others.len() == 1 && child != others {
        wrong.push(format!(
            "a background process of the command is not in its call group: {child:?} vs {others:?}"
        ));
    }
    (group, wrong)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workload_holds_no_capability_and_a_call_group_of_its_own() {
    let h = Harness::new("rch-caps");
    let ids = sandbox_user(&h);
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let b2 = sandbox.get_thread_backend("alice-2").await.unwrap();
    warm(&b).await;

    let probe = |b: Backend, pause: &'static str| async move {
        b.execute_with(
            &format!("set -- {pause}\n{STATUS_PROBE}"),
            with_timeout(30.0),
        )
        .await
        .unwrap()
    };
    // Two calls in flight at once (two threads of the user), then a third.
    let (one, two) = tokio::join!(probe(b.clone(), "1"), probe(b2.clone(), "1"));
    let three = probe(b.clone(), "0").await;
    let mut wrong = Vec::new();
    let mut groups = Vec::new();
    for (n, r) in [&one, &two, &three].into_iter().enumerate() {
        println!(
            "call {n}: via_agent {} exit {}\n{}",
            r.via_agent, r.exit_code, r.output
        );
        if !r.via_agent || r.exit_code != 0 {
            wrong.push(format!(
                "call {n} did not run through the agent: {}",
                brief(r)
            ));
        }
        let (group, bad) = check_status(r, ids);
        wrong.extend(bad.into_iter().map(|w| format!("call {n}: {w}")));
        groups.push(group);
    }
    let distinct: BTreeSet<u32> = groups.iter().copied().collect();
    if distinct.len() != groups.len() || distinct.contains(&0) {
        wrong.push(format!(
            "calls share a call group (one call's kill would reach another's processes): {groups:?}"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workload_cannot_leave_its_call_group_nor_become_root() {
    let h = Harness::new("rch-groups");
    let ids = sandbox_user(&h);
    let sandbox = python_sandbox(&h).await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;

    let r = python(
        &b,
        r#"
import errno, os, sys
gid = os.getgid()
before = sorted(os.getgroups())
print("BEFORE", " ".join(map(str, before)))
def attempt(label, fn):
    try:
        fn()
        print("ATTEMPT", label, "ACHIEVED", sorted(os.getgroups()), os.getuid(), os.getgid())
    except OSError as e:
        print("ATTEMPT", label, "refused", errno.errorcode.get(e.errno, e.errno))
attempt("setgroups-sandbox-gid-only", lambda: os.setgroups([gid]))
attempt("setgroups-none", lambda: os.setgroups([]))
attempt("setgroups-other", lambda: os.setgroups([gid, 4242]))
attempt("setgroups-root", lambda: os.setgroups(before + [0]))
attempt("setuid-0", lambda: os.setuid(0))
attempt("setgid-0", lambda: os.setgid(0))
attempt("setresuid-0", lambda: os.setresuid(0, 0, 0))
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    # A child tries too, after a setsid.
    os.setsid()
    try:
        os.setgroups([gid])
        print("ATTEMPT child-setsid-setgroups ACHIEVED")
    except OSError as e:
        print("ATTEMPT child-setsid-setgroups refused", errno.errorcode.get(e.errno, e.errno))
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
print("AFTER", " ".join(map(str, sorted(os.getgroups()))))
"#,
    )
    .await;
    println!("{}", r.output);
    assert!(r.via_agent && r.exit_code == 0, "{}", brief(&r));
    let before = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("BEFORE "))
        .unwrap_or("")
        .to_owned();
    let attempts: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("ATTEMPT "))
        .collect();
    assert_eq!(attempts.len(), 8, "{}", r.output);
    let achieved: Vec<&&str> = attempts
        .iter()
        .filter(|l| !l.ends_with(" refused EPERM"))
        .collect();
    assert!(
        achieved.is_empty(),
        "the workload changed its groups or ids (it could leave its call group and \
         outlive a timeout or cancel):\n{}",
        achieved
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let after = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("AFTER "))
        .unwrap_or("");
    assert_eq!(after, before, "the workload's groups changed");
    let group = call_groups(&format!("Groups: {before}"), ids.gid);
    assert_eq!(
        group.len(),
        1,
        "the workload has no call group to leave (groups {before:?}): a kill cannot find \
         its processes by group"
    );
}

/// A process in a user namespace of its own holds every capability there,
/// and gVisor (which applies no OCI seccomp profile) then lets it set its
/// groups: out of its call group. The agent's own filter refuses the
/// namespace to every workload process, whatever profile the engine
/// applies (its refusals are proven in `agent/src/seccomp.rs`; here, that
/// the workload runs under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workload_cannot_make_a_user_namespace_to_shed_its_group() {
    let h = Harness::new("rch-userns");
    let sandbox = python_sandbox(&h).await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let r = python(
        &b,
        r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def filters(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Seccomp_filters:"):
            return int(line.split()[1])
print("FILTERS", filters("self"), filters(1))
for name, call in [
    ("unshare-user", lambda: libc.unshare(0x10000000)),
    ("clone3", lambda: libc.syscall(435, None, 0)),
]:
    ret = call()
    print("ATTEMPT", name, ret, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
"#,
    )
    .await;
    println!("{}", r.output);
    assert!(r.via_agent && r.exit_code == 0, "{}", brief(&r));
    let filters: Vec<u32> = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("FILTERS "))
        .map(|f| {
            f.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        filters.len() == 2 && filters[0] == filters[1] + 1,
        "the workload does not run under the agent's own filter (its filters, init's): {filters:?}"
    );
    assert!(
        r.stdout.contains("ATTEMPT unshare-user -1 EPERM"),
        "{}",
        r.output
    );
    assert!(
        r.stdout.contains("ATTEMPT clone3 -1 ENOSYS"),
        "{}",
        r.output
    );
}

/// A compiled-speed pid hopper (each process forks its successor and
/// exits at once) outran the `/proc` sweep now and then; the kill now stops
/// the whole workload in one signal before it sweeps. Ten rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_pid_hopper_never_outlives_a_timeout() {
    let h = Harness::new("rch-hopper");
    let sandbox = python_sandbox(&h).await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let hopper = "import os\nos.setsid()\nwhile True:\n    if os.fork(): os._exit(0)\n";
    let r = b
        .execute(&format!("printf '{hopper}' > /workspace/hop.py"))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", brief(&r));
    // Another call of the same user runs through every freeze: it pauses
    // for milliseconds, and goes on.
    let sibling = {
        let b = b.clone();
        tokio::spawn(async move {
            b.execute_with("sleep 6; echo alive", with_timeout(60.0))
                .await
        })
    };
    let mut wrong = Vec::new();
    for round in 0..10 {
        let script = "grep '^Groups:' /proc/$$/status; \
                      (python3 /workspace/hop.py 779 </dev/null >/dev/null 2>&1 &); sleep 60";
        let r = b.execute_with(script, with_timeout(1.5)).await.unwrap();
        if !(r.timed_out && r.exit_code == 124) {
            wrong.push(format!("round {round}: not a timeout: {}", brief(&r)));
        }
        let group = call_groups(&r.output, sandbox_user(&h).gid)
            .first()
            .copied();
        let procs = processes(&b).await.unwrap();
        let left = leftovers(&procs, "779", group);
        if !left.is_empty() {
            wrong.push(format!("round {round}: {} left: {left:?}", left.len()));
        }
    }
    let sibling = sibling.await.unwrap().unwrap();
    if sibling.stdout != "alive\n" {
        wrong.push(format!(
            "the sibling call did not go on: {}",
            brief(&sibling)
        ));
    }
    let stopped = b
        .execute("grep -l '^State:.*(stopped)' /proc/[0-9]*/status 2>/dev/null | wc -l")
        .await
        .unwrap();
    if stopped.stdout.trim() != "0" {
        wrong.push(format!("processes left stopped: {}", brief(&stopped)));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The freeze's helper runs as the sandbox user, so the workload can stop
/// it too: a loop of `kill -STOP -1` tries to hang the kill (and leave the
/// workload stopped for good). The timeout still ends the call in bounded
/// time, and nothing is left stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workload_stopping_everything_cannot_hang_a_timeout() {
    let h = Harness::new("rch-stopper");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let start = Instant::now();
    let r = b
        .execute_with(
            "(while :; do kill -STOP -1 2>/dev/null; done) & sleep 60",
            with_timeout(2.0),
        )
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(r.timed_out && r.exit_code == 124, "{}", brief(&r));
    assert!(took < Duration::from_secs(8), "the timeout took {took:?}");
    let stopped = b
        .execute("grep -l '^State:.*(stopped)' /proc/[0-9]*/status 2>/dev/null | wc -l")
        .await
        .unwrap();
    assert_eq!(
        stopped.stdout.trim(),
        "0",
        "left stopped: {}",
        brief(&stopped)
    );
}

/// A background process of the workload stops every process of its user,
/// all the time, while calls time out. The host's kills through the engine
/// run as root where the agent serves: a `docker exec` as the sandbox user
/// starts as that user (its `runc init`), the loop stopped it before its
/// exec, and the engine then held its lock on the container for good:
/// inspect, every later call, a destroy, even `docker rm -f` hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_background_stopper_cannot_wedge_the_engine_on_its_container() {
    use sandbox_host::processes::ProcessOptions;
    let h = Harness::new("rch-wedge");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let id = h.container_of("alice");
    b.start_process(
        "while :; do kill -STOP -1 2>/dev/null; done",
        ProcessOptions::default(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        // Each times out (stopped by the loop, or not) and is killed.
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            b.execute_with("sleep 5", with_timeout(1.0)),
        )
        .await
        .expect("a call hangs on the wedged engine")
        .unwrap();
        assert!(r.timed_out, "{}", brief(&r));
    }
    // The engine still answers for the container, and it goes.
    support::assert_engine_answers_for(&id);
    let destroyed = tokio::time::timeout(
        Duration::from_secs(30),
        sandbox.destroy_user_backend("alice"),
    )
    .await
    .expect("the destroy hangs on the wedged engine");
    assert!(destroyed.unwrap());
}

// ----------------------------------------- 3. timeouts and cancels kill all

/// The escape attempts: what, the marker number its escapees carry in
/// their command line, and the workload. Each call first says its call
/// group (the output so far is kept on a timeout).
const ESCAPES: [(&str, &str, &str); 7] = [
    (
        "its reap killed",
        "772",
        r#"(env -i sh -c "sleep 772" &); kill -9 $PPID; sleep 60"#,
    ),
    (
        "setsid",
        "773",
        "setsid sh -c 'sleep 773 & sleep 60' & sleep 60",
    ),
    (
        // busybox has no nohup: the same by hand there.
        "nohup",
        "774",
        "if command -v nohup >/dev/null; then nohup sleep 774 >/dev/null 2>&1 & \
         else (trap '' HUP; exec sleep 774) >/dev/null 2>&1 & fi; sleep 60",
    ),
    (
        "double fork, output detached, environment cleared",
        "775",
        "(setsid env -i sleep 775 </dev/null >/dev/null 2>&1 &); sleep 60",
    ),
    (
        "signals ignored",
        "776",
        "trap '' TERM INT HUP QUIT; (trap '' TERM INT HUP QUIT; exec sleep 776) & sleep 60",
    ),
    (
        // Each generation starts the next and exits: a kill that lists and
        // then signals always misses the newest one.
        "pid hopper",
        "777",
        "(sh /workspace/hop.sh 777 </dev/null >/dev/null 2>&1 &); sleep 60",
    ),
    // Last: the one that can leave the container without a pid to spare.
    (
        "fork loop at the pids limit",
        "778",
        "while :; do (sleep 778 &); done 2>/dev/null",
    ),
];

/// Runs every escape with a 2 s timeout in `user`'s container and returns
/// what the attacker achieved: a call that did not end as timed out within
/// a few seconds, or a process of it that outlived it.
async fn escape_timeouts(h: &Harness, sandbox: &Sandbox, user: &str) -> Vec<String> {
    let ids = sandbox_user(h);
    let b = sandbox
        .get_thread_backend(&format!("{user}-1"))
        .await
        .unwrap();
    warm(&b).await;
    let container = container_of(h, user);
    let r = b
        .execute(
            "printf '%s\\n' 'sleep 0.05' 'sh /workspace/hop.sh \"$1\" </dev/null >/dev/null 2>&1 &' \
             > /workspace/hop.sh",
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", brief(&r));

    let mut wrong = Vec::new();
    for (what, marker, workload) in ESCAPES {
        // The script's own processes (and its reap) say `Groups:`; the
        // escapees do not.
        let script = format!("grep '^Groups:' /proc/$$/status; {workload}");
        let running = {
            let b = b.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = b.execute_with(&script, with_timeout(2.0)).await;
                (r, start.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let escapees: Vec<String> = host_views(&container, 5)
            .await
            .into_iter()
            .filter(|l| holds_number(l, marker) && !l.contains("Groups:"))
            .collect();
        let (r, took) = running.await.unwrap();
        println!(
            "{user} / {what}: {} escapee(s) seen at 1-1.4 s, ended in {took:?}: {}",
            escapees.len(),
            brief_result(&r)
        );
        if escapees.is_empty() {
            wrong.push(format!(
                "{what}: no escapee was running before the timeout: the case proves nothing"
            ));
        }
        let group = match &r {
            Ok(r) => {
                if !(r.timed_out && r.exit_code == 124 && r.reason == Some(EndReason::Timeout)) {
                    wrong.push(format!(
                        "{what}: the call escaped its timeout: ended after {took:?}: {}",
                        brief(r)
                    ));
                }
                call_groups(&r.output, ids.gid).first().copied()
            }
            Err(e) => {
                wrong.push(format!(
                    "{what}: the call ended in an error after {took:?}, not a timeout: {e}"
                ));
                None
            }
        };
        if took > Duration::from_secs(6) {
            wrong.push(format!(
                "{what}: the 2 s timeout took {took:?} to end the call"
            ));
        }
        // Listed twice: a hopper may slip between a listing's glob and its
        // reads once.
        let listed = match processes(&b).await {
            Ok(mut procs) => processes(&b).await.map(|more| {
                procs.extend(more);
                procs
            }),
            Err(e) => Err(e),
        };
        match listed {
            Ok(procs) => {
                let left: BTreeSet<String> = leftovers(&procs, marker, group).into_iter().collect();
                if !left.is_empty() {
                    wrong.push(format!(
                        "{what}: {} process(es) outlived the timed-out call:\n  {}",
                        left.len(),
                        left.into_iter().collect::<Vec<_>>().join("\n  ")
                    ));
                }
            }
            Err(e) => wrong.push(format!(
                "{what}: after the timed-out call the container runs nothing: {e}"
            )),
        }
        let left: Vec<String> = host_views(&container, 3)
            .await
            .into_iter()
            .filter(|l| holds_number(l, marker))
            .collect();
        if !left.is_empty() {
            wrong.push(format!(
                "{what}: the engine still lists {} process(es) of the timed-out call:\n  {}",
                left.len(),
                left.iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
        }
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_everything_the_call_started_whatever_it_does() {
    let h = Harness::new("rch-timeout");
    let sandbox = h.sandbox().await;
    let wrong = escape_timeouts(&h, &sandbox, "alice").await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The same under dash and the GNU tools (the Python image).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_everything_the_call_started_under_dash_too() {
    let h = Harness::new("rch-timeout-py");
    let sandbox = python_sandbox(&h).await;
    let wrong = escape_timeouts(&h, &sandbox, "alice").await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The engine path (streamed stdin, a dead link) is no way out either: its
/// `reap` runs as root too and gives the command away in a call group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_through_docker_exec_kills_everything_too() {
    let h = Harness::new("rch-engine");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let mut stdin: &[u8] = b"hi\n";
    let started = Instant::now();
    let r = b
        .execute_streaming_stdin(
            "cat >/dev/null; (env -i sh -c 'sleep 771' &); kill -9 $PPID; sleep 30",
            with_timeout(2.0),
            &mut stdin,
            |_, _| {},
        )
        .await
        .unwrap();
    assert!(
        !r.via_agent,
        "streamed stdin goes through docker exec: {r:?}"
    );
    assert_eq!(r.exit_code, 124, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        r.stderr.contains("Operation not permitted"),
        "the workload killed its reap: {r:?}"
    );
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 771"), "escaped the deadline: {ps}");
}

/// A thread-group leader that exits alone (raw `exit`, not `exit_group`)
/// shows as a zombie while its other thread runs on: a sweep that skipped
/// zombies left that thread alive after the timeout (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_a_thread_whose_leader_exited_alone() {
    let h = Harness::new("rch-zleader");
    let sandbox = python_sandbox(&h).await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let script = "cat > /workspace/z.py <<'PY'
import ctypes, threading, time
def beat():
    while True:
        open('/workspace/beat', 'a').write('.')
        time.sleep(0.1)
threading.Thread(target=beat).start()
time.sleep(0.3)
ctypes.CDLL(None).syscall(60, 0)
PY
python3 /workspace/z.py & sleep 30";
    let r = b.execute_with(script, with_timeout(2.0)).await.unwrap();
    assert_eq!(r.exit_code, 124, "{r:?}");
    let size = |r: ExecResponse| r.output.trim().parse::<u64>().unwrap_or(0);
    let before = size(b.execute("wc -c < /workspace/beat").await.unwrap());
    assert!(before > 0, "the thread never ran: the test proves nothing");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = size(b.execute("wc -c < /workspace/beat").await.unwrap());
    assert_eq!(
        before, after,
        "a thread of the timed-out call is still running (its leader exited alone)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_kills_everything_the_call_started() {
    let h = Harness::new("rch-cancel");
    let ids = sandbox_user(&h);
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let container = container_of(&h, "alice");

    let id = format!("reach-cancel-{:08x}", random_u64() as u32);
    let started = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let running = {
        let (b, id, started, seen) = (b.clone(), id.clone(), started.clone(), seen.clone());
        tokio::spawn(async move {
            b.execute_streaming(
                "grep '^Groups:' /proc/$$/status; \
                 (setsid env -i sh -c 'sleep 781 & sleep 782' </dev/null >/dev/null 2>&1 &); \
                 ( ( (trap '' HUP TERM; exec sleep 783) >/dev/null 2>&1 & ) & ); \
                 trap '' TERM INT HUP; echo started; sleep 60",
                ExecOptions {
                    execution_id: Some(id),
                    timeout: Some(Duration::from_secs(60)),
                    ..Default::default()
                },
                move |_, bytes| {
                    let mut seen = seen.lock().unwrap();
                    seen.extend_from_slice(bytes);
                    if String::from_utf8_lossy(&seen).contains("started\n") {
                        started.store(true, Ordering::SeqCst);
                    }
                },
            )
            .await
        })
    };
    let give_up = Instant::now() + Duration::from_secs(15);
    while !started.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < give_up && !running.is_finished(),
            "the long call never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let group = call_groups(&String::from_utf8_lossy(&seen.lock().unwrap()), ids.gid)
        .first()
        .copied();
    // Its escapees run before the cancel.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = host_views(&container, 3).await;
    for marker in ["781", "782", "783"] {
        assert!(
            before
                .iter()
                .any(|l| holds_number(l, marker) && !l.contains("Groups:")),
            "sleep {marker} never started, the test proves nothing: {before:?}"
        );
    }

    let start = Instant::now();
    assert!(
        sandbox.cancel("alice-1", &id).unwrap(),
        "the cancel did not find the execution"
    );
    let r = running.await.unwrap().expect("the cancelled call answers");
    println!("cancelled: {} in {:?}", brief(&r), start.elapsed());
    assert!(
        r.exit_code == 130 && r.reason == Some(EndReason::Cancelled),
        "the call was not ended by its cancel: {}",
        brief(&r)
    );
    // The kill runs as the call ends: give it the time the existing cancel
    // test gives it.
    let give_up = Instant::now() + Duration::from_secs(2);
    let left = loop {
        let procs = processes(&b).await.expect("a listing after the cancel");
        let mut left: BTreeSet<String> = ["781", "782", "783"]
            .iter()
            .flat_map(|m| leftovers(&procs, m, group))
            .collect();
        left.extend(
            host_view(&container)
                .into_iter()
                .filter(|l| ["781", "782", "783"].iter().any(|m| holds_number(l, m)))
                .map(|l| format!("(engine) {l}")),
        );
        if left.is_empty() || Instant::now() > give_up {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        left.is_empty(),
        "{} process(es) of the cancelled call outlived it by 2 s (group {group:?}):\n  {}",
        left.len(),
        left.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

// ------------------------------------------------- 4. never run twice, never forged

#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn forged_frames_sprayed_at_the_agent_never_land() {
    let h = Harness::new("rch-spray");
    let sandbox = h.sandbox().await;
    let sibling = sandbox.get_thread_backend("alice-1").await.unwrap();
    let attacker = sandbox.get_thread_backend("alice-2").await.unwrap();
    warm(&sibling).await;
    let r = sibling.execute("mkdir -p /workspace/sib").await.unwrap();
    assert_eq!(r.exit_code, 0);

    // Frame ids of the plausible form (a 16-hex prefix and a counter), for
    // a few prefixes: the attacker cannot read the real one.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let prefix = format!("{:016x}", random_u64());
        for n in [0, 1, 2, 3, 5, 8, 13, 21, 34, 40, 41, 42] {
            ids.push(format!("{prefix}-{n}"));
        }
    }
    let forged_out = "Rk9SR0VECg=="; // "FORGED\n"
    let spray = format!(
        r#"{FIND_AGENT}
pids=1
for t in $targets; do pids="$pids ${{t%%:*}}"; done
paths=
for p in $pids; do
  for f in /proc/$p/fd/*; do
    if [ -e "$f" ] || [ -L "$f" ]; then paths="$paths $f"; fi
  done
  for n in 0 1 2 3 4 5 6 7 8 9; do paths="$paths /proc/$p/fd/$n"; done
done
echo "PATHS $(echo $paths | wc -w): $paths"
ids="{ids}"
echo started > /workspace/spray.started
end=$(( $(date +%s) + 10 ))
ok=0; no=0
while [ "$(date +%s)" -lt "$end" ]; do
  for id in $ids; do
    for path in $paths; do
      for frame in "stale $id" "exit $id 42" "out $id {forged_out}" "ack $id"; do
        if printf '\n%s\n' "$frame" 2>/dev/null > "$path"; then
          ok=$((ok+1))
          [ $ok -le 20 ] && echo "HIT $path $frame" >> /workspace/spray.hits
        else
          no=$((no+1))
        fi
      done
    done
  done
  # Kept in the workspace: a reply lost to the forgeries still tells.
  echo "WRITES ok=$ok refused=$no" > /workspace/spray.result
done
cat /workspace/spray.result
"#,
        ids = ids.join(" ")
    );
    let spraying = {
        let attacker = attacker.clone();
        tokio::spawn(async move { attacker.execute_with(&spray, with_timeout(60.0)).await })
    };
    let started = h.root.path().join("alice/spray.started");
    let give_up = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(
            Instant::now() < give_up && !spraying.is_finished(),
            "the spray never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The sibling thread: 40 commands, started every 200 ms, each in flight
    // for 300 ms while the spray goes on.
    let nonce = random_u64();
    let mut calls = Vec::new();
    for n in 0..40u32 {
        let b = sibling.clone();
        calls.push(tokio::spawn(async move {
            let token = format!("token-{n}-{nonce:x}");
            let r = b
                .execute_with(
                    &format!("echo run >> /workspace/sib/{n}.txt; sleep 0.3; echo {token}"),
                    with_timeout(30.0),
                )
                .await;
            (n, token, r)
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut wrong = Vec::new();
    let mut via_agent = 0;
    for call in calls {
        let (n, token, r) = call.await.unwrap();
        match r {
            Ok(r) => {
                via_agent += usize::from(r.via_agent);
                if r.exit_code != 0 || r.output != format!("{token}\n") {
                    wrong.push(format!(
                        "sibling command {n} answered another result: exit {} output {:?} \
                         (want {token:?})",
                        r.exit_code, r.output
                    ));
                }
            }
            Err(e) => wrong.push(format!("sibling command {n} failed: {e}")),
        }
    }
    let spray = spraying.await.unwrap();
    // A rerun through docker exec could come late: give it a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..40 {
        let path = h.root.path().join(format!("alice/sib/{n}.txt"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text != "run\n" {
            wrong.push(format!(
                "sibling command {n} ran {} time(s) (its file holds {text:?})",
                text.lines().count()
            ));
        }
    }
    println!("sibling: {via_agent} of 40 through the agent");
    match &spray {
        Ok(r) => println!("attacker: {}", r.output),
        Err(e) => wrong.push(format!(
            "the attacker's frames reached the host: its own call's reply was lost: {e}"
        )),
    }
    let workspace = h.root.path().join("alice");
    let writes = std::fs::read_to_string(workspace.join("spray.result"))
        .unwrap_or_default()
        .trim()
        .strip_prefix("WRITES ")
        .unwrap_or("(none)")
        .to_owned();
    let count = |key: &str| -> Option<u64> {
        writes
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let (ok, refused) = (count("ok="), count("refused="));
    println!("attacker writes: {writes}");
    if ok != Some(0) {
        let hits = std::fs::read_to_string(workspace.join("spray.hits")).unwrap_or_default();
        wrong.push(format!(
            "the attacker wrote forged frames into its agent's fds: {writes}, the first:\n{hits}"
        ));
    }
    if refused.unwrap_or(0) == 0 {
        wrong.push(format!(
            "the spray made no attempt: {}",
            brief_result(&spray)
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ------------------------------------------ 5. old containers are recreated

/// Replaces `user`'s container with one as an older host made it: the same
/// name and ownership labels, `sandbox.agent` = `label`, the agent as the
/// main command under tini, every process as the sandbox user, no
/// capability. The old container's full id.
fn make_old(h: &Harness, user: &str, label: &str, ids: UserIds) -> String {
    let id = h.replace_as_older_host(user, label, &["/.sandbox/agent", "init"]);
    let user_ids = docker(&["inspect", "--format", "{{.Config.User}}", &id]);
    assert_eq!(user_ids.trim(), format!("{}:{}", ids.uid, ids.gid));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_of_an_older_host_is_recreated_when_next_idle() {
    let h = Harness::new("rch-old");
    let ids = sandbox_user(&h);
    let users = [("alice", "serve-v1"), ("bob", "serve")];
    {
        let sandbox = h.sandbox().await;
        for (user, _) in users {
            let b = sandbox
                .get_thread_backend(&format!("{user}-1"))
                .await
                .unwrap();
            b.execute("true").await.unwrap();
        }
    }
    let mut old = Vec::new();
    for (user, label) in users {
        let id = make_old(&h, user, label, ids);
        // The old container's workload leaves a file behind.
        docker(&[
            "exec",
            "-u",
            &format!("{}:{}", ids.uid, ids.gid),
            &id,
            "sh",
            "-c",
            "echo from-the-old-container > /workspace/old.txt",
        ]);
        old.push((user, label, id));
    }

    // The host's maintenance retires them once idle (here every 0.3 s).
    let mut config = h.config();
    config.maintenance_interval_secs = 0.3;
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let mut wrong = Vec::new();
    for (user, label, old_id) in old {
        let b = sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await
            .unwrap();
        let first = b.execute("cat /workspace/old.txt; id -u").await;
        // Idle now: gone within a few maintenance rounds.
        let gone_by = Instant::now() + Duration::from_secs(10);
        while h
            .containers()
            .iter()
            .any(|(_, id, _)| old_id.starts_with(id.as_str()))
            && Instant::now() < gone_by
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let second = b.execute("id -u").await;
        println!(
            "{user} ({label}): {}\n{}",
            brief_result(&first),
            brief_result(&second)
        );
        let want = format!("from-the-old-container\n{}\n", ids.uid);
        match &first {
            Ok(r) if r.exit_code == 0 && r.output == want => {}
            other => wrong.push(format!(
                "{user} ({label}): the first execute after the upgrade failed: {}",
                brief_result(other)
            )),
        }
        let now = h
            .containers()
            .into_iter()
            .find(|(name, _, _)| name.ends_with(&format!(".{user}")))
            .map(|(_, id, _)| id);
        let Some(now) = now else {
            wrong.push(format!("{user} ({label}): no container left"));
            continue;
        };
        if old_id.starts_with(&now) {
            wrong.push(format!(
                "{user} ({label}): the older host's container is still in use (the workload \
                 keeps running as its agent's uid, within its reach)"
            ));
            continue;
        }
        let agent_label = docker(&[
            "inspect",
            "--format",
            "{{index .Config.Labels \"sandbox.agent\"}}",
            &now,
        ]);
        let current = format!("serve-v{}", sandbox_agent::protocol::PROTOCOL_VERSION);
        if agent_label.trim() != current {
            wrong.push(format!(
                "{user} ({label}): the new container is labelled {:?}, not {current}",
                agent_label.trim()
            ));
        }
        let via_agent = [&first, &second]
            .iter()
            .any(|r| r.as_ref().is_ok_and(|r| r.via_agent));
        match &second {
            Ok(r) if r.exit_code == 0 && r.output == format!("{}\n", ids.uid) => {}
            other => wrong.push(format!(
                "{user} ({label}): the second execute after the upgrade failed: {}",
                brief_result(other)
            )),
        }
        if !via_agent {
            wrong.push(format!(
                "{user} ({label}): neither execute after the recreate ran through the agent"
            ));
        }
        // The new container's agent is root, out of the workload's reach.
        let r = b
            .execute("grep '^Uid:' /proc/1/status")
            .await
            .map(|r| r.output)
            .unwrap_or_else(|e| e.to_string());
        if r.split_whitespace().skip(1).any(|u| u != "0") {
            wrong.push(format!(
                "{user} ({label}): the recreated container's pid 1 is not root: {r:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
