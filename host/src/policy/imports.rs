//! The world's imports, implemented for a policy instance's store state.
//!
//! Each import is a thin conversion to [`Capabilities`], admitted first by
//! the call's [`Scope`] and host-call budget; the guest-CPU deadline counts
//! the epoch ticks the guest's own code ran in ([`CallClock`]), not the
//! time spent in them (the wall-clock budget counts everything).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::containment::PolicyLimiter;

use sandbox_contract::{BackendId, Container, UserId};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

use super::bindings::contract_types as types;
use super::bindings::v0_3::sandbox::policy::containers as containers_v0_3;
use super::bindings::v0_4::sandbox::policy::containers;
use super::bindings::v0_4::wasi::logging::logging;
use crate::engine::{Engine, ManagedContainer, RemoveMode};
use crate::error::SandboxError;

/// Per-call accounting for the guest CPU deadline, in epoch ticks the
/// guest ran in: a tick counts when the guest's own code sees the epoch
/// advanced (the deadline callback). Time it spent off the CPU, yielded to
/// other tasks, or in a host import counts one tick per resumption at most:
/// on a loaded host a waiting guest does not spend its budget (wall-clock
/// time, which counted all of it, interrupted Python instances starting
/// side by side). The wall-clock call budget bounds the rest.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    pub ticks: u32,
    pub budget: Duration,
    /// A host import returned since the last tick: the next one is the
    /// import's (a slow one spans a tick), not the guest's.
    pub after_import: bool,
}

impl CallClock {
    /// The guest's time so far, at the ticker's granularity.
    pub fn guest_time(&self) -> Duration {
        super::ticker::EPOCH_TICK.saturating_mul(self.ticks)
    }

    /// One more tick the guest ran in (none just after a host import).
    pub fn tick(&mut self) {
        if std::mem::take(&mut self.after_import) {
            return;
        }
        self.ticks = self.ticks.saturating_add(1);
    }
}

/// What the running export may ask of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `name`, `backend-id`, `profile`: pure, no container operation.
    Pure,
    /// `ensure-container` of this backend: look up, create (under the
    /// profile the host validated for it) and start this backend's
    /// container only; remove (an eviction) only what is idle.
    Ensure {
        backend: BackendId,
        profile: crate::config::ProfileName,
    },
    /// `release-thread` and `destroy-user` for this user: look up, and
    /// remove this user's containers only, draining each until `deadline`.
    Destroy {
        user: UserId,
        deadline: tokio::time::Instant,
    },
    /// `maintain`: look up, and remove only what has no work in flight;
    /// nothing at all in a dry run. During a gc that leaves other policies'
    /// containers alone, it sees and removes only those of the policies
    /// this host ran ([`Engine::maintain_sees`]).
    ///
    /// [`Engine::maintain_sees`]: crate::engine::Engine::maintain_sees
    Maintain { dry_run: bool },
}

/// Containers one call may try to create (a create that loses a name race
/// adopts the winner; a failed create may be retried once).
pub const CREATES_PER_CALL: u32 = 2;

/// The accounting of the running export call.
#[derive(Debug, Clone)]
pub struct CallState {
    pub scope: Scope,
    pub host_calls: u32,
    pub creates: u32,
    /// Why the call must trap at the next epoch tick (a budget ran out).
    pub exhausted: Option<String>,
}

impl CallState {
    pub fn new(scope: Scope) -> Self {
        CallState {
            scope,
            host_calls: 0,
            creates: 0,
            exhausted: None,
        }
    }
}

/// The data of one policy instance's store.
pub struct InstanceState {
    pub engine: Arc<Engine>,
    /// Label value stamped on containers this policy creates.
    pub policy_name: String,
    pub clock: CallClock,
    pub call: CallState,
    max_host_calls: u32,
    pub limiter: PolicyLimiter,
    wasi: WasiCtx,
    table: ResourceTable,
    /// `[policy_config]`, served by `wasi:config/store`.
    config: WasiConfigVariables,
    /// The tail of what the guest wrote to WASI stderr (a Python policy's
    /// traceback), quoted in the error of a call that traps.
    stderr: GuestStderr,
}

impl InstanceState {
    pub fn new(
        engine: Arc<Engine>,
        policy_name: String,
        limiter: PolicyLimiter,
        budget: Duration,
        max_host_calls: u32,
        max_resources: usize,
    ) -> Self {
        let mut table = ResourceTable::new();
        // Leaked pollables and streams are host memory: bounded per instance.
        table.set_max_capacity(max_resources);
        let config = WasiConfigVariables::from_iter(engine.config().policy_config.clone());
        let stderr = GuestStderr::default();
        InstanceState {
            engine,
            config,
            policy_name,
            clock: CallClock {
                ticks: 0,
                budget,
                after_import: false,
            },
            call: CallState::new(Scope::Pure),
            max_host_calls,
            limiter,
            // No preopens, no env, no args, no network: std's needs only.
            // Random bytes are allocated host-side, outside the pool: small.
            // Stderr is kept (its last bytes only) to explain a trap; stdout
            // stays a sink.
            wasi: WasiCtx::builder()
                .max_random_size(64 * 1024)
                .stderr(stderr.clone())
                .build(),
            stderr,
            table,
        }
    }

    /// Forgets what the guest wrote to stderr so far: call when a call
    /// starts, so a trap quotes only its own call's output.
    pub fn clear_guest_stderr(&mut self) {
        self.stderr.clear();
    }

    /// What the guest wrote to stderr since [`Self::clear_guest_stderr`],
    /// summed up for a trap's message (see [`GuestStderr::summary`]), and
    /// forgotten.
    pub fn take_guest_stderr(&mut self) -> Option<String> {
        let summary = self.stderr.summary();
        self.stderr.clear();
        summary
    }

    /// Counts one host call against the call's budget, and checks that the
    /// running export may make it. A spent budget also makes the call trap at
    /// the next epoch tick, so a loop over cheap imports cannot run on.
    fn admit(
        &mut self,
        op: &str,
        allowed: impl FnOnce(&Scope) -> bool,
    ) -> Result<(), SandboxError> {
        self.call.host_calls += 1;
        if self.call.host_calls > self.max_host_calls {
            let why = format!(
                "the policy made more than {} host calls in one call",
                self.max_host_calls
            );
            self.call.exhausted.get_or_insert(why.clone());
            // A trap, not an answer: the policy cannot loop on refusals.
            return Err(SandboxError::PolicyTrap(why));
        }
        if !allowed(&self.call.scope) {
            return Err(SandboxError::Refused(format!(
                "{op} is not allowed in {}",
                describe(&self.call.scope)
            )));
        }
        Ok(())
    }

    /// Hands containers to the policy: from now on it may return them from
    /// `ensure-container` for their backend.
    fn hand_out(&self, containers: &[&ManagedContainer]) {
        for c in containers {
            self.engine.hand_out(c);
        }
    }

    /// The containers of `found` this call may see: all, but in a
    /// `maintain` under a gc that leaves other policies' containers alone.
    /// Containers that host processes of another workspace root manage are
    /// never shown: this host may not act on them.
    fn visible(&self, found: Vec<ManagedContainer>) -> Vec<ManagedContainer> {
        let maintain = matches!(self.call.scope, Scope::Maintain { .. });
        found
            .into_iter()
            .filter(|c| c.managed_elsewhere.is_none())
            .filter(|c| !maintain || self.engine.maintain_sees(c))
            .collect()
    }

    /// Runs a host operation: its time is not the guest's (see
    /// [`CallClock`]).
    async fn host<T>(&mut self, op: impl Future<Output = T>) -> T {
        let out = op.await;
        self.clock.after_import = true;
        out
    }
}

/// Bytes of guest stderr kept per instance: the end of a traceback.
pub const GUEST_STDERR_TAIL_BYTES: usize = 4096;

/// Characters of the summary quoted in a trap's message.
const GUEST_STDERR_SUMMARY_CHARS: usize = 300;

/// WASI stderr of a policy instance: keeps the last
/// [`GUEST_STDERR_TAIL_BYTES`] written, drops the rest, so a guest writing
/// in a loop costs the host a fixed 4 KiB and never blocks (every write is
/// accepted in full).
///
/// Why: componentize-py writes an uncaught exception's traceback to stderr
/// and then traps; without it the caller only learns "wasm trap:
/// unreachable". The text is the guest's: [`GuestStderr::summary`] bounds
/// it, and whoever shows it escapes it (`SandboxError::policy_trap`).
#[derive(Debug, Clone, Default)]
pub struct GuestStderr {
    tail: Arc<Mutex<VecDeque<u8>>>,
}

impl GuestStderr {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let keep = &bytes[bytes.len().saturating_sub(GUEST_STDERR_TAIL_BYTES)..];
        let overflow = (tail.len() + keep.len()).saturating_sub(GUEST_STDERR_TAIL_BYTES);
        tail.drain(..overflow);
        tail.extend(keep);
    }

    fn clear(&self) {
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The kept bytes, as text (a cut multi-byte character becomes U+FFFD).
    fn text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }

    /// The line that names the failure, unescaped and at most 300
    /// characters: a Python traceback's exception line
    /// (`ZeroDivisionError: division by zero`, the first unindented line
    /// after the last `Traceback (most recent call last):`), else the last
    /// non-empty line. `None` when the guest wrote nothing.
    pub fn summary(&self) -> Option<String> {
        let text = self.text();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        let exception = lines
            .iter()
            .rposition(|l| l.ends_with("Traceback (most recent call last):"))
            .and_then(|header| {
                lines[header + 1..]
                    .iter()
                    .find(|l| !l.is_empty() && !l.starts_with(char::is_whitespace))
            });
        let line = exception.or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()))?;
        let mut summary: String = line.chars().take(GUEST_STDERR_SUMMARY_CHARS).collect();
        if line.chars().count() > GUEST_STDERR_SUMMARY_CHARS {
            summary.push_str("[...]");
        }
        Some(summary)
    }
}

/// A trap's detail with the guest's stderr summary in front (the whole
/// message is cut at 512 characters, and the wasm backtrace that follows a
/// trap is long): `ZeroDivisionError: division by zero (policy stderr);
/// wasm trap: ...`.
pub fn with_guest_stderr(detail: String, stderr: Option<String>) -> String {
    match stderr {
        Some(line) => format!("{line} (policy stderr); {detail}"),
        None => detail,
    }
}

impl wasmtime_wasi::cli::IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestStderr {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestStderr {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Pure => "a pure export (name, backend-id, profile)".into(),
        Scope::Ensure { backend, .. } => format!("ensure-container of backend {backend}"),
        Scope::Destroy { user, .. } => {
            format!("release-thread or destroy-user of user {user} (which may only look up and remove that user's containers)")
        }
        Scope::Maintain { dry_run: false } => "maintain (which may only look up and remove)".into(),
        Scope::Maintain { dry_run: true } => "a dry run of maintain (which removes nothing)".into(),
    }
}

fn any_container_op(scope: &Scope) -> bool {
    !matches!(scope, Scope::Pure)
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for InstanceState {
    /// The one conversion of host errors into the policy's: refusals are
    /// logged (a policy probing the host's rules shows up), a spent budget
    /// traps, everything else is the contract's error.
    fn convert_error(&mut self, e: SandboxError) -> wasmtime::Result<types::Error> {
        match e {
            SandboxError::PolicyTrap(why) => Err(wasmtime::Error::msg(why)),
            e => {
                if matches!(e, SandboxError::Refused(_) | SandboxError::InvalidId(_)) {
                    tracing::warn!(policy = %self.policy_name, error = %e, "policy request refused");
                }
                Ok(e.into())
            }
        }
    }
}

fn contract(c: ManagedContainer) -> Container {
    c.container
}

impl containers::Host for InstanceState {
    async fn find(&mut self, backend_id: String) -> Result<Option<Container>, SandboxError> {
        self.admit("find", any_container_op)?;
        let backend = BackendId::parse(&backend_id)?;
        let engine = self.engine.clone();
        let found = self.host(engine.find(&backend)).await?;
        let found = self.visible(found.into_iter().collect()).pop();
        self.hand_out(&found.iter().collect::<Vec<_>>());
        Ok(found.map(contract))
    }

    async fn list(&mut self) -> Result<Vec<Container>, SandboxError> {
        self.admit("list", any_container_op)?;
        let engine = self.engine.clone();
        let all = self.host(engine.list()).await?;
        let all = self.visible(all);
        self.hand_out(&all.iter().collect::<Vec<_>>());
        Ok(all.into_iter().map(contract).collect())
    }

    async fn create(&mut self, backend_id: String) -> Result<Container, SandboxError> {
        // Only ensure-container creates, only for its own backend, and only
        // a bounded number of times per call.
        self.admit(
            "create",
            |scope| matches!(scope, Scope::Ensure { backend, .. } if backend.as_str() == backend_id),
        )?;
        self.call.creates += 1;
        if self.call.creates > CREATES_PER_CALL {
            return Err(SandboxError::Refused(format!(
                "a policy call may create at most {CREATES_PER_CALL} containers"
            )));
        }
        let Scope::Ensure { backend, profile } = self.call.scope.clone() else {
            unreachable!("admitted only in ensure-container")
        };
        let engine = self.engine.clone();
        let policy = self.policy_name.clone();
        let created = self
            .host(engine.create(&backend, &policy, &profile))
            .await?;
        self.hand_out(&[&created]);
        Ok(created.container)
    }

    async fn start(&mut self, container_id: String) -> Result<(), SandboxError> {
        let backend = match &self.call.scope {
            Scope::Ensure { backend, .. } => Some(backend.clone()),
            _ => None,
        };
        self.admit("start", |_| backend.is_some())?;
        let engine = self.engine.clone();
        self.host(engine.start(&container_id, backend.as_ref()))
            .await
    }

    async fn inspect(&mut self, container_id: String) -> Result<Option<Container>, SandboxError> {
        self.admit("inspect", any_container_op)?;
        let engine = self.engine.clone();
        let found = self.host(engine.inspect(&container_id)).await?;
        let found = self.visible(found.into_iter().collect()).pop();
        self.hand_out(&found.iter().collect::<Vec<_>>());
        Ok(found.map(contract))
    }

    async fn remove(&mut self, container_id: String) -> Result<bool, SandboxError> {
        self.admit("remove", |scope| {
            !matches!(scope, Scope::Pure | Scope::Maintain { dry_run: true })
        })?;
        let how = match &self.call.scope {
            // Idle and capacity decisions never kill running work.
            Scope::Ensure { .. } | Scope::Maintain { .. } => RemoveMode::UnlessBusy,
            Scope::Destroy { deadline, .. } => RemoveMode::Drain(*deadline),
            Scope::Pure => unreachable!("refused by admit"),
        };
        if let Scope::Destroy { user, .. } = &self.call.scope {
            // A destroy of one user never reaches another user's container.
            let user = user.clone();
            let engine = self.engine.clone();
            let target = self.host(engine.inspect(&container_id)).await?;
            let owner = target
                .as_ref()
                .map(|c| BackendId::parse(&c.backend_id).and_then(|b| b.user()));
            if let Some(owner) = owner {
                if owner.as_ref().ok() != Some(&user) {
                    return Err(SandboxError::Refused(format!(
                        "a destroy of user {user} may not remove another user's container"
                    )));
                }
            }
        }
        if matches!(self.call.scope, Scope::Maintain { .. }) {
            // Under a gc that leaves other policies' containers alone, a
            // container the policy was not shown is not its to remove.
            let engine = self.engine.clone();
            let target = self.host(engine.inspect(&container_id)).await?;
            if let Some(target) = target.filter(|c| !self.engine.maintain_sees(c)) {
                return Err(SandboxError::Refused(format!(
                    "container {} was made by another policy ({}); this gc leaves it alone",
                    target.name, target.policy
                )));
            }
        }
        let engine = self.engine.clone();
        self.host(engine.remove(&container_id, how)).await
    }
}

/// The 0.3 world's `containers`: the same functions, linked under their
/// 0.3 name.
impl containers_v0_3::Host for InstanceState {
    async fn find(&mut self, backend_id: String) -> Result<Option<Container>, SandboxError> {
        containers::Host::find(self, backend_id).await
    }

    async fn list(&mut self) -> Result<Vec<Container>, SandboxError> {
        containers::Host::list(self).await
    }

    async fn create(&mut self, backend_id: String) -> Result<Container, SandboxError> {
        containers::Host::create(self, backend_id).await
    }

    async fn start(&mut self, container_id: String) -> Result<(), SandboxError> {
        containers::Host::start(self, container_id).await
    }

    async fn inspect(&mut self, container_id: String) -> Result<Option<Container>, SandboxError> {
        containers::Host::inspect(self, container_id).await
    }

    async fn remove(&mut self, container_id: String) -> Result<bool, SandboxError> {
        containers::Host::remove(self, container_id).await
    }
}

impl logging::Host for InstanceState {
    async fn log(
        &mut self,
        level: logging::Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        if let Err(e) = self.admit("log", |_| true) {
            return match e {
                SandboxError::PolicyTrap(why) => Err(wasmtime::Error::msg(why)),
                _ => Ok(()),
            };
        }
        // Bounded and escaped: the policy must not flood or forge log lines.
        let message = crate::error::policy_text(&message);
        let context = crate::error::policy_text(&context);
        let policy = self.policy_name.as_str();
        match level {
            logging::Level::Trace => tracing::trace!(policy, context, "{message}"),
            logging::Level::Debug => tracing::debug!(policy, context, "{message}"),
            logging::Level::Info => tracing::info!(policy, context, "{message}"),
            logging::Level::Warn => tracing::warn!(policy, context, "{message}"),
            logging::Level::Error | logging::Level::Critical => {
                tracing::error!(policy, context, "{message}")
            }
        }
        Ok(())
    }
}

/// `wasi:config/store` over `[policy_config]`.
pub fn config_view(state: &mut InstanceState) -> WasiConfig<'_> {
    WasiConfig::from(&state.config)
}

#[cfg(test)]
mod guest_stderr_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use wasmtime_wasi::cli::StdoutStream;

    const TRACEBACK: &str = "Traceback (most recent call last):\n  \
        File \"/app/app.py\", line 24, in ensure_container\n    \
        share = 1 / users\n            ~~^~~~~~~\n\
        ZeroDivisionError: division by zero\n\
        thread '<unnamed>' panicked at src/lib.rs:1:1:\nPython function threw\n";

    fn kept(stderr: &GuestStderr) -> usize {
        stderr.tail.lock().unwrap().len()
    }

    #[tokio::test]
    async fn only_the_tail_is_kept_and_the_exception_line_is_named() {
        let stderr = GuestStderr::default();
        // Written the way WASI writes it: through the async stream.
        let mut stream = Pin::from(stderr.async_stream());
        for _ in 0..1000 {
            stream.write_all(&[b'x'; 1000]).await.unwrap();
        }
        assert_eq!(
            kept(&stderr),
            GUEST_STDERR_TAIL_BYTES,
            "a flood costs 4 KiB"
        );
        stream.write_all(TRACEBACK.as_bytes()).await.unwrap();
        assert_eq!(kept(&stderr), GUEST_STDERR_TAIL_BYTES);
        assert_eq!(
            stderr.summary().as_deref(),
            Some("ZeroDivisionError: division by zero")
        );
        // A chained exception: the last traceback names the final one.
        stderr.push(b"\nDuring handling of the above exception, another exception occurred:\n\n");
        stderr.push(b"Traceback (most recent call last):\n  File \"x\"\nKeyError: 'alice'\n");
        assert_eq!(stderr.summary().as_deref(), Some("KeyError: 'alice'"));

        stderr.clear();
        assert_eq!(stderr.summary(), None, "cleared per call");
        stderr.push(b"plain message\n\n  \n");
        assert_eq!(stderr.summary().as_deref(), Some("plain message"));
    }

    #[test]
    fn a_hostile_stderr_is_bounded_and_escaped_in_the_trap_message() {
        let stderr = GuestStderr::default();
        // Multi-byte characters, one of them cut by the 4 KiB window.
        stderr.push("é".repeat(2000).as_bytes());
        stderr.push(&[0xff, 0xfe]);
        let hostile = format!(
            "Traceback (most recent call last):\n  x\nEvil: \x1b[2J\u{202E}\\{}\n2026-01-01 INFO forged\n",
            "y".repeat(3_000)
        );
        stderr.push(hostile.as_bytes());
        let summary = stderr.summary().unwrap();
        assert!(summary.starts_with("Evil: "), "{summary:.40}");
        assert!(summary.chars().count() <= GUEST_STDERR_SUMMARY_CHARS + 5);
        let detail = with_guest_stderr("wasm trap: unreachable".into(), Some(summary));
        let shown = SandboxError::policy_trap(&format!("ensure-container: {detail}")).to_string();
        assert!(
            !shown.contains(['\n', '\x1b', '\u{202E}']),
            "no raw control: {shown:.80}"
        );
        assert!(
            shown.contains("Evil: \\u{1b}[2J\\u{202e}\\\\yyy"),
            "{shown:.80}"
        );
        assert!(!shown.contains("INFO forged"), "one line only");
        assert!(shown.chars().count() < 600, "bounded: {}", shown.len());
        assert!(shown.contains("(policy stderr); wasm trap: unreachable"));
    }
}
