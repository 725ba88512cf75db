//! What the host checks about a policy's answers, in one place. The
//! policy layer calls these after every export, and the self-check at load
//! runs the same functions, so a policy is held to one set of rules.

use sandbox_contract::{BackendId, Removal, ThreadId};

use crate::error::{policy_text, Result, SandboxError};

/// A `backend-id` answer for `thread`: a valid backend id of the thread's
/// own user. A policy can never route one user's thread into another
/// user's sandbox.
pub fn backend_of_thread(thread: &ThreadId, answered: &str) -> Result<BackendId> {
    let backend = BackendId::parse(answered).map_err(|e| {
        SandboxError::Refused(format!(
            "the policy mapped thread {thread} to an invalid backend id: {}",
            SandboxError::from(e)
        ))
    })?;
    let user = thread.user();
    if backend.user().ok().as_ref() != Some(&user) {
        return Err(SandboxError::Refused(format!(
            "the policy mapped a thread of user {user} to backend {backend}, which belongs to another user"
        )));
    }
    Ok(backend)
}

/// A `profile` answer for `backend`: the name of a profile the operator
/// defined (`None`, from a policy of the 0.3 world: `default`). An unknown
/// name fails the call: never a wider profile in its place.
pub fn profile(
    config: &crate::config::Config,
    backend: &BackendId,
    answered: Option<String>,
) -> Result<crate::config::ProfileName> {
    let Some(answered) = answered else {
        return Ok(crate::config::ProfileName::default_profile());
    };
    config
        .chosen_profile(&answered)
        .map(|p| p.name)
        .map_err(|why| SandboxError::Refused(format!("profile({backend}): {}", policy_text(&why))))
}

/// The identity rule of `backend-id`: on one of its own outputs that is
/// also a thread id, it answers that output again. `again` is the answer
/// for `backend` taken as a thread id.
pub fn identity(backend: &BackendId, again: Result<String>) -> Result<()> {
    match again {
        Ok(again) if again == backend.as_str() => Ok(()),
        Ok(again) => Err(SandboxError::Refused(format!(
            "backend-id is not the identity on its own outputs: backend-id({backend}) = {}",
            policy_text(&again)
        ))),
        Err(e) => Err(SandboxError::Refused(format!(
            "backend-id is not the identity on its own outputs: backend-id({backend}) failed: {e}"
        ))),
    }
}

/// The determinism of `backend-id`: two answers for one thread agree.
pub fn deterministic(thread: &ThreadId, first: &BackendId, second: &str) -> Result<()> {
    if first.as_str() == second {
        Ok(())
    } else {
        Err(SandboxError::Refused(format!(
            "backend-id({thread}) is not deterministic ({first}, then {})",
            policy_text(second)
        )))
    }
}

/// A `maintain` plan, made safe to show: at most `max` entries (the rest
/// counted), every text bounded and escaped.
pub fn removals(plan: Vec<Removal>, max: usize) -> Vec<Removal> {
    let extra = plan.len().saturating_sub(max);
    let mut shown: Vec<Removal> = plan
        .into_iter()
        .take(max)
        .map(|r| Removal {
            container_id: policy_text(&r.container_id),
            backend_id: policy_text(&r.backend_id),
            reason: policy_text(&r.reason),
        })
        .collect();
    if extra > 0 {
        shown.push(Removal {
            container_id: String::new(),
            backend_id: String::new(),
            reason: format!("... and {extra} more"),
        });
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(t: &str) -> ThreadId {
        ThreadId::parse(t).unwrap()
    }

    #[test]
    fn a_backend_of_another_user_is_refused() {
        let t = thread("alice-1");
        assert_eq!(backend_of_thread(&t, "alice").unwrap().as_str(), "alice");
        assert_eq!(
            backend_of_thread(&t, "alice-1").unwrap().as_str(),
            "alice-1"
        );
        for bad in ["bob", "bob-alice", "alicex", "../etc", "", "Alice"] {
            assert!(
                matches!(backend_of_thread(&t, bad), Err(SandboxError::Refused(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn identity_and_determinism_are_checked() {
        let b = BackendId::parse("alice").unwrap();
        assert!(identity(&b, Ok("alice".into())).is_ok());
        assert!(identity(&b, Ok("alice-x".into())).is_err());
        assert!(identity(&b, Err(SandboxError::Other("no".into()))).is_err());
        assert!(deterministic(&thread("alice-1"), &b, "alice").is_ok());
        assert!(deterministic(&thread("alice-1"), &b, "alice-2").is_err());
    }

    #[test]
    fn a_plan_is_bounded_and_escaped() {
        let plan = (0..10)
            .map(|i| Removal {
                container_id: format!("c{i}\n"),
                backend_id: "b".into(),
                reason: "x".repeat(10_000),
            })
            .collect();
        let shown = removals(plan, 3);
        assert_eq!(shown.len(), 4);
        assert!(!shown[0].container_id.contains('\n'));
        assert!(shown[0].reason.len() < 1000);
        assert!(shown[3].reason.contains("7 more"));
    }
}
